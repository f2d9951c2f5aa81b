"""Arguments shared by the benchmarks that run one base with adapters on its top blocks."""

from __future__ import annotations

import argparse

__all__ = ["add_model_args"]


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """``--tiny`` / ``--model`` / ``--top`` / ``--rank``: which base, how many adapted top blocks, which rank."""
    ap.add_argument("--tiny", action="store_true", help="random-init tiny llama (quick check)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--top", type=int, default=None, help="adapted top blocks (default 2; tiny: 1)")
    ap.add_argument("--rank", type=int, default=8)
