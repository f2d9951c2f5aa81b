"""``search.packing: true`` on local Ray: packable trials share a host, the others run alone,
and every trial reports what it reports unpacked."""

from __future__ import annotations

import csv
import math

import pytest

from tests.orchestrator.test_search import job_and_data, local_ray, search_settings  # noqa: F401

SPACE = """\
dimensions:
  rank: {grid: [2, 4]}
  bits: {grid: [4, 16]}
  tau: {value: 100.0}
  lr: {value: 0.003}
"""


def _rows(path) -> dict:
    with open(path, newline="") as f:
        return {(int(r["rank"]), int(r["bits"])): r for r in csv.DictReader(f)}


@pytest.mark.integration
def test_packed_search_matches_unpacked(local_ray, tmp_path):  # noqa: F811
    from orchestrator.search import run_search

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    spec, data = job_and_data()
    plain = search_settings(str(space)).model_copy(update={"max_concurrent_trials": 2, "pick": None})
    packed = plain.model_copy(update={"packing": True, "max_concurrent_trials": 4})
    a = run_search(spec, plain, data, tmp_path / "plain", "tiny")
    b = run_search(spec, packed, data, tmp_path / "packed", "tiny")
    assert "packing" not in a
    assert b["packing"]["fused_steps"] > 0 and b["packing"]["trials_per_step"] > 1.0  # two trials were fused
    ra, rb = _rows(tmp_path / "plain" / "search" / "trials.csv"), _rows(tmp_path / "packed" / "search" / "trials.csv")
    assert set(ra) == set(rb) == {(2, 4), (2, 16), (4, 4), (4, 16)}
    for key in ra:
        assert rb[key]["status"] == ra[key]["status"] == "done"
        assert int(rb[key]["model_bytes"]) == int(ra[key]["model_bytes"])
        assert math.isclose(float(rb[key]["macro_ppl"]), float(ra[key]["macro_ppl"]), rel_tol=1e-4)
