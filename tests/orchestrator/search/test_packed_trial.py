"""``search.packing: true`` on local Ray: trials share hosts by base setting (a gated trial
runs alone), and every packed trial reports what the same trial computes unpacked."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from tests.orchestrator.search.test_driver import job_and_data, search_settings
from tests.orchestrator.search.test_pack_host import _unpacked

SPACE = """\
dimensions:
  rank: {grid: [2, 4]}
  bits: {grid: [4, 16]}
  target_sparsity: {grid: [0.0, 0.3]}
  tau: {value: 100.0}
  lr: {value: 0.003}
"""


@pytest.mark.integration
def test_packed_search_matches_unpacked_trials(local_ray, tmp_path):
    from orchestrator.search.driver import run_search, trial_quant
    from orchestrator.search.trial import build_payload

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    spec, data = job_and_data()
    settings = search_settings(str(space)).model_copy(
        update={"packing": True, "max_concurrent_trials": 8, "pick": None}
    )
    section = run_search(spec, settings, data, tmp_path / "packed", "tiny")
    # hosts: the unquantised base, and 4-bit bases at rank 2 and rank 4; trials were fused
    assert section["packing"]["hosts"] == 3 and section["packing"]["trials_per_step"] > 1.0
    with open(tmp_path / "packed" / "search" / "trials.csv", newline="") as f:
        rows = {(int(r["rank"]), int(r["bits"]), float(r["target_sparsity"])): r for r in csv.DictReader(f)}
    assert len(rows) == 8 and {r["status"] for r in rows.values()} == {"done"}  # gated: unpacked fallback
    payload = build_payload(spec.model_dump(mode="json", exclude={"search"}), [d.name for d in data],
                            [int(d.train_examples) for d in data], [d.train_ids.numpy() for d in data],
                            [d.eval_ids.numpy() for d in data])
    for rank, bits in [(2, 16), (4, 16), (2, 4), (4, 4)]:  # packed trials' final numbers = the unpacked computation's
        config = {"rank": rank, "bits": bits, "tau": 100.0, "lr": 0.003}
        nll, _, size = _unpacked(payload, config, settings.steps, **trial_quant(settings, spec))
        row = rows[(rank, bits, 0.0)]
        assert math.isclose(float(row["macro_ppl"]), float(np.mean([math.exp(v) for v in nll.values()])), rel_tol=1e-4)
        assert int(row["model_bytes"]) == size["model_bytes"]
