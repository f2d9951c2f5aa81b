"""Check an export of a real run: `loraflock export` (the CLI), then each exported adapter on the
exported base, loaded with transformers + PEFT, against the run's own figures or model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]


def export_cli(run: Path, out: Path, *args: str) -> dict:
    """Run ``loraflock export RUN --out OUT ARGS`` in a subprocess; return serve.json."""
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "export", str(run), "--out", str(out), *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "vllm serve" in r.stdout
    return json.loads((out / "serve.json").read_text())


def served_model(out: Path, task: str) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    return PeftModel.from_pretrained(base, out / "adapters" / task).eval()


def eval_rows(spec) -> dict[str, torch.Tensor]:
    """Every task's eval rows, built as the job builds them (explicit tasks, bytes tokenizer)."""
    from tasks import build_task_data
    from tasks.tokenizer import load_tokenizer

    data = build_task_data(spec.tasks, load_tokenizer("bytes"), spec.train.seq_len, spec.train.seed)
    return {d.name: d.eval_ids for d in data}


def nll(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def check_flock_export(run: Path, out: Path, spec, *args: str) -> dict:
    """Export the flock; each adapter's eval NLL on the exported base is the report's (1e-4)."""
    manifest = export_cli(run, out, *args)
    rep = json.loads((run / "report.json").read_text())
    rows = eval_rows(spec)
    for a in manifest["adapters"]:
        want = rep["flock"]["tasks"][a["name"]]["eval_loss"]
        got = nll(served_model(out, a["name"]), rows[a["name"]])
        assert abs(got - want) <= 1e-4 * abs(want), (a["name"], got, want)
    return manifest
