"""Which dtype each stage's base has (issue 21, item 5): bf16 in the store for GPU workers, fp32 on CPUs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.base.load import load_job_base, run_dtype, store_dtype
from orchestrator.base.store import model_from_arrays
from orchestrator.flock.driver import _base_arrays
from orchestrator.spec import JobSpec
from tests.orchestrator.conftest import tiny_job_spec


def _spec(use_gpu: bool, dtype: str = "auto", bits: int | None = None) -> JobSpec:
    d = tiny_job_spec().model_dump(mode="json", exclude_unset=True)
    d["ray"] = {"use_gpu": use_gpu}
    d["base"]["dtype"] = dtype
    if bits:
        d["base"]["bits"] = bits
    return JobSpec.model_validate(d)


def test_store_and_run_dtypes():
    assert store_dtype(_spec(False)) == "float32"
    assert store_dtype(_spec(True)) == "bfloat16"  # auto on a GPU
    assert store_dtype(_spec(True, "float32")) == "float32"
    assert run_dtype(_spec(True), "cpu") == "float32"
    assert run_dtype(_spec(True), "cuda") == "auto"  # resolved to bf16 by load_base on the device
    assert run_dtype(_spec(True, "float16"), "cuda:0") == "float16"


@pytest.mark.parametrize("bits", [None, 4])
def test_gpu_workers_share_a_bf16_base_and_convert_nothing_on_the_host(bits):
    spec = _spec(True, bits=bits)
    state = _base_arrays._function(spec.model_dump(mode="json"))  # the driver's remote task, run here
    arrays = state["arrays"]
    from models.base import load_config

    model = model_from_arrays(state, load_config(random_init=spec.base.random_init))
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    assert params and all(state["torch_dtypes"][n] == "bfloat16" for n in params)  # every stored weight
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    for n, p in params.items():  # the model's weights are the stored bytes themselves
        assert p.dtype == torch.bfloat16
        assert p.data_ptr() == arrays[n].__array_interface__["data"][0]
    # What the worker does before its device copy: with the store in the run's dtype, no host conversion.
    model = model.to(dtype=torch.bfloat16)
    assert {n: p.data_ptr() for n, p in model.named_parameters() if p.is_floating_point()} == ptrs
    ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
        ref = load_job_base(spec, "cpu", "float32")
        if bits is None:  # same weights rounded to bf16: logits close to the fp32 base's
            want = ref(input_ids=ids).logits
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0.05, atol=0.05)
    if bits:
        quant = state["quant"]  # packed codes (uint8, fp16 scales) and fp32 LQ factors stay as they were
        assert quant["modules"] and quant["lq"]
        assert all(state["torch_dtypes"][f"{n}.codes"] == "uint8" for n in quant["modules"])
        assert all(v.dtype == np.float32 for f in quant["lq"].values() for v in f.values())


def test_cpu_workers_keep_an_fp32_store():
    state = _base_arrays._function(_spec(False).model_dump(mode="json"))
    assert {v for v in state["torch_dtypes"].values()} == {"float32"}
