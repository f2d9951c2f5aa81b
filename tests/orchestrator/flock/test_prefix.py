"""Prefix-cache settings of a flock worker: a too-small budget is refused by name; auto decides and says why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from models.base import load_base
from models.lora import inject
from orchestrator.errors import SpecError
from orchestrator.flock.prefix import worker_prefix_cache
from orchestrator.preflight import preflight
from orchestrator.spec import JobSpec

TINY = Path(__file__).resolve().parents[3] / "examples" / "tiny.yaml"


def _spec(**flock) -> JobSpec:
    d = yaml.safe_load(TINY.read_text())
    d["flock"].update(flock)
    return JobSpec.model_validate(d)


def test_a_budget_below_one_batch_is_refused_before_the_job_naming_the_setting_and_the_minimum():
    # tiny.yaml: max(batch 4, eval batch 8) rows x 64 tokens x hidden 64 x 4 bytes = 131,072 bytes
    with pytest.raises(SpecError, match=r"flock\.prefix_cache\.budget_gb.*at least 0\.000122"):
        preflight(_spec(prefix_cache={"budget_gb": 0.0001}))
    preflight(_spec(prefix_cache={"budget_gb": 0.000123}))  # one batch fits
    preflight(_spec(prefix_cache={"budget_gb": 0.0001, "mode": "off"}))  # no cache, no budget


def test_the_worker_decides_from_steps_rows_and_methods_and_logs_one_line():
    spec = _spec()
    model = load_base(random_init=yaml.safe_load(TINY.read_text())["base"]["random_init"], seed=0)
    inject(model, ["q_proj"], num_tasks=2, rank=2, alpha=4.0, layers=[1])
    train = {0: torch.zeros(40, 64, dtype=torch.long), 1: torch.zeros(60, 64, dtype=torch.long)}
    evals = {0: torch.zeros(4, 64, dtype=torch.long), 1: torch.zeros(4, 64, dtype=torch.long)}
    said: list[str] = []
    cache = worker_prefix_cache(model, spec, 1, [40, 60, 8], [0, 1], train, evals, said.append)
    assert cache is not None and cache.capacity == 108  # three methods + PESC replay the draws: on, every row fits
    assert len(said) == 1 and said[0].startswith("prefix cache on (auto")
    one = spec.model_copy(update={"flock": spec.flock.model_copy(update={"baselines": []}),
                                  "pesc": spec.pesc.model_copy(update={"enabled": False}),
                                  "train": spec.train.model_copy(update={"steps": 2})})
    big = {0: torch.zeros(4000, 64, dtype=torch.long), 1: torch.zeros(6000, 64, dtype=torch.long)}
    said.clear()
    cache = worker_prefix_cache(model, one, 1, [4000, 6000, 8], [0, 1], big, evals, said.append)
    assert cache.keep == {"eval"} and cache.capacity == 8  # training rows seen once; eval rows twice (base, method)
    assert said[0].startswith("prefix cache on (auto") and "keeping eval rows" in said[0]
    assert worker_prefix_cache(model, spec, 0, [40, 60, 8], [0, 1], train, evals, said.append) is None  # no split
