"""Export a finished run for multi-LoRA servers (vLLM ``--enable-lora``, LoRAX, S-LoRA).

Example:
    >>> from orchestrator.export import export_run
    >>> export_run("runs/tiny", "exports/tiny", what="flock")["vllm"]
"""

from orchestrator.export.driver import build_bundle, export_run
from orchestrator.export.run_dir import ExportError, open_run

__all__ = ["export_run", "build_bundle", "open_run", "ExportError"]
