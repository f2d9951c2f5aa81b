"""``search.metric`` with ``search.packing: true``: a packed trial is judged on its pack host, through its own
slot group, on the driver's seeded rows, and reports at every rung the metric the same trial reports unpacked.

The reference is the product's unpacked trial (``run_trial``, what ``search_trial`` runs under Tune) of the
same configuration: same rows, same seeds. The packed host trains the trials fused (equal to float rounding,
``test_pack_host.py``); greedy generations on these weights do not flip, so the metric values are equal.
"""

from __future__ import annotations

import csv
import glob
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.orchestrator.search.test_metric_search import TASKS, _job, assert_picked_on_metric

FIXED = {"steps": 30, "eval_every": 10, "eval_subset": 2, "quantizer": "nf", "lq_iters": 1, "gate_lambda": 0.0,
         "gate_lr": 0.1, "threads": 1}


def _payload(spec, data) -> dict:
    """The search payload with the judge plan, as ``run_search`` builds it (rows once, on the driver)."""
    from orchestrator.search.driver import trial_job
    from orchestrator.search.judge import trial_judge_plan
    from orchestrator.search.trial import build_payload

    payload = build_payload(trial_job(spec), [d.name for d in data], [int(d.train_examples) for d in data],
                            [d.train_ids.numpy() for d in data], [d.eval_ids.numpy() for d in data], 1,
                            [d.train_mask.numpy() for d in data], [d.eval_mask.numpy() for d in data])
    return {**payload, "judge": trial_judge_plan(spec, spec.search, data)}


def _unpacked_reports(payload: dict, config: dict, fixed: dict = FIXED) -> dict[int, dict]:
    """step -> the unpacked trial's report at that step (every ``eval_every`` and the final one)."""
    from orchestrator.search.trial import run_trial

    reports = []
    run_trial({**config, "_search": fixed}, payload, lambda m, state: reports.append(dict(m)))
    return {m["step"]: m for m in reports}


def test_packed_trials_are_judged_through_their_own_slots_like_unpacked_trials(tmp_path):
    """Two trials leased on one host actor (no Ray: its threads are the trials' calls), each training in
    chunks of 10 steps and reporting (evaluate, judge) as the thin trial does: at every rung each reports
    macro_rouge_l equal to its unpacked run's, the two trials were judged together in one pass per rung, and
    their values differ (a trial judged through the other's slots would be caught)."""
    from orchestrator.data import build_job_data
    from orchestrator.search.pack_actor import PackHostActor
    from orchestrator.search.pack_host import PackHost

    spec = _job(tmp_path)
    data = build_job_data(spec)
    payload = _payload(spec, data)
    configs = [{"rank": 4, "bits": 16, "tau": 100.0, "lr": 0.03}, {"rank": 2, "bits": 16, "tau": 0.0, "lr": 0.01}]
    actor = PackHostActor(payload, capacity=2, max_rank=4, threads=1, gather_s=5.0)
    lids = [actor.lease({**c, "_search": FIXED}, spec.train.seed) for c in configs]
    assert actor.host.leases[lids[1]].slots.start == len(TASKS)  # the second trial's slots are not 0..T-1
    packed: dict[str, dict[int, dict]] = {lid: {} for lid in lids}
    errors = []

    def trial(lid: str) -> None:
        try:
            for step in (10, 20, 30):
                actor.train(lid, 10)
                actor.evaluate(lid, 2)
                packed[lid][step] = actor.judge(lid)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=trial, args=(lid,)) for lid in lids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and all(not t.is_alive() for t in threads)
    stats = actor.stats()
    # 31 when one thread's first step ran before the other asked: the trials are then one step out of phase
    # until the first judging pass waits for the late one's last step of its chunk
    assert stats["fused_steps"] in (30, 31) and stats["judged_trials"] == 6
    assert stats["judge_passes"] == 3  # both trials' rows in one generation pass at each rung
    for lid, config in zip(lids, configs):
        ref = _unpacked_reports(payload, config)
        assert sorted(ref) == [10, 20, 30]
        for step, got in packed[lid].items():
            assert set(got) == {"macro_rouge_l", "judge_s"} and got["judge_s"] > 0
            assert got["macro_rouge_l"] == pytest.approx(ref[step]["macro_rouge_l"], abs=1e-9), (config, step)
    a, b = ([packed[lid][s]["macro_rouge_l"] for s in (10, 20, 30)] for lid in lids)
    assert a != b and max(a) > 0  # the trials differ, and the lr 0.03 trial learns some letters
    alone = actor.host.judge([lids[1]])[lids[1]]  # one trial alone: the same value as in the mixed pass
    assert alone["macro_rouge_l"] == pytest.approx(b[-1], abs=1e-9)
    ppl_host = PackHost({k: v for k, v in payload.items() if k != "judge"}, capacity=1, max_rank=4)
    lid = ppl_host.lease(configs[0], spec.train.seed)
    assert ppl_host.judge([lid]) == {lid: {}}  # search.metric: ppl judges nothing


@pytest.mark.integration
def test_packed_search_on_rouge_l_reports_it_at_every_rung_like_unpacked_trials(local_ray, tmp_path):
    """A packed Tune search (dense and 4-bit hosts) on rouge_l: every report of every trial holds macro_rouge_l,
    judge_s and rung_bytes (so ParetoASHA records it), equal at each step to the same trial run unpacked; the
    front and the min_metric pick are on rouge_l."""
    from orchestrator.data import build_job_data
    from orchestrator.search.driver import run_search, trial_quant
    from orchestrator.search.pick import load_picked_model
    from orchestrator.task_metrics import job_tokenizer
    from tasks.evaluate import evaluate_metrics
    from tasks.metric_spec import MetricSettings

    spec = _job(tmp_path, packing=True, max_concurrent_trials=4, pick={"min_metric": {"rouge_l": 0.99}})
    data = build_job_data(spec)
    out = tmp_path / "out"
    section = run_search(spec, spec.search, data, out, "tiny")
    assert section["packing"]["hosts"] == 2 and section["packing"]["judge_s"] > 0  # dense and q4-r4 hosts judged

    payload = _payload(spec, data)
    fixed = {**FIXED, **trial_quant(spec.search, spec)}  # the driver's quantiser and LQ rounds (4-bit hosts)
    results = glob.glob(str(out / "ray" / "search" / "*" / "result.json"))
    assert len(results) == 4
    for f in results:
        reports = [json.loads(line) for line in Path(f).read_text().splitlines()]
        assert [r["step"] for r in reports] == [10, 20, 30][: len(reports)]
        config = {k: reports[0]["config"][k] for k in ("rank", "bits", "tau", "lr")}
        ref = _unpacked_reports(payload, config, fixed)
        for r in reports:
            assert r["judge_s"] > 0 and r["rung_bytes"] == r["target_bytes"] == r["model_bytes"]
            assert r["macro_rouge_l"] == pytest.approx(ref[r["step"]]["macro_rouge_l"], abs=1e-9), (config, r["step"])
            assert r["macro_ppl"] == pytest.approx(ref[r["step"]]["macro_ppl"], rel=1e-4)
            assert r["model_bytes"] == ref[r["step"]]["model_bytes"]

    with open(out / "search" / "trials.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[header.index("macro_ppl") + 1] == "macro_rouge_l" and "judge_s" in header
    assert section["objective"] == {"key": "macro_rouge_l", "mode": "max", "rows_per_task": 4, "tasks": sorted(TASKS)}
    done = [r for r in section["trials"] if r["status"] == "done"]
    assert done and max(r["macro_rouge_l"] for r in done) > 0

    def beats(p, q):
        return (p["macro_rouge_l"] >= q["macro_rouge_l"] and p["model_bytes"] <= q["model_bytes"]
                and (p["macro_rouge_l"] > q["macro_rouge_l"] or p["model_bytes"] < q["model_bytes"]))

    assert sorted(r["trial_id"] for r in section["pareto"]) == sorted(
        r["trial_id"] for r in done if not any(beats(o, r) for o in done))
    picked = section["picked"]
    assert_picked_on_metric(section)
    # the picked packed trial's checkpoint rebuilds (unpacked names) into a model judged to the reported value
    model = load_picked_model(spec, picked, out / "search" / "pick")
    plan = payload["judge"]
    got = evaluate_metrics(model, {t: p["examples"] for t, p in plan["plan"].items()},
                           {t: MetricSettings.model_validate(p["settings"]) for t, p in plan["plan"].items()},
                           job_tokenizer(spec), slot_of=plan["slots"])
    assert picked["macro_rouge_l"] == pytest.approx(np.mean([m["rouge_l"] for m in got.values()]), abs=1e-6)
