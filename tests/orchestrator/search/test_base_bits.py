"""Search trials run on the job's quantised base unless the space varies the bits."""

from __future__ import annotations

from orchestrator.search.driver import trial_quant, with_job_base
from orchestrator.spec import JobSpec
from orchestrator.specs.search import SearchSpec
from tests.orchestrator.conftest import tiny_job_spec
from tune_spaces.loader import load_space, to_tune


def _spec(**base):
    spec = tiny_job_spec().model_dump(mode="json", by_alias=True, exclude_none=True)
    return JobSpec.model_validate({**spec, "base": {**spec["base"], **base}})


def _space(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_space(str(path))


def test_base_bits_fill_a_space_without_bits(tmp_path):
    space = _space(tmp_path, "dimensions:\n  rank: {choice: [2, 4]}\n  tau: {value: 0.0}\n")
    got = with_job_base(space, _spec(bits=4))
    assert to_tune(got)["bits"] == 4
    assert "bits" not in space.dimensions  # the loaded space itself is left alone


def test_space_bits_win_and_unquantised_bases_add_nothing(tmp_path):
    space = _space(tmp_path, "dimensions:\n  bits: {choice: [3, 16]}\n")
    assert with_job_base(space, _spec(bits=4)) is space
    plain = _space(tmp_path, "dimensions:\n  rank: {value: 4}\n")
    assert "bits" not in with_job_base(plain, _spec()).dimensions
    assert "bits" not in with_job_base(plain, _spec(bits=16)).dimensions
    # a mixed budget is a per-matrix allocation trials do not reproduce: no bits are invented
    assert "bits" not in with_job_base(plain, _spec(bit_budget=3.5)).dimensions


def test_trial_quantiser_follows_the_base_unless_the_search_sets_it():
    vq = _spec(bits=4, quant={"quantizer": "vq", "lq_iters": 3})
    assert trial_quant(SearchSpec(), vq) == {"quantizer": "vq", "lq_iters": 3}
    assert trial_quant(SearchSpec(quantizer="uniform"), vq) == {"quantizer": "uniform", "lq_iters": 3}
    assert trial_quant(SearchSpec(), _spec()) == {"quantizer": "nf", "lq_iters": 2}
