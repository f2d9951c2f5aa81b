"""The driver's merge of the workers' results and the report's flock block, on hand-made
records (the shapes in :mod:`orchestrator.contracts`); no Ray cluster."""

from __future__ import annotations

import json
import math

from orchestrator.contracts import FlockResults, MethodRecord, PescPart
from orchestrator.flock.driver import _merge_method
from orchestrator.pesc.stage import merge_pesc
from orchestrator.report.writer import flock_section, pesc_section


def _record(nll: dict[str, float], seconds: float, eval_curve=None) -> MethodRecord:
    rec = MethodRecord(kind="hierarchical", tau=100.0, eval_nll=nll, failed={}, curve=[(1, 2.0)], seconds=seconds,
                       tokens_per_s=10.0)
    if eval_curve is not None:
        rec["eval_curve"] = eval_curve
    return rec


def test_workers_merge_by_task_and_the_report_reads_the_merge():
    methods: dict[str, MethodRecord] = {}
    _merge_method(methods, "hierarchical", _record({"a": 1.0}, 3.0, [(2, {"a": 1.5})]))
    _merge_method(methods, "hierarchical", _record({"b": 2.0}, 5.0, [(2, {"b": 2.5})]))
    m = methods["hierarchical"]
    assert m["eval_nll"] == {"a": 1.0, "b": 2.0} and m["seconds"] == 5.0
    assert [list(x) for x in m["eval_curve"]] == [[2, {"a": 1.5, "b": 2.5}]]
    assert list(m) == ["kind", "tau", "curve", "seconds", "tokens_per_s", "eval_curve", "eval_nll", "failed"]
    res = FlockResults(
        base_eval_nll={"a": 2.0, "b": 3.0},
        methods=methods,
        assignment={"worker0": ["a"], "worker1": ["b"]},
        sizes={"a": 4, "b": 8},
    )
    sec = json.loads(json.dumps(flock_section(json.loads(json.dumps(res)), 100.0)))  # through JSON, as on disk
    assert sec["macro_ppl"] == (math.exp(1.0) + math.exp(2.0)) / 2
    assert sec["eval_curves"]["hierarchical"][0]["step"] == 2
    assert sec["eval_curves"]["hierarchical"][0]["tasks"]["b"] == math.exp(2.5)


def test_without_eval_every_the_flock_block_has_no_eval_curves():
    methods: dict[str, MethodRecord] = {}
    _merge_method(methods, "hierarchical", _record({"a": 1.0}, 3.0))
    res = FlockResults(base_eval_nll={"a": 2.0}, methods=methods, assignment={"worker0": ["a"]}, sizes={"a": 4})
    assert "eval_curves" not in flock_section(res, 100.0)


def test_pesc_parts_merge_with_load_weighted_by_eval_rows():
    def part(task: str, rows: int, load: list[float]) -> PescPart:
        return PescPart(
            eval_nll={task: 1.0},
            eval_rows=rows,
            expert_load={"blk": load},
            task_expert_load={task: {"blk": load}},
            trainable_params=7,
            seconds=float(rows),
            curve=[(1, 1.0)],
        )

    merged = merge_pesc([part("a", 1, [1.0, 0.0]), part("b", 3, [0.0, 1.0])])
    assert merged["expert_load"]["blk"] == [0.25, 0.75] and merged["seconds"] == 3.0
    res = FlockResults(
        base_eval_nll={"a": 1.0, "b": 1.0}, methods={}, pesc=merged, assignment={}, sizes={"a": 1, "b": 3}
    )
    assert pesc_section(res)["busiest_expert_vs_mean"] == 1.5
