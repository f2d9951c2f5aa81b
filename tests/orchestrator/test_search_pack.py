"""``search.packing: true`` on local Ray: packable trials share a host, the others run alone,
and every packed trial reports what the same trial reports unpacked."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from tests.orchestrator.test_pack_host import _unpacked
from tests.orchestrator.test_search import job_and_data, local_ray, search_settings  # noqa: F401

SPACE = """\
dimensions:
  rank: {grid: [2, 4]}
  bits: {grid: [4, 16]}
  tau: {value: 100.0}
  lr: {value: 0.003}
"""


@pytest.mark.integration
def test_packed_search_matches_unpacked_trials(local_ray, tmp_path):  # noqa: F811
    from orchestrator.search import run_search
    from orchestrator.search_trial import build_payload

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    spec, data = job_and_data()
    settings = search_settings(str(space)).model_copy(update={"packing": True, "max_concurrent_trials": 4, "pick": None})
    section = run_search(spec, settings, data, tmp_path / "packed", "tiny")
    assert section["packing"]["fused_steps"] > 0 and section["packing"]["trials_per_step"] > 1.0  # trials were fused
    with open(tmp_path / "packed" / "search" / "trials.csv", newline="") as f:
        rows = {(int(r["rank"]), int(r["bits"])): r for r in csv.DictReader(f)}
    assert set(rows) == {(2, 4), (2, 16), (4, 4), (4, 16)}  # bits 4: unpacked fallback
    assert {r["status"] for r in rows.values()} == {"done"}
    payload = build_payload(spec.model_dump(mode="json", exclude={"search"}), [d.name for d in data],
                            [int(d.train_examples) for d in data], [d.train_ids.numpy() for d in data],
                            [d.eval_ids.numpy() for d in data])
    for rank in (2, 4):  # the packed trials' final numbers equal the unpacked computation's
        nll, _, size = _unpacked(payload, {"rank": rank, "tau": 100.0, "lr": 0.003}, settings.steps)
        row = rows[(rank, 16)]
        assert math.isclose(float(row["macro_ppl"]), float(np.mean([math.exp(v) for v in nll.values()])), rel_tol=1e-4)
        assert int(row["model_bytes"]) == size["model_bytes"]
