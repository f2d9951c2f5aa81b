"""The builtin ``stdlib-code`` suite: one task per Python standard-library package, offline.

Every machine with Python holds the standard library's source, a real multi-task corpus
that needs no download: each package (``json``, ``asyncio``, ...) is a task and each of its
``.py`` files (recursively, tests excluded) is one document. The eval split holds out whole
files (see :func:`tasks.packing.hold_out`, keyed by the file's path), so eval code is never
trained on.

The demo's training caps :data:`DEMO_SIZES` span 32x (8 to 256 sequences), like BoRA's
speakers: the small tasks are where borrowing strength from the others pays off.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.spec import STDLIB_PACKAGES, BuiltinSource, TaskSpec

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "STDLIB_PACKAGES",
    "DEMO_PACKAGES",
    "DEMO_SIZES",
    "DEMO_EVAL_CAP",
    "DEMO_EVAL_FRACTION",
    "stdlib_root",
    "package_files",
    "package_documents",
    "demo_tasks",
]

# training-sequence caps of the demo (>= 10x between the smallest and the largest task)
DEMO_SIZES: dict[str, int] = {"json": 8, "concurrent": 16, "logging": 32, "http": 64, "email": 128, "asyncio": 256}
DEMO_PACKAGES: tuple[str, ...] = tuple(DEMO_SIZES)
DEMO_EVAL_CAP = 32
# held-out share of each package's code. Measured with SmolLM2's tokenizer, 128-token rows,
# seeds 0-5: json keeps 29-36 eval rows, the others >= 41, and every task's training text
# stays well above its cap (json 59+ rows for a cap of 8).
DEMO_EVAL_FRACTION = 0.2

_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_root() -> Path:
    """The installed standard library's source directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def package_files(package: str) -> list[Path]:
    """The package's ``.py`` files relative to :func:`stdlib_root`, sorted, tests excluded."""
    if package not in STDLIB_PACKAGES:
        raise ValueError(f"stdlib-code has no package {package!r}; choose one of {list(STDLIB_PACKAGES)}")
    root = stdlib_root()
    files = []
    for f in sorted((root / package).rglob("*.py")):
        rel = f.relative_to(root)
        if _TEST_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        files.append(rel)
    return files


def package_documents(package: str) -> Dataset:
    """One document per source file: columns ``text`` and ``doc_key`` (the relative path).

    Empty files (bare ``__init__.py``) are skipped.

    Example:
        >>> package_documents("json")["doc_key"][:2]
        ['json/__init__.py', 'json/decoder.py']
    """
    from datasets import Dataset

    from tasks.errors import TaskDataError

    root = stdlib_root()
    texts, keys = [], []
    for rel in package_files(package):
        text = (root / rel).read_text(encoding="utf-8")
        if text.strip():
            texts.append(text)
            keys.append(rel.as_posix())
    if not texts:
        raise TaskDataError(
            f"stdlib-code package {package!r} has no source files under {root} (a stripped Python "
            "install?); use a `kind: files` source instead"
        )
    return Dataset.from_dict({"text": texts, "doc_key": keys})


def demo_tasks(
    packages: list[str] | None = None,
    train_caps: Mapping[str, int] = DEMO_SIZES,
    eval_cap: int | None = DEMO_EVAL_CAP,
    eval_fraction: float = DEMO_EVAL_FRACTION,
) -> list[TaskSpec]:
    """Task specs of the builtin demo: one stdlib package per task.

    Args:
        packages: which packages (default :data:`DEMO_PACKAGES`); any of :data:`STDLIB_PACKAGES`.
        train_caps: package -> max training sequences (a package not listed is uncapped).
        eval_cap: max eval sequences per task.
        eval_fraction: share of each package's code held out (whole files).

    Example:
        >>> [t.max_train_sequences for t in demo_tasks(["json", "asyncio"])]
        [8, 256]
    """
    return [
        TaskSpec(
            name=p,
            source=BuiltinSource(package=p),
            max_train_sequences=train_caps.get(p),
            max_eval_sequences=eval_cap,
            eval_fraction=eval_fraction,
        )
        for p in (DEMO_PACKAGES if packages is None else packages)
    ]
