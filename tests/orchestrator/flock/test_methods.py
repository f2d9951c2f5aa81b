"""method_config: every stage's MethodConfig comes from the job's train section by one function."""

from __future__ import annotations

from dataclasses import asdict

from orchestrator.flock.methods import method_config
from orchestrator.spec import TrainSpec


def test_method_config_takes_the_train_section_and_overrides_by_keyword():
    tr = TrainSpec(steps=7, batch_size=3, lr=2e-3, seed=5, weight_decay=0.1, max_grad_norm=None, temperature=0.3,
                   eval_batch_size=2, log_every=4, eval_every=2)
    cfg = method_config(tr, "hierarchical", "hierarchical", sync_every=2, eval_every=tr.eval_every,
                        prior_update="lazy")
    assert asdict(cfg) == {"name": "hierarchical", "kind": "hierarchical", "steps": 7, "batch_size": 3, "lr": 2e-3,
                           "seed": 5, "weight_decay": 0.1, "max_grad_norm": None, "temperature": 0.3,
                           "eval_batch_size": 2, "log_every": 4, "sync_every": 2, "eval_every": 2, "eval_rows": None,
                           "prior_update": "lazy"}
    adapt = method_config(tr, "coeff", "coeff", steps=3, lr=0.5, weight_decay=0.0, temperature=1.0)
    assert (adapt.steps, adapt.lr, adapt.weight_decay, adapt.temperature, adapt.sync_every, adapt.eval_every) == (
        3, 0.5, 0.0, 1.0, 1, 0)
