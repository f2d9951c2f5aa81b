"""Search-space files: every bundled file validates, errors name the file and key, tune objects are right."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tune_spaces.loader import SpaceError, list_spaces, load_space, parse_space, to_tune


def test_every_bundled_space_validates_and_converts():
    assert {"default", "demo", "gpu"} <= set(list_spaces())
    for name in list_spaces():
        space = load_space(name)
        assert {"rank", "lr"} <= set(space.dimensions) and {"bits", "bit_budget"} & set(space.dimensions), name
        tuned = to_tune(space)
        assert set(tuned) == set(space.dimensions)


def test_distributions_map_to_the_right_tune_objects():
    from ray.tune.search.sample import Categorical, Float

    space = parse_space({"dimensions": {
        "rank": {"choice": [4, 8]}, "bits": {"grid": [4, 16]}, "target_sparsity": {"uniform": [0.0, 0.5]},
        "lr": {"loguniform": [1e-4, 1e-2]}, "tau": {"value": 100.0},
    }}, "t.yaml")
    t = to_tune(space)
    assert isinstance(t["rank"], Categorical) and t["rank"].categories == [4, 8]
    assert t["bits"] == {"grid_search": [4, 16]}
    assert isinstance(t["target_sparsity"], Float)
    assert (t["target_sparsity"].lower, t["target_sparsity"].upper) == (0.0, 0.5)
    assert type(t["target_sparsity"].get_sampler()).__name__ == "_Uniform"
    assert type(t["lr"].get_sampler()).__name__ == "_LogUniform" and t["lr"].lower == 1e-4
    assert t["tau"] == 100.0
    assert space.grid_size() == 2
    rs = np.random.default_rng(0)
    lr = t["lr"].sample(size=2000, random_state=rs)
    assert 1e-4 <= lr.min() and lr.max() <= 1e-2
    assert abs(np.median(np.log10(lr)) + 3.0) < 0.1  # log-uniform: median at the log midpoint


def test_loguniform_with_zero_draws_exact_zeros_at_the_given_rate():
    t = to_tune(parse_space({"dimensions": {"tau": {"loguniform": [10, 1000], "zero": 0.25}}}))
    draws = t["tau"].sample(size=4000, random_state=np.random.default_rng(1))
    zeros = (draws == 0).mean()
    assert abs(zeros - 0.25) < 0.03
    nz = draws[draws > 0]
    assert nz.min() >= 10 and nz.max() <= 1000 and abs(np.median(np.log10(nz)) - 2.0) < 0.1
    again = t["tau"].sample(size=4000, random_state=np.random.default_rng(1))
    assert np.array_equal(draws, again)  # seeded by Tune's random state
    one = t["tau"].sample(random_state=np.random.default_rng(2))
    assert isinstance(one, float)


@pytest.mark.parametrize("dims, words", [
    ({"ranks": {"choice": [4]}}, ["unknown dimension 'ranks'", "rank"]),
    ({"rank": {"normal": [4, 1]}}, ["dimensions.rank", "unknown distribution 'normal'"]),
    ({"rank": {"uniform": [4, 8]}}, ["dimensions.rank", "discrete"]),
    ({"bits": {"choice": [4, 5]}}, ["dimensions.bits", "value 5", "16 = unquantised"]),
    ({"target_sparsity": {"choice": [0.0, 1.0]}}, ["dimensions.target_sparsity", "value 1.0"]),
    ({"lr": {"loguniform": [0.0, 1e-3]}}, ["dimensions.lr", "low > 0"]),
    ({"lr": {"loguniform": [1e-2, 1e-3]}}, ["dimensions.lr.loguniform", "low < high"]),
    ({"tau": {"choice": [1.0], "zero": 0.2}}, ["dimensions.tau.zero", "only allowed with loguniform"]),
    ({"lr": {"choice": [1e-3], "value": 1e-3}}, ["dimensions.lr", "exactly one distribution"]),
    ({"rank": {"choice": []}}, ["dimensions.rank.choice", "non-empty"]),
])
def test_bad_space_files_name_the_file_and_the_key(tmp_path, dims, words):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"dimensions": dims}))
    with pytest.raises(SpaceError) as e:
        load_space(str(f))
    msg = str(e.value)
    assert str(f) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_unknown_top_level_key_and_missing_file(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("dimension: {rank: {choice: [4]}}\n")
    with pytest.raises(SpaceError, match="unknown top-level key 'dimension'"):
        load_space(str(f))
    with pytest.raises(SpaceError, match="neither a bundled space"):
        load_space("no-such-space")
    assert isinstance(SpaceError("x"), ValueError)


def test_spaces_survive_cloudpickle_for_tuner_restore():
    """Tuner.restore reloads the param_space Ray pickled itself: our custom domain must round-trip."""
    from ray import cloudpickle

    t = to_tune(load_space("default"))
    back = cloudpickle.loads(cloudpickle.dumps(t))
    a = back["tau"].sample(size=50, random_state=np.random.default_rng(3))
    b = t["tau"].sample(size=50, random_state=np.random.default_rng(3))
    assert np.array_equal(a, b) and (a == 0).any() and (a > 0).any()


def test_optuna_space_samples_every_dimension_and_refuses_grid():
    optuna = pytest.importorskip("optuna")
    from tune_spaces.loader import to_optuna

    define = to_optuna(load_space("default"))  # tau: loguniform with a point mass at 0
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    taus = []
    for _ in range(40):
        trial = study.ask()
        const = define(trial)
        cfg = {**trial.params, **const}
        assert cfg["rank"] in (4, 8, 16, 32) and cfg["bits"] in (2, 3, 4, 8, 16) and 0 <= cfg["target_sparsity"] <= 0.5
        assert 1e-4 <= cfg["lr"] <= 3e-3
        taus.append(cfg["tau"])
    assert 0.0 in taus and any(10.0 <= t <= 1000.0 for t in taus)
    with pytest.raises(SpaceError, match="Optuna cannot sample"):
        to_optuna(load_space("demo"))  # bits x sparsity grid
