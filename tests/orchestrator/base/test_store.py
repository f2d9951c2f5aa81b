"""The shared base: same logits as the original, weights that ARE the object-store buffer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.base import load_base
from models.lora import inject, task_ids
from orchestrator.base.store import (
    BaseStoreError,
    base_arrays,
    load_base_shared,
    model_from_arrays,
    object_store_bytes,
    private_copy,
    put_base,
)
from tests.conftest import TINY_GPT2, TINY_LLAMA

TIED_LLAMA = dict(TINY_LLAMA, tie_word_embeddings=True)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(vocab=300, n=3, length=12):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("config", [TIED_LLAMA, TINY_LLAMA, TINY_GPT2], ids=["llama-tied", "llama", "gpt2"])
def test_rebuilt_model_gives_identical_logits_and_maps_the_store(local_ray, config):
    original = load_base(random_init=config, seed=3)
    ref = put_base(original)
    shared = load_base_shared(ref, random_init=config)
    assert torch.equal(_logits(shared, _ids()), _logits(original, _ids()))
    # Zero copy: every weight lies in the object store's shared mapping, none is private.
    in_store, total = object_store_bytes(shared)
    assert total == sum(a.nbytes for a in local_ray.get(ref)["arrays"].values())
    assert in_store == total
    # ... and it is exactly the buffer ray.get hands out (same address, same bytes).
    arrays = local_ray.get(ref)["arrays"]
    name, param = next(iter(shared.named_parameters()))
    assert param.data_ptr() == arrays[name].__array_interface__["data"][0]
    assert not arrays[name].flags.writeable
    assert not any(p.requires_grad for p in shared.parameters())
    assert object_store_bytes(original)[0] == 0  # the check can fail: a private model is not shared


def test_tied_embeddings_stay_tied_and_are_stored_once(local_ray):
    original = load_base(random_init=TIED_LLAMA, seed=1)
    assert original.lm_head.weight is original.model.embed_tokens.weight
    state = base_arrays(original)
    assert "lm_head.weight" not in state["arrays"]  # one tensor, stored once
    shared = load_base_shared(put_base(original), random_init=TIED_LLAMA)
    assert shared.lm_head.weight is shared.model.embed_tokens.weight
    assert not any(t.is_meta for t in list(shared.parameters()) + list(shared.buffers()))


def test_lora_on_top_of_shared_base_trains_and_matches_private(local_ray):
    original = load_base(random_init=TIED_LLAMA, seed=2)
    ref = put_base(original)
    shared = load_base_shared(ref, random_init=TIED_LLAMA)
    before = {n: p.detach().clone() for n, p in shared.named_parameters()}
    for model in (original, shared):
        inject(model, ["q_proj", "v_proj"], num_tasks=3, rank=4, alpha=8)
        gen = torch.Generator().manual_seed(0)  # same non-zero adapters in both models
        for p in (p for p in model.parameters() if p.requires_grad):
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ids, route = _ids(), torch.tensor([0, 2, 1])
    with task_ids(original, route):
        want = _logits(original, ids)
    with task_ids(shared, route):
        out = shared(input_ids=ids).logits
        assert torch.equal(out.detach(), want)
        out.float().pow(2).mean().backward()
        opt = torch.optim.SGD([p for p in shared.parameters() if p.requires_grad], lr=0.1)
        opt.step()
    # Training the adapters never wrote the shared base.
    for n, p in shared.named_parameters():
        base_name = n.replace(".base_layer", "")
        if base_name in before:
            assert torch.equal(p, before[base_name]), n
    in_store, total = object_store_bytes(shared)  # adapters are private, the base is not
    assert in_store == sum(a.nbytes for a in local_ray.get(ref)["arrays"].values()) < total


def test_bfloat16_roundtrip_without_ray():
    original = load_base(random_init=TINY_LLAMA, seed=0).to(torch.bfloat16)
    state = base_arrays(original)
    assert state["torch_dtypes"]["model.embed_tokens.weight"] == "bfloat16"
    rebuilt = model_from_arrays(state, original.config)
    assert rebuilt.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(_logits(rebuilt, _ids()), _logits(original, _ids()))


def test_wrong_architecture_is_a_clear_error():
    state = base_arrays(load_base(random_init=TINY_LLAMA))
    with pytest.raises(BaseStoreError, match="shape"):
        load_base_shared(state, random_init=dict(TINY_LLAMA, hidden_size=32))
    with pytest.raises(BaseStoreError, match="another architecture"):
        load_base_shared(state, random_init=TINY_GPT2)


def test_private_copy_detaches_from_the_store_and_keeps_ties(local_ray):
    original = load_base(random_init=TIED_LLAMA, seed=0)
    ref = put_base(original)
    model = private_copy(load_base_shared(ref, random_init=TIED_LLAMA))
    assert object_store_bytes(model)[0] == 0
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)  # now safe: the store is untouched
    stored = local_ray.get(ref)["arrays"]["model.embed_tokens.weight"]
    assert np.array_equal(stored, original.model.embed_tokens.weight.numpy())


def test_a_ray_worker_maps_the_same_store(local_ray):
    original = load_base(random_init=TIED_LLAMA, seed=4)
    ref = put_base(original)

    @local_ray.remote(num_cpus=1)
    def in_worker(refs):
        import torch as th

        from orchestrator.base.store import load_base_shared as load
        from orchestrator.base.store import object_store_bytes as osb

        th.set_num_threads(1)
        model = load(refs[0], random_init=TIED_LLAMA)
        ids = th.randint(0, 300, (3, 12), generator=th.Generator().manual_seed(0))
        with th.no_grad():
            return model(input_ids=ids).logits, osb(model)

    logits, (in_store, total) = local_ray.get(in_worker.remote([ref]))
    assert torch.equal(logits, _logits(original, _ids()))
    assert in_store == total > 0


def test_quantised_base_is_stored_packed_and_workers_map_it_read_only(local_ray):
    """base.bits: the store holds codes/scales/codebooks + LQ factors; a worker's QuantizedLinear
    layers are views of those read-only buffers (no fp32 copy), and the worker's model (inject +
    LQ init from the stored factors) computes exactly what the quantised model does."""
    from models.quant.linear import QuantizedLinear
    from models.quant.model import apply_lq_init
    from orchestrator.base.quant import build_quant_base
    from orchestrator.base.store import lq_factors
    from orchestrator.spec import parse_job

    spec = parse_job({
        "base": {"random_init": TINY_LLAMA, "tokenizer": "bytes", "bits": 3, "quant": {"quantizer": "vq"}},
        "tasks": [{"name": "a", "source": {"kind": "builtin", "package": "json"}}],
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "top_layers": 1},
    })
    driver = load_base(random_init=TINY_LLAMA, seed=5)
    summary, factors = build_quant_base(driver, spec)
    ref = local_ray.put(base_arrays(driver, factors, summary))
    state = local_ray.get(ref)
    assert state["quant"]["summary"]["stored_bytes"] == summary["stored_bytes"]
    worker = load_base_shared(state, random_init=TINY_LLAMA)
    layers = {n: m for n, m in worker.named_modules() if isinstance(m, QuantizedLinear)}
    assert sorted(layers) == sorted(state["quant"]["modules"]) and len(layers) == 7
    for name, layer in layers.items():
        for part in ("codes", "scales", "codebook"):
            arr = state["arrays"][f"{name}.{part}"]
            assert getattr(layer, part).data_ptr() == arr.__array_interface__["data"][0] or arr.size == 0
            assert not arr.flags.writeable
        assert layer.codes.dtype == torch.uint8 and layer.codebook.shape == (64, 2)  # 3-bit VQ on pairs
        assert not hasattr(layer, "weight") and not layer.cache_weight
    assert sum(m.nbytes for m in layers.values()) == summary["stored_bytes"]
    in_store, total = object_store_bytes(worker)
    assert in_store == total  # every byte of the worker's base, packed codes included, is the store's
    fp32_weights = sum(
        p.numel() for n, p in worker.named_parameters() if ".layers.1." in n and n.endswith("proj.weight")
    )
    assert fp32_weights == 0  # no dequantised copy of a quantised matrix is kept
    stored_factors = lq_factors(state)
    assert sorted(stored_factors) == sorted(factors)
    for model, fac in ((driver, factors), (worker, stored_factors)):
        torch.manual_seed(0)
        inject(model, ["q_proj", "v_proj"], num_tasks=2, rank=4, alpha=8, layers=[1])
        apply_lq_init(model, fac)
    with task_ids(driver, 1), task_ids(worker, 1):
        assert torch.equal(_logits(worker, _ids()), _logits(driver, _ids()))
