"""EigenLoRAx subspace: exact recovery, K selection, storage, files, PEFT sources."""

from __future__ import annotations

import pytest
import torch

from models.base import load_base
from models.eigen.subspace import Subspace, SubspaceError, build_subspace, load_peft_adapters
from models.lora import inject, lora_layers
from models.peft_io import save_adapter, write_adapter_dir
from tests.conftest import TINY_LLAMA

SHAPES = {"l.0.q": (12, 20), "l.0.v": (16, 20)}  # module -> (m, n)


def _orthonormal(d: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def _spanning_adapters(k: int, ranks: list[int], seed: int = 0) -> dict:
    """Adapters whose B columns / A rows lie in fixed k-dimensional subspaces per module."""
    g = torch.Generator().manual_seed(seed)
    spans = {n: (_orthonormal(m, k, g), _orthonormal(nn, k, g)) for n, (m, nn) in SHAPES.items()}
    out = {}
    for t, r in enumerate(ranks):
        out[f"task{t}"] = {
            n: (
                (u_a @ torch.randn(k, r, generator=g, dtype=torch.float64)).T.float(),
                (u_b @ torch.randn(k, r, generator=g, dtype=torch.float64)).float(),
            )
            for n, (u_b, u_a) in spans.items()
        }
    return out


def _delta(adapter, scale):
    return {n: scale * b.double() @ a.double() for n, (a, b) in adapter.items()}


def test_adapters_spanning_k_dimensions_are_reconstructed_exactly():
    ranks, scales = [3, 2, 4, 3, 2, 4], {f"task{t}": 2.0 / (t + 1) for t in range(6)}
    adapters = _spanning_adapters(k=5, ranks=ranks)
    sub = build_subspace(adapters, k=5, scales=scales)
    assert {b.k for b in sub.modules.values()} == {5}
    for t, adapter in adapters.items():
        assert sub.rel_error[t] < 1e-5
        rec, want = _delta(sub.reconstruct(t), scales[t]), _delta(adapter, scales[t])
        for n in SHAPES:
            torch.testing.assert_close(rec[n], want[n], atol=1e-5, rtol=1e-4)
        assert [sub.coefficients[t][n][0].shape for n in SHAPES] == [(5, ranks[int(t[-1])])] * 2
    # one direction fewer cannot reconstruct them
    smaller = build_subspace(adapters, k=4, scales=scales)
    assert min(smaller.rel_error.values()) > 1e-3
    for b in sub.modules.values():  # bases are orthonormal
        torch.testing.assert_close(b.basis_B.T @ b.basis_B, torch.eye(5), atol=1e-5, rtol=0)


def test_explained_variance_threshold_picks_the_smallest_k():
    g = torch.Generator().manual_seed(1)
    adapters = {
        f"t{i}": {
            n: (torch.randn(4, nn, generator=g), torch.randn(m, 4, generator=g) * torch.tensor([3.0, 1.0, 0.3, 0.1]))
            for n, (m, nn) in SHAPES.items()
        }
        for i in range(5)
    }
    for thr in (0.5, 0.8, 0.95):
        sub = build_subspace(adapters, explained_variance=thr)
        for n, basis in sub.modules.items():
            ks = []
            for side, x in (
                ("B", torch.cat([adapters[t][n][1] for t in adapters], 1)),
                ("A", torch.cat([adapters[t][n][0].T for t in adapters], 1)),
            ):
                xc = (x - x.mean(1, keepdim=True)).double()
                evals = torch.linalg.eigvalsh(xc @ xc.T).flip(0).clamp_min(0)  # reference: covariance spectrum
                cum = torch.cumsum(evals, 0) / evals.sum()
                ks.append(int((cum < thr - 1e-12).sum()) + 1)
                v = getattr(basis, f"basis_{side}")[:, : ks[-1]].double()
                residual = xc - v @ (v.T @ xc)
                assert abs(float(cum[ks[-1] - 1]) - (1 - residual.pow(2).sum() / xc.pow(2).sum())) < 1e-5
            assert basis.k == max(ks)
            assert min(basis.explained_variance.values()) >= thr - 1e-6


def test_storage_counts_and_ratio():
    ranks = [4] * 8
    sub = build_subspace(_spanning_adapters(k=3, ranks=ranks), k=3)
    subspace_numbers = sum(m + n + 3 * (m + n) for m, n in SHAPES.values())
    coefficient_numbers = len(ranks) * sum(2 * 3 * 4 for _ in SHAPES)
    full_numbers = len(ranks) * sum(4 * (m + n) for m, n in SHAPES.values())
    assert sub.storage_bytes() == 4 * (subspace_numbers + coefficient_numbers)
    assert sub.full_bytes() == 4 * full_numbers
    assert sub.storage_ratio == pytest.approx((subspace_numbers + coefficient_numbers) / full_numbers)
    summary = sub.summary()
    assert summary["k"] == 3 and summary["storage_ratio"] < 1 and summary["reconstruction_rel_error"] < 1e-5


def test_save_load_round_trip(tmp_path):
    adapters = _spanning_adapters(k=4, ranks=[2, 3, 4])
    sub = build_subspace(adapters, explained_variance=0.9, scales={"task0": 0.5, "task1": 2.0, "task2": 1.0})
    sub.save(tmp_path / "sub")
    back = Subspace.load(tmp_path / "sub")
    assert back.tasks == sub.tasks and back.scales == sub.scales and back.rel_error == sub.rel_error
    assert back.summary() == sub.summary()
    for n, b in sub.modules.items():
        for part in ("mean_A", "basis_A", "mean_B", "basis_B"):
            assert torch.equal(getattr(back.modules[n], part), getattr(b, part))
    for t in sub.tasks:
        for n, (a, b) in sub.reconstruct(t).items():
            assert torch.equal(back.reconstruct(t)[n][0], a) and torch.equal(back.reconstruct(t)[n][1], b)
    (tmp_path / "sub" / "subspace.safetensors").write_bytes(b"")
    with pytest.raises(SubspaceError, match="safetensors"):
        Subspace.load(tmp_path / "sub")
    with pytest.raises(SubspaceError, match="subspace.json"):
        Subspace.load(tmp_path / "nowhere")


def test_bad_settings_give_clear_errors():
    adapters = _spanning_adapters(k=2, ranks=[2, 2])
    with pytest.raises(SubspaceError, match="exactly one"):
        build_subspace(adapters, k=2, explained_variance=0.9)
    with pytest.raises(SubspaceError, match="exactly one"):
        build_subspace(adapters)
    with pytest.raises(SubspaceError, match="explained_variance"):
        build_subspace(adapters, explained_variance=1.5)
    adapters["task1"] = {"l.0.q": adapters["task1"]["l.0.q"]}
    with pytest.raises(SubspaceError, match="'l.0.v'"):
        build_subspace(adapters, k=2)


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_peft_directories_are_read_and_reexported(tmp_path):
    model = load_base(random_init=TINY_LLAMA, seed=0)
    inject(model, ["q_proj", "v_proj"], num_tasks=3, rank=[4, 2, 3], alpha=8.0, layers=[1])
    _randomise(model, seed=2)
    dirs = [save_adapter(model, t, tmp_path / f"task{t}", "tiny") for t in range(3)]
    adapters, scales = load_peft_adapters(dirs)
    assert list(adapters) == ["task0", "task1", "task2"]
    assert scales["task1"]["model.layers.1.self_attn.q_proj"] == pytest.approx(8.0 / 2)
    for t in range(3):
        for name, layer in lora_layers(model).items():
            torch.testing.assert_close(adapters[f"task{t}"][name][0], layer.task_A(t).detach())
            torch.testing.assert_close(adapters[f"task{t}"][name][1], layer.task_B(t).detach())
    sub = build_subspace(adapters, k=9, scales=scales)  # 9 = all columns: exact
    assert max(sub.rel_error.values()) < 1e-5
    sub.export_peft("task1", tmp_path / "rec1", "tiny")
    again, again_scales = load_peft_adapters({"rec": tmp_path / "rec1"})
    for name, layer in lora_layers(model).items():
        a, b = again["rec"][name]
        want = layer.delta_weight(1).detach()
        torch.testing.assert_close(again_scales["rec"][name] * b @ a, want, atol=1e-6, rtol=1e-4)


def test_mismatched_directories_name_the_directory_and_module(tmp_path):
    g = torch.Generator().manual_seed(0)
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"

    def write(d, shapes):
        tensors = {}
        for n, (r, i, o) in shapes.items():
            tensors[f"base_model.model.{n}.lora_A.weight"] = torch.randn(r, i, generator=g)
            tensors[f"base_model.model.{n}.lora_B.weight"] = torch.randn(o, r, generator=g)
        write_adapter_dir(d, tensors, {n: s[0] for n, s in shapes.items()}, {n: 8.0 for n in shapes})
        return d

    good = write(tmp_path / "good", {q: (4, 64, 64), v: (4, 64, 32)})
    fewer = write(tmp_path / "fewer", {q: (4, 64, 64)})
    wider = write(tmp_path / "wider", {q: (2, 64, 64), v: (2, 64, 48)})
    with pytest.raises(SubspaceError, match=r"fewer.*lacks module.*v_proj"):
        load_peft_adapters([good, fewer])
    with pytest.raises(SubspaceError, match=r"wider.*v_proj.*64->48.*64->32"):
        load_peft_adapters([good, wider])
    with pytest.raises(SubspaceError, match="adapter_config.json"):
        load_peft_adapters([good, tmp_path / "missing"])
    adapters, _ = load_peft_adapters([good, write(tmp_path / "rank2", {q: (2, 64, 64), v: (2, 64, 32)})])
    assert adapters["rank2"][q][0].shape == (2, 64)  # ranks may differ


def test_adapter_without_lora_pairs_is_a_clear_error(tmp_path):
    import json as _json

    from safetensors.torch import save_file

    d = tmp_path / "broken"
    d.mkdir()
    (d / "adapter_config.json").write_text(_json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 4)}, str(d / "adapter_model.safetensors"))
    with pytest.raises(SubspaceError, match="adapter_model.safetensors has no complete lora_A/lora_B pairs"):
        load_peft_adapters([d])
