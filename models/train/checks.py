"""The flock loop's deferred checks: what the steps measured, kept on the device between read points.

Every read of a device value into Python is a host-device sync: the CPU waits for all queued
GPU work. The loop therefore reads its per-step figures (non-finite flags, per-task training
NLL, whether a step's gradient was dropped) and the scan of the adapters for NaN/inf in one
transfer at each read point (``models.train.loop.train_method`` says where), not every step.
"""

from __future__ import annotations

import torch
from torch import nn

from models.lora import lora_layers

__all__ = ["StepChecks", "nonfinite_flags"]


class StepChecks:
    """What the steps measured since the last read point, on the device; read in one transfer.

    ``add`` accumulates a :class:`models.train.step.StepResult`'s non-finite flags, per-slot
    training NLL and dropped-gradient flag; ``read`` adds the scan of the adapters for NaN/inf
    offsets and returns the slots to stop; ``window`` gives the per-task training NLL since the
    last log (then starts a new window).
    """

    def __init__(self, num_slots: int, device: torch.device, lazy: bool) -> None:
        z = lambda: torch.zeros(num_slots, dtype=torch.float64, device=device)  # noqa: E731
        self.bad, self.win_sum, self.win_n = z(), z(), z()
        self.skipped = torch.zeros((), device=device)
        self.lazy, self.scan_all = lazy, True  # the first read scans every slot (a poisoned initial state)
        self.touched: set[int] = set()  # lazy: only the slots moved since the last read can turn NaN

    def touch(self, slots: list[int]) -> None:
        self.touched |= set(slots)

    @torch.no_grad()
    def add(self, res) -> None:
        if res.bad is not None:
            self.bad += res.bad.to(self.bad.dtype)
        if res.skipped is not None:
            self.skipped += res.skipped
        present = res.counts > 0
        self.win_sum += torch.where(present, res.sums / res.counts.clamp(min=1), 0.0).to(self.win_sum.dtype)
        self.win_n += present.to(self.win_n.dtype)

    def read(self, model: nn.Module, step: int) -> set[int]:
        """Slots whose loss or offsets became NaN/inf since the last read (one host read)."""
        slots = None if self.scan_all else sorted(self.touched)
        scan = nonfinite_flags(model, slots)
        flags = self.bad > 0 if scan is None else scan | (self.bad > 0)
        packed = torch.cat([flags.to(torch.float32), self.skipped.reshape(1).to(torch.float32)]).tolist()
        found, skipped = {i for i, f in enumerate(packed[:-1]) if f}, packed[-1]
        self.bad.zero_()
        self.skipped.zero_()
        self.touched.clear()
        self.scan_all = not self.lazy
        if skipped and not found:
            raise FloatingPointError(
                f"by step {step} the loss's extra terms (prior, gates or expert balance) became NaN/inf with every "
                "task's adapter finite: training diverged; lower train.lr or train.max_grad_norm"
            )
        return found

    def window(self) -> dict[int, float]:
        rows = torch.stack([self.win_sum, self.win_n]).tolist()
        self.win_sum.zero_()
        self.win_n.zero_()
        return {s: tot / n for s, (tot, n) in enumerate(zip(*rows, strict=True)) if n > 0}


@torch.no_grad()
def nonfinite_flags(model: nn.Module, slots: list[int] | None = None) -> torch.Tensor | None:
    """(T,) bool on the device: slots whose offsets hold NaN/inf, among ``slots`` (None = all)."""
    bad: torch.Tensor | None = None
    for layer in lora_layers(model).values():
        for p in (layer.lora_A, layer.lora_B):
            rows = p if slots is None else p[slots]
            nonfinite = ~torch.isfinite(rows).flatten(1).all(dim=1)  # (T,) or (len(slots),)
            bad = nonfinite if bad is None else bad | nonfinite
            n = p.shape[0]
    if bad is None or slots is None:
        return bad
    full = torch.zeros(n, dtype=torch.bool, device=bad.device)
    full[slots] = bad
    return full
