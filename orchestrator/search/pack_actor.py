"""The pack host behind a Ray threaded actor: each trial's blocking call joins the next fused step or judging pass.

:class:`~orchestrator.search.pack_host.PackHost` is plain PyTorch and serves one call at a time.
Packed Tune trials (:mod:`orchestrator.search.packed_trial`) call it concurrently, each from its
own thread of a threaded actor; :class:`PackHostActor` turns those calls into fused work: the
trials that train at the same moment share one forward/backward per step (:meth:`PackHostActor.train`),
and the trials that report together share one judging pass of ``search.metric``
(:meth:`PackHostActor.judge`). Its own module because the host is the model code and this is the
scheduling of concurrent calls around it.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from orchestrator.search.pack_host import PackHost
from orchestrator.search.trial import trial_device

__all__ = ["PackHostActor"]


class PackHostActor:
    """A :class:`PackHost` behind a Ray threaded actor: concurrent trials' steps are fused.

    Each trial thread calls :meth:`train` (n steps) and blocks. The first waiting thread that
    finds the host idle leads the next step: it waits up to ``gather_s`` for the other leased
    trials to ask too (they report and re-ask between chunks), then runs one fused step for
    every trial with steps left. Evaluations, judging and state reads take the same compute lock.
    """

    def __init__(self, payload: dict, capacity: int, max_rank: int, threads: int, device: str = "cpu",
                 setting: dict | None = None, gather_s: float = 0.5, idle_s: float = 600.0) -> None:
        self.threads = int(threads)
        torch.set_num_threads(self.threads)
        device = trial_device(device != "cpu")  # a host holding a GPU it cannot use fails here, clearly
        self.host = PackHost(payload, capacity, max_rank, device, setting)
        self.step_s = self.eval_s = self.judge_s = 0.0
        self.cv = threading.Condition()
        self.compute = threading.Lock()
        self.want: dict[str, int] = {}
        self.leading = False
        self.last_batch: list[str] = []
        self.seen: dict[str, float] = {}  # lease -> last call (reclaims leases of killed trials)
        self.idle_s = idle_s
        self.gather_s = gather_s
        self.fused_steps = 0
        self.fused_rows = 0
        self.judge_want: set[str] = set()  # trials waiting for the next judging pass
        self.judge_out: dict[str, dict | Exception] = {}  # their results, collected by each trial's call
        self.judge_round: dict[str, int] = {}  # trial -> fused steps done when it was last judged
        self.judge_leading = False
        self.judge_passes = self.judged_trials = 0

    def _threads(self) -> None:
        # The intra-op thread count is per calling thread (OpenMP): Ray runs these methods on
        # its own threads, which would otherwise start with OMP_NUM_THREADS (1 in a 0-CPU actor).
        torch.set_num_threads(self.threads)

    def lease(self, config: dict, seed: int, state: dict | None = None) -> str:
        with self.compute:
            if not self.host.free:  # a trial killed without releasing: reclaim its group
                now = time.monotonic()
                with self.cv:
                    idle = [
                        x for x in self.host.leases if x not in self.want and now - self.seen.get(x, now) > self.idle_s
                    ]
                for x in idle:
                    self.host.release(x)
            lid = self.host.lease(config, seed, {k: torch.as_tensor(v) for k, v in (state or {}).items()})
            self.seen[lid] = time.monotonic()
            return lid

    def release(self, lid: str) -> None:
        with self.cv:
            self.want.pop(lid, None)
            self.judge_round.pop(lid, None)
        with self.compute:
            self.host.release(lid)
            self.seen.pop(lid, None)
        with self.cv:
            self.cv.notify_all()

    def train(self, lid: str, steps: int) -> float:
        """Run ``steps`` steps of this trial (fused with whoever trains meanwhile); its last NLL."""
        self.seen[lid] = time.monotonic()
        with self.cv:
            self.want[lid] = int(steps)
            self.cv.notify_all()
            while self.want.get(lid, 0) > 0:
                if self.leading:
                    self.cv.wait()
                    continue
                self.leading = True
                # Trials of the last fused step that are between chunks (reporting) come back
                # within moments: wait for them rather than step without them (not for those
                # waiting on a judging pass: that pass may wait for this step).
                deadline = time.monotonic() + self.gather_s
                while time.monotonic() < deadline and any(
                    self.want.get(x, 0) <= 0 and x not in self.judge_want for x in self.last_batch
                    if x in self.host.leases
                ):
                    self.cv.wait(timeout=max(0.0, deadline - time.monotonic()))
                batch = [x for x, n in self.want.items() if n > 0 and x in self.host.leases]
                self.last_batch = batch
                self.cv.release()
                try:
                    with self.compute:
                        t0 = time.perf_counter()
                        self._threads()
                        self.host.step(batch)
                        self.step_s += time.perf_counter() - t0
                finally:
                    self.cv.acquire()
                    self.leading = False
                    for x in batch:
                        if x in self.want:
                            self.want[x] -= 1
                            if self.host.leases[x].error:
                                self.want[x] = 0
                    self.fused_steps += 1
                    self.fused_rows += len(batch)
                    self.cv.notify_all()
            self.want.pop(lid, None)
        lease = self.host.leases[lid]
        if lease.error:
            raise FloatingPointError(f"{lease.error}: lower this trial's lr")
        return lease.last_nll

    def evaluate(self, lid: str, subset: int | None = None) -> dict[int, float]:
        self.seen[lid] = time.monotonic()
        with self.compute:
            t0 = time.perf_counter()
            self._threads()
            out = self.host.evaluate(lid, subset)
            self.eval_s += time.perf_counter() - t0
            return out

    def judge(self, lid: str) -> dict[str, float]:
        """This trial's ``macro_<metric>`` and ``judge_s``, in one mixed pass with the trials reporting now.

        The trials of a fused step end their chunk together and report (evaluate, judge) within
        moments: the first to ask waits up to ``gather_s`` for them, as :meth:`train` gathers a
        step, then judges every trial that asked (:meth:`PackHost.judge`).
        """
        self.seen[lid] = time.monotonic()
        with self.cv:
            self.judge_want.add(lid)
            self.cv.notify_all()
            while lid not in self.judge_out:
                if self.judge_leading:
                    self.cv.wait()
                    continue
                self.judge_leading = True
                deadline = time.monotonic() + self.gather_s
                while time.monotonic() < deadline and any(self._judges_soon(x) for x in list(self.host.leases)):
                    self.cv.wait(timeout=max(0.0, deadline - time.monotonic()))
                batch = sorted(self.judge_want)
                self.judge_want.clear()
                out: dict = {x: RuntimeError("the judging pass did not finish") for x in batch}
                self.cv.release()
                try:
                    with self.compute:
                        t0 = time.perf_counter()
                        self._threads()
                        out = self.host.judge(batch)
                        self.judge_s += time.perf_counter() - t0
                except Exception as err:  # noqa: BLE001 (every trial of the pass raises it in its own call)
                    out = {x: err for x in batch}
                finally:
                    self.cv.acquire()
                    self.judge_leading = False
                    self.judge_out.update(out)
                    self.judge_round.update({x: self.fused_steps for x in batch})
                    self.judge_passes += 1
                    self.judged_trials += len(batch)
                    self.cv.notify_all()
            result = self.judge_out.pop(lid)
        if isinstance(result, Exception):
            raise result
        return result

    def _judges_soon(self, x: str) -> bool:
        """Whether trial ``x`` will ask to be judged within moments (not judged since the last fused step).

        It ended its chunk with the last fused step (reporting now), or it has one step of its
        chunk left (a trial one step out of phase, e.g. leased a step later: it takes that step
        while the judging pass waits, and the two get in phase for their next chunk).
        """
        if x in self.judge_want or x in self.judge_out or self.judge_round.get(x, -1) >= self.fused_steps:
            return False
        left = self.want.get(x, 0)
        return left == 1 or (left <= 0 and x in self.last_batch)

    def state(self, lid: str) -> dict[str, np.ndarray]:
        with self.compute:
            return {k: v.detach().cpu().numpy() for k, v in self.host.state(lid).items()}  # GPU -> host

    def deployed_bytes(self, lid: str) -> dict:
        return self.host.deployed_bytes(lid)

    def quant_error(self) -> float | None:
        return (self.host.quant or {}).get("recon_rel_error")

    def stats(self) -> dict:
        """Fused steps run and mean trials per fused step (how much packing happened)."""
        return {
            "fused_steps": self.fused_steps,
            "trial_steps": self.fused_rows,
            "step_s": self.step_s,
            "eval_s": self.eval_s,
            "judge_s": self.judge_s,
            "judge_passes": self.judge_passes,
            "judged_trials": self.judged_trials,
        }
