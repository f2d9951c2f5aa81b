"""``serve.json`` and ``README.md`` of an export: what a multi-LoRA server is told to load.

vLLM takes ``--enable-lora --lora-modules name=path ...`` and a ``--max-lora-rank`` from a
fixed set of sizes; LoRAX loads adapters by path per request. Neither runs on this
project's CPU-only test machines, so the commands are written here and checked for shape
only; the equivalence test loads the same files with ``transformers`` + PEFT.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

__all__ = ["vllm_rank", "vllm_command", "write_serve_files", "SERVE_FILE", "FORMAT"]

SERVE_FILE = "serve.json"
FORMAT = "loraflock-export/1"
_VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values


def vllm_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    return next((r for r in _VLLM_RANKS if r >= rank), rank)


def vllm_command(out: Path, adapters: list[dict], rank: int) -> str:
    """``vllm serve BASE --enable-lora --max-lora-rank R --max-loras N --lora-modules a=path ...``."""
    mods = " ".join(shlex.quote(f"{a['name']}={out / a['path']}") for a in adapters)
    return (f"vllm serve {shlex.quote(str(out / 'base'))} --enable-lora --max-lora-rank {vllm_rank(rank)} "
            f"--max-loras {max(1, len(adapters))} --lora-modules {mods}")


def write_serve_files(tmp: Path, out: Path, manifest: dict) -> None:
    """Write ``serve.json`` and ``README.md`` into ``tmp`` (the export's temporary directory)."""
    (tmp / SERVE_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    first = manifest["adapters"][0]["name"] if manifest["adapters"] else "TASK"
    lines = [
        f"# loraflock export of `{manifest['run']}` ({manifest['what']})", "",
        "A plain Hugging Face base (`base/`, safetensors + config) and one PEFT LoRA adapter per task "
        "(`adapters/<task>/`), for a multi-LoRA server on one base.", "",
        "## Serve with vLLM", "", "```bash", manifest["vllm"], "```", "",
        "then ask for an adapter by name: `\"model\": \"" + first + "\"` in an OpenAI-style request. "
        "vLLM needs a GPU and was not run where this export was made (loraflock's tests check the same files "
        "with transformers + PEFT, below).", "",
        "## Load with transformers + PEFT", "", "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        "",
        f"base = AutoModelForCausalLM.from_pretrained(\"{out / 'base'}\")",
        f"model = PeftModel.from_pretrained(base, \"{out / 'adapters' / first}\")",
        "```", "",
        "## Adapters", "", "| adapter | rank | truncation error |", "|---|---:|---:|",
    ]
    lines += [f"| {a['name']} | {a['rank']} | {a['truncation_rel_error']:.3g} |" for a in manifest["adapters"]]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in manifest["notes"]] + [""]
    (tmp / "README.md").write_text("\n".join(lines), encoding="utf-8")
