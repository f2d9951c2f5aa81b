"""The builtin ``stdlib-instruct`` suite: instruction examples mined offline from the stdlib.

Every docstring of a public function or class in the standard-library packages of
:data:`tasks.spec.STDLIB_PACKAGES` (read with ``ast`` from the installed sources: nothing is
imported or downloaded) gives one example; the package is the task, so task sizes are as
unequal as the packages (``json`` has a few dozen, ``asyncio`` hundreds):

* ``submodule`` (classification, short label completions): the docstring -> the module of
  the package it comes from (``decoder`` for ``json.decoder``; ``__init__`` for the package
  itself). Each task has its own label set, like per-customer intents.
* ``signature`` (generation): a function's docstring -> its ``def`` line
  (``def dumps(obj, *, skipkeys=False, ...):``).

The table holds the columns of every instruction format, so a source may read it as
``prompt_completion`` (``prompt``/``completion``), ``alpaca`` (``instruction``/``input``/
``output``) or ``messages``; a ``package`` column names each row's task for a task set.

Example (YAML)::

    task_sets:
      - name: stdlib-submodule
        source: {kind: builtin, suite: stdlib-instruct, subset: submodule}
        task_field: package
"""

from __future__ import annotations

import ast
from functools import cache
from typing import TYPE_CHECKING

from tasks.builtin.stdlib import package_files, stdlib_root
from tasks.spec import INSTRUCT_SUBSETS, STDLIB_PACKAGES

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["INSTRUCTIONS", "instruct_rows", "instruct_table", "instruct_task_sets"]

INSTRUCTIONS = {
    "submodule": "Which module of the Python `{package}` package has this docstring? Answer with the module name.",
    "signature": "Write the `def` line of the Python `{package}` function with this docstring.",
}
_MAX_DOC = 400  # characters of the docstring's first paragraph


def _first_paragraph(doc: str) -> str:
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())[:_MAX_DOC]


def _def_line(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}:"


@cache
def instruct_rows(subset: str, package: str) -> tuple[tuple[str, str], ...]:
    """(docstring, answer) pairs of one package, in file and source order, first docstring wins.

    Example:
        >>> instruct_rows("submodule", "json")[0]
        ('JSON (JavaScript Object Notation) <https://json.org> is a subset of ...', '__init__')
    """
    if subset not in INSTRUCT_SUBSETS:
        raise ValueError(f"stdlib-instruct has no subset {subset!r}; choose one of {list(INSTRUCT_SUBSETS)}")
    root, out, seen = stdlib_root(), [], set()
    for rel in package_files(package):
        tree = ast.parse((root / rel).read_text(encoding="utf-8"))
        module = rel.with_suffix("").as_posix().split("/", 1)[1].replace("/", ".") if len(rel.parts) > 1 else rel.stem
        nodes = [tree] if subset == "submodule" else []
        nodes += [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and not n.name.startswith("_")]
        for node in nodes:
            if subset == "signature" and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or not _first_paragraph(doc) or _first_paragraph(doc) in seen:
                continue
            seen.add(_first_paragraph(doc))
            out.append((_first_paragraph(doc), module if subset == "submodule" else _def_line(node)))
    return tuple(out)


def instruct_table(subset: str, package: str | None = None) -> Dataset:
    """The suite's table: one package's examples, or every package's with a ``package`` column.

    Columns: ``package``, ``prompt``, ``completion``, ``instruction``, ``input``, ``output``,
    ``messages`` (a user turn and an assistant turn).
    """
    from datasets import Dataset

    cols: dict[str, list] = {
        k: [] for k in ("package", "prompt", "completion", "instruction", "input", "output", "messages")
    }
    for pkg in [package] if package else list(STDLIB_PACKAGES):
        instruction = INSTRUCTIONS[subset].format(package=pkg)
        for doc, answer in instruct_rows(subset, pkg):
            cols["package"].append(pkg)
            cols["prompt"].append(f"{instruction}\n\nDocstring: {doc}\nAnswer: ")
            cols["completion"].append(answer)
            cols["instruction"].append(instruction)
            cols["input"].append(doc)
            cols["output"].append(answer)
            cols["messages"].append(
                [{"role": "user", "content": f"{instruction}\n\n{doc}"}, {"role": "assistant", "content": answer}]
            )
    return Dataset.from_dict(cols)


def instruct_task_sets(min_examples: int = 2, eval_fraction: float = 0.2) -> list:
    """The suite as two task sets split by package: ``stdlib-submodule-*`` and ``stdlib-signature-*``.

    Example:
        >>> [s.name for s in instruct_task_sets()]
        ['stdlib-submodule', 'stdlib-signature']
    """
    from tasks.spec import TaskSetSpec

    return [
        TaskSetSpec(
            name=f"stdlib-{subset}",
            source={"kind": "builtin", "suite": "stdlib-instruct", "subset": subset},
            task_field="package",
            name_prefix=f"{subset}-",
            min_examples=min_examples,
            eval_fraction=eval_fraction,
        )
        for subset in INSTRUCT_SUBSETS
    ]
