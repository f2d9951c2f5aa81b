"""`search.pick` with `search.quantize_layers: all`, end to end on a real local Ray (integration):
the picked trial's whole quantised base is written where a user finds it, recycling and the
export rebuild that trial on it, and what was written gives the NLL the trial was judged by."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.orchestrator.conftest import run_job_cli

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "examples" / "tiny.yaml"
SPACE = {  # one gated trial on a whole base quantised to 6 bits per weight on average
    "description": "one whole-base trial",
    "dimensions": {"bit_budget": {"grid": [6.0]}, "target_sparsity": {"grid": [0.3]}, "rank": {"value": 4},
                   "tau": {"value": 100.0}, "lr": {"value": 0.003}},
}


@pytest.mark.integration
def test_a_picked_whole_base_trial_is_recycled_and_exported_on_its_quantised_base(tmp_path):
    from models.lora import task_ids
    from orchestrator.base.load import load_job_base
    from orchestrator.base.quant import NOTE_FILE, load_quant_base
    from orchestrator.search.pick import load_picked_model
    from orchestrator.spec import load_job
    from tests.orchestrator.export.served import eval_rows, export_cli, nll, served_model

    job = yaml.safe_load(TINY.read_text())
    job["flock"]["enabled"] = False
    job["pesc"]["enabled"] = False
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    job["search"].update({"space": str(tmp_path / "space.yaml"), "num_samples": 1, "quantize_layers": "all",
                          "pick": {"max_bytes": 10**9}})
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(job))
    out = tmp_path / "out"
    rep = run_job_cli(spec_path, out)
    picked = rep["search"]["picked"]
    assert picked["met"] and picked["base_setting"] == "budget6" and picked["quant_base"] == "search/pick/quant_base"
    qdir = out / picked["quant_base"]
    section = json.loads((qdir / "quant.json").read_text())
    assert section["setting"] == {"bit_budget": 6.0} and section["layers"] == [0]
    assert rep["recycle"]["source"] == "search.picked"
    assert rep["recycle"]["picked"]["quant_base"] == picked["quant_base"]
    assert f"`{picked['quant_base']}/`" in (out / "report.md").read_text()
    note = json.loads((out / "search" / "pick" / "adapters" / "json" / NOTE_FILE).read_text())
    assert (out / "search" / "pick" / "adapters" / "json" / note["packed_base"]).resolve() == qdir.resolve()

    # the written quantised base: block 0 and the embedding differ from the float base
    spec = load_job(spec_path)
    dense = load_job_base(spec, "cpu", "float32")
    quantised = load_job_base(spec, "cpu", "float32")
    names = load_quant_base(quantised, qdir)
    assert len(names) == 1 + len(section["matrices"]) and all(".layers.0." in n for n in names[:-1])

    def weight(model: torch.nn.Module, name: str) -> torch.Tensor:
        m = model.get_submodule(name)
        return m.dequantized_weight() if hasattr(m, "dequantized_weight") else m.weight.detach()

    for n in names:
        assert not torch.allclose(weight(quantised, n), weight(dense, n), atol=1e-4), n

    # the export of the pick: its base holds exactly those codes, and it gives the trial's reported NLL
    m = export_cli(out, tmp_path / "exp", "--what", "pick")
    assert m["kind"] == "picked" and any("whole base is quantised" in n for n in m["notes"])
    rows = eval_rows(spec)
    served = {t: served_model(tmp_path / "exp", t) for t in rows}
    base = served["json"].get_base_model()
    for n in names:
        assert torch.equal(base.get_submodule(n).weight.detach(), weight(quantised, n)), n
    got = sum(math.exp(nll(served[t], rows[t])) for t in rows) / len(rows)
    assert got == pytest.approx(picked["macro_ppl"], rel=1e-4)
    trial = load_picked_model(spec, picked, out / picked["checkpoint"])  # the rebuilt trial agrees

    def rel(t: str, slot: int) -> float:
        with torch.no_grad(), task_ids(trial, slot):
            want = trial(input_ids=rows[t]).logits
        with torch.no_grad():
            return float((served[t](input_ids=rows[t]).logits - want).norm() / want.norm())

    assert all(rel(t, slot) < 1e-5 for slot, t in enumerate(rows))
    # the float frozen blocks and embedding (what a pick rebuilt before) are another model
    with torch.no_grad():
        for t in rows:
            for n in names:
                served[t].get_base_model().get_submodule(n).weight.copy_(weight(dense, n))
    assert all(rel(t, slot) > 1e-3 for slot, t in enumerate(rows))

    rc = export_cli(out, tmp_path / "exp-recycle", "--what", "recycle")  # the recycled adapters, same base
    assert rc["kind"] == "recycled" and any("whole base is quantised" in n for n in rc["notes"])

