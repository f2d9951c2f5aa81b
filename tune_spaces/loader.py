"""Search spaces as YAML data: validate them, then turn them into ``ray.tune`` spaces.

A space file names each searched dimension and its distribution::

    # loraflock run examples/demo.yaml   (search.space: demo)
    description: what this space is for
    dimensions:
      rank: {choice: [4, 8, 16]}
      target_sparsity: {choice: [0.0, 0.2, 0.4]}    # 0 = no gates
      bits: {choice: [3, 4, 16]}                     # 16 = unquantised base
      tau: {loguniform: [10, 1000], zero: 0.2}       # P(tau = 0) = 0.2: independent adapters
      lr: {loguniform: [3.0e-4, 3.0e-3]}

Distributions (exactly one key per dimension, plus ``zero`` for ``loguniform``):

| key          | value           | ray.tune object                                        |
|--------------|-----------------|--------------------------------------------------------|
| ``value``    | x               | the constant x                                         |
| ``choice``   | [a, b, ...]     | ``tune.choice``                                        |
| ``grid``     | [a, b, ...]     | ``tune.grid_search`` (every value, times num_samples) |
| ``uniform``  | [lo, hi]        | ``tune.uniform``                                       |
| ``loguniform`` | [lo, hi]      | ``tune.loguniform``; with ``zero: p``: 0 with probability p |

(``zero: p`` gives a ``ray.tune`` Float domain whose sampler draws 0 with probability p and
otherwise log-uniformly, from Tune's seeded random state.)

Dimensions and the values they accept: ``rank`` (int >= 1), ``target_sparsity`` (gate
target in [0, 1); 0 = no gates), ``bits`` (2, 3, 4, 8 or 16 = unquantised), ``bit_budget`` (average bits per weight in
[4.5, 8.5], NF4/NF8 per matrix, or 16; needs ``search.quantize_layers: all``), ``quantizer``
(``nf``, ``uniform``, ``vq``), ``tau`` (>= 0; 0 = independent adapters), ``lr`` (> 0).
``rank``, ``bits`` and ``bit_budget`` must be discrete (choice/grid/value). Anything else is a
:class:`SpaceError` naming the file and the key. Parsing is plain Python; only
:func:`to_tune` imports ``ray.tune``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "SPACE_DIR",
    "DIMENSIONS",
    "DISTRIBUTIONS",
    "SpaceError",
    "Dimension",
    "SearchSpace",
    "list_spaces",
    "resolve_space",
    "parse_space",
    "load_space",
    "to_tune",
    "to_optuna",
]

SPACE_DIR = Path(__file__).resolve().parent
DISTRIBUTIONS = ("value", "choice", "grid", "uniform", "loguniform")
_BITS = (2, 3, 4, 8, 16)
_QUANTIZERS = ("nf", "uniform", "vq")
_TOP_KEYS = ("description", "dimensions")


class SpaceError(ValueError):
    """A search-space file that cannot be used; the message names the file, the key and the fix."""


def _rank_ok(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "an integer >= 1"


def _sparsity_ok(v: Any) -> str | None:
    return None if _is_num(v) and 0.0 <= v < 1.0 else "a number in [0, 1) (0 = no gates)"


def _bits_ok(v: Any) -> str | None:
    return None if v in _BITS and not isinstance(v, bool) else f"one of {list(_BITS)} (16 = unquantised)"


def _budget_ok(v: Any) -> str | None:
    ok = _is_num(v) and (4.5 <= v <= 8.5 or v == 16)
    return None if ok else "bits per weight in [4.5, 8.5] (mixed NF4/NF8, scales counted) or 16 (unquantised)"


def _quantizer_ok(v: Any) -> str | None:
    return None if v in _QUANTIZERS else f"one of {list(_QUANTIZERS)}"


def _tau_ok(v: Any) -> str | None:
    return None if _is_num(v) and v >= 0 and math.isfinite(v) else "a finite number >= 0 (0 = independent)"


def _lr_ok(v: Any) -> str | None:
    return None if _is_num(v) and 0 < v < 1 else "a number in (0, 1)"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


# name -> (value check, continuous distributions allowed)
DIMENSIONS: dict[str, tuple[Any, bool]] = {
    "rank": (_rank_ok, False),
    "target_sparsity": (_sparsity_ok, True),
    "bits": (_bits_ok, False),
    "bit_budget": (_budget_ok, False),
    "quantizer": (_quantizer_ok, False),
    "tau": (_tau_ok, True),
    "lr": (_lr_ok, True),
}


@dataclass(frozen=True)
class Dimension:
    """One validated dimension: ``kind`` in :data:`DISTRIBUTIONS`, its ``values`` (list), and
    ``zero`` = probability of an exact 0 (``loguniform`` only)."""

    name: str
    kind: str
    values: tuple
    zero: float = 0.0


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space (plain data; :func:`to_tune` makes the ray.tune dict)."""

    source: str
    description: str
    dimensions: dict[str, Dimension]

    def grid_size(self) -> int:
        """Trials one sample of the space expands to (product of the grid dimensions)."""
        return math.prod(len(d.values) for d in self.dimensions.values() if d.kind == "grid")


def list_spaces() -> list[str]:
    """Names of the bundled spaces (``tune_spaces/*.yaml``)."""
    return sorted(p.stem for p in SPACE_DIR.glob("*.yaml"))


def resolve_space(name_or_path: str | Path) -> Path:
    """A bundled space name (``demo``) or a path to a YAML file -> the file's path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    bundled = SPACE_DIR / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    raise SpaceError(
        f"search space {str(name_or_path)!r} is neither a bundled space {list_spaces()} nor an existing .yaml file"
    )


def _pair(src: str, name: str, key: str, v: Any) -> tuple[float, float]:
    if not (isinstance(v, list) and len(v) == 2 and all(_is_num(x) for x in v) and v[0] < v[1]):
        raise SpaceError(f"{src}: dimensions.{name}.{key} must be [low, high] with low < high, got {v!r}")
    return float(v[0]), float(v[1])


def _dimension(src: str, name: str, body: Any) -> Dimension:
    if name not in DIMENSIONS:
        raise SpaceError(f"{src}: unknown dimension {name!r}; known dimensions are {sorted(DIMENSIONS)}")
    check, continuous = DIMENSIONS[name]
    if not isinstance(body, dict):
        raise SpaceError(f"{src}: dimensions.{name} must be a mapping like {{choice: [...]}}, got {body!r}")
    kinds = [k for k in body if k != "zero"]
    unknown = [k for k in kinds if k not in DISTRIBUTIONS]
    if unknown:
        raise SpaceError(
            f"{src}: dimensions.{name}: unknown distribution {unknown[0]!r}; use one of {list(DISTRIBUTIONS)}"
        )
    if len(kinds) != 1:
        raise SpaceError(
            f"{src}: dimensions.{name} needs exactly one distribution of {list(DISTRIBUTIONS)}, got {kinds}"
        )
    kind = kinds[0]
    raw = body[kind]
    zero = body.get("zero", 0.0)
    if "zero" in body and kind != "loguniform":
        raise SpaceError(f"{src}: dimensions.{name}.zero is only allowed with loguniform")
    if not (_is_num(zero) and 0.0 <= zero < 1.0):
        raise SpaceError(f"{src}: dimensions.{name}.zero must be a probability in [0, 1), got {zero!r}")
    if kind in ("uniform", "loguniform"):
        if not continuous:
            raise SpaceError(f"{src}: dimensions.{name} is discrete: use choice, grid or value, not {kind}")
        values: tuple = _pair(src, name, kind, raw)
        if kind == "loguniform" and values[0] <= 0:
            raise SpaceError(f"{src}: dimensions.{name}.loguniform needs low > 0 (use zero: p for an exact 0)")
    elif kind == "value":
        values = (raw,)
    else:
        if not isinstance(raw, list) or not raw:
            raise SpaceError(f"{src}: dimensions.{name}.{kind} must be a non-empty list, got {raw!r}")
        values = tuple(raw)
    for v in values:  # every listed value, or both bounds of a range
        why = check(v)
        if why is not None:
            raise SpaceError(f"{src}: dimensions.{name}: value {v!r} is not allowed; use {why}")
    return Dimension(name, kind, values, float(zero))


def parse_space(data: Any, source: str = "<space>") -> SearchSpace:
    """Validate parsed YAML into a :class:`SearchSpace`, or raise :class:`SpaceError`."""
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: a search space must be a YAML mapping with `dimensions:`")
    extra = [k for k in data if k not in _TOP_KEYS]
    if extra:
        raise SpaceError(f"{source}: unknown top-level key {extra[0]!r}; allowed keys are {list(_TOP_KEYS)}")
    dims = data.get("dimensions")
    if not isinstance(dims, dict) or not dims:
        raise SpaceError(f"{source}: `dimensions:` must map at least one of {sorted(DIMENSIONS)} to a distribution")
    return SearchSpace(source, str(data.get("description", "")), {n: _dimension(source, n, b) for n, b in dims.items()})


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Read and validate a bundled space (``demo``) or a YAML file (safe YAML only).

    Example:
        >>> space = load_space("demo")
        >>> sorted(space.dimensions)
        ['bits', 'lr', 'rank', 'target_sparsity', 'tau']
    """
    path = resolve_space(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: malformed YAML: {str(e).splitlines()[0]}") from None
    return parse_space(data, str(path))


def _log_uniform_or_zero(low: float, high: float, p_zero: float):
    """A ray.tune Float domain on [0, high]: 0 with probability p_zero, else log-uniform on [low, high]."""
    import numpy as np
    from ray.tune.search.sample import Float, LogUniform, _BackwardsCompatibleNumpyRng

    class _Sampler(LogUniform):
        def __init__(self) -> None:
            self.low, self.high, self.p_zero = low, high, p_zero

        def sample(self, domain, config=None, size: int = 1, random_state=None):
            rs = random_state
            if not isinstance(rs, _BackwardsCompatibleNumpyRng):
                rs = _BackwardsCompatibleNumpyRng(rs)
            u = rs.uniform(0.0, 1.0, size=size)
            logs = rs.uniform(np.log(self.low), np.log(self.high), size=size)
            items = np.where(u < self.p_zero, 0.0, np.exp(logs))
            return items if len(items) > 1 else domain.cast(items[0])

        def __str__(self) -> str:
            return f"LogUniformOrZero(p0={self.p_zero})"

    domain = Float(0.0, high)
    domain.set_sampler(_Sampler())
    return domain


def to_tune(space: SearchSpace) -> dict[str, Any]:
    """The ``param_space`` dict for ``ray.tune.Tuner`` (imports ray.tune).

    Example:
        >>> param_space = to_tune(load_space("demo"))
    """
    from ray import tune

    out: dict[str, Any] = {}
    for name, d in space.dimensions.items():
        if d.kind == "value":
            out[name] = d.values[0]
        elif d.kind == "choice":
            out[name] = tune.choice(list(d.values))
        elif d.kind == "grid":
            out[name] = tune.grid_search(list(d.values))
        elif d.kind == "uniform":
            out[name] = tune.uniform(*d.values)
        elif d.zero > 0:
            out[name] = _log_uniform_or_zero(d.values[0], d.values[1], d.zero)
        else:
            out[name] = tune.loguniform(*d.values)
    return out


def to_optuna(space: SearchSpace):
    """A define-by-run space for ``OptunaSearch(space=...)`` (Optuna's own distributions).

    Tune's converter cannot express ``loguniform`` with ``zero: p`` (a point mass at 0 plus a
    log-uniform range); here it becomes a categorical ``<name>_zero`` and, when that is
    False, a log-uniform ``<name>``; TPE learns both. ``value`` dimensions are returned as
    constants. ``grid`` has no Optuna form (it is exhaustive, not sampled): a
    :class:`SpaceError` says to use ``choice``.

    Example:
        >>> OptunaSearch(space=to_optuna(load_space("default")), metric=["macro_ppl", "model_bytes"],
        ...              mode=["min", "min"])
    """
    grid = [n for n, d in space.dimensions.items() if d.kind == "grid"]
    if grid:
        raise SpaceError(
            f"{space.source}: dimensions {grid} use `grid`, which Optuna cannot sample: use `choice` for an "
            "Optuna search (or algorithm: random)"
        )
    return _OptunaSpace(dict(space.dimensions))


class _OptunaSpace:
    """The define-by-run callable of :func:`to_optuna` (a class, so Tune can pickle its searcher)."""

    def __init__(self, dims: dict[str, Dimension]) -> None:
        self.dims = dims

    def __call__(self, trial) -> dict[str, Any]:
        const: dict[str, Any] = {}
        for name, d in self.dims.items():
            if d.kind == "value":
                const[name] = d.values[0]
            elif d.kind == "choice":
                trial.suggest_categorical(name, list(d.values))
            elif d.kind == "uniform":
                trial.suggest_float(name, *d.values)
            elif d.zero > 0 and trial.suggest_categorical(f"{name}_zero", [False, True]):
                const[name] = 0.0
            else:
                trial.suggest_float(name, *d.values, log=True)
        return const
