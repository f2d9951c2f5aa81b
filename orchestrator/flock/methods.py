"""Which methods the flock trains, and the one way to turn the job's ``train:`` into a MethodConfig.

``models.train.loop.MethodConfig`` takes plain numbers (models/ never sees the job spec);
every stage that trains (flock, PESC, search trials, recycling) builds it here, so a new
``train:`` setting reaches all of them by one edit.
"""

from __future__ import annotations

from models.train.loop import MethodConfig
from orchestrator.spec import JobSpec, TrainSpec

__all__ = ["method_config", "methods_of"]


def method_config(
    train: TrainSpec,
    name: str,
    kind: str,
    *,
    steps: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    weight_decay: float | None = None,
    temperature: float | None = None,
    log_every: int | None = None,
    sync_every: int = 1,
    eval_every: int = 0,
    eval_rows: int | None = None,
    prior_update: str = "auto",
) -> MethodConfig:
    """The job's training settings for one method; keyword arguments override a field.

    Args:
        train: the job's ``train:`` section.
        name: the method's name in logs and results.
        kind: hierarchical | independent | unified | pesc | coeff (see ``train_method``).
        sync_every: ``flock.sync_every`` (1 = all-reduce Theta's gradient every step).
        eval_every / eval_rows: periodic evaluation during training (0 = only at the end).
        prior_update: ``flock.prior_update`` (dense | lazy | auto, see ``models/train/lazy.py``).

    Example:
        >>> method_config(spec.train, "pesc", "pesc", sync_every=spec.flock.sync_every)
    """
    return MethodConfig(
        name=name,
        kind=kind,
        steps=train.steps if steps is None else steps,
        batch_size=train.batch_size,
        lr=train.lr if lr is None else lr,
        seed=train.seed if seed is None else seed,
        weight_decay=train.weight_decay if weight_decay is None else weight_decay,
        max_grad_norm=train.max_grad_norm,
        temperature=train.temperature if temperature is None else temperature,
        eval_batch_size=train.eval_batch_size,
        log_every=train.log_every if log_every is None else log_every,
        sync_every=sync_every,
        eval_every=eval_every,
        eval_rows=eval_rows,
        prior_update=prior_update,
    )


def methods_of(spec: JobSpec) -> list[tuple[str, str, object]]:
    """(name, kind, tau) of every method the flock trains, the main one first.

    tau-sweep points that another method already trains (the main tau; 0 when the
    independent baseline runs) are not trained twice: the report takes them from there.
    """
    f = spec.flock
    out: list[tuple[str, str, object]] = [("hierarchical", "hierarchical", f.tau)]
    if f.tau == 0:
        out = [("hierarchical", "independent", 0.0)]
    for b in f.baselines:
        out.append((b, b, 0.0 if b == "independent" else float("inf")))
    done = {float(t) for _, k, t in out if k != "unified" and isinstance(t, (int, float))}
    for t in f.tau_sweep or []:
        if float(t) in done:
            continue
        done.add(float(t))
        kind = "independent" if t == 0 else "hierarchical"
        out.append((f"tau={t:g}", kind, float(t)))
    return out
