"""Instruction examples -> token ids + a scored-token mask, one example at a time, tokenised in batch.

An example is a prompt and a completion; the loss sees the completion only (unless
``train_on_prompt``). How each format becomes (prompt, completion) text:

* ``prompt_completion``: ``prompt`` then ``completion``, nothing added between them (put
  any separator in the data); EOS is appended and scored, so the model learns to stop.
* ``alpaca``: the Stanford Alpaca prompt around ``instruction`` (and ``input`` when not
  empty), then ``output`` + EOS.
* ``messages``: the whole conversation rendered by the chat template
  (``tokenizer.apply_chat_template(..., tokenize=False)``), tokenised once with offsets;
  a token is scored when it overlaps an assistant turn's span. A turn's span runs from the
  end of the conversation rendered up to that turn with ``add_generation_prompt=True`` to the
  end of the conversation rendered through that turn, so it holds the reply and the
  template's end-of-turn marker (``<|im_end|>``), as Axolotl's ``train_on_eos: turn``. Where a
  template does not render prefixes as prefixes, the span is the reply text itself. The
  template runs once per role sequence (not once per row) when it inserts each content
  verbatim (see ``_Structure``): 200,000 chats render in about a second instead of ~20 s.

No BOS is added (raw-text packing adds none either); chat templates add their own.
Special-token strings in prompts and completions are tokenised as text; in a rendered
conversation they are the template's markers and are parsed as special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tasks.errors import TaskDataError
from tasks.spec import ExampleFields

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "CHATML",
    "ROLES",
    "Examples",
    "encode_examples",
    "resolve_chat_template",
]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
# the ``chat_template: chatml`` override (ChatML, as Axolotl's and LLaMA-Factory's ``chatml``)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")
_NAMED_TEMPLATES = {"chatml": CHATML}


@dataclass
class Examples:
    """Tokenised examples of one table (``n`` usable ones).

    Attributes:
        ids: per example, int32 token ids (T_i,).
        scored: per example, bool (T_i,): the token is a target.
        keep_from: (n,) index of the first token of the final completion (the last assistant
            turn): left truncation may cut only tokens before it.
        rows: (n,) each example's row in the table.
        empty: table rows skipped because they hold nothing to score (empty completion).
        target_field: the column of the completions (named in truncation errors).
        format: the example format.
    """

    ids: list[np.ndarray]
    scored: list[np.ndarray]
    keep_from: np.ndarray
    rows: np.ndarray
    empty: int
    target_field: str
    format: str

    def __len__(self) -> int:
        return len(self.ids)


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, override: str | None, task: str, where: str = "?") -> str:
    """The chat template to render ``messages`` with: the job's override, else the tokenizer's.

    Args:
        override: the job's ``chat_template:`` (``chatml`` or a jinja template), or ``None``.

    Raises:
        TaskDataError: no override and the tokenizer has no template (the message says what to set).
    """
    if override is not None:
        return _NAMED_TEMPLATES.get(override, override)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise TaskDataError(
            f"task {task!r}: {where!r} is read as example_format messages, "
            "rendered with the tokenizer's chat template, but tokenizer "
            f"{tokenizer.name_or_path!r} has none; set `chat_template: chatml` (or a jinja template string) at the top "
            "level of the job"
        )
    return template


def _strings(ds: Dataset, col: str | None) -> list[str]:
    """A string column as Python strings, null -> ''; an absent column -> all ''."""
    if col is None or col not in ds.column_names:
        return [""] * len(ds)
    return ["" if v is None else v for v in ds.with_format("arrow")[:][col].to_pylist()]


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, split_special_tokens=True
    )["input_ids"]


def _eos(tokenizer: PreTrainedTokenizerBase) -> int:
    from tasks.tokenizer import TokenizerError

    if tokenizer.eos_token_id is None:
        raise TokenizerError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end each completion")
    return int(tokenizer.eos_token_id)


def _pairs(
    prompts: list[str], completions: list[str], tokenizer, train_on_prompt: bool, target: str, fmt: str
) -> Examples:
    keep = np.flatnonzero(np.array([bool(c) for c in completions], dtype=bool))
    eos = _eos(tokenizer)
    p_ids = _tokenize(tokenizer, [prompts[i] for i in keep])
    c_ids = _tokenize(tokenizer, [completions[i] for i in keep])
    ids, scored, keep_from = [], [], np.empty(len(keep), dtype=np.int64)
    for j, (p, c) in enumerate(zip(p_ids, c_ids)):
        ids.append(np.array([*p, *c, eos], dtype=np.int32))
        m = np.ones(len(p) + len(c) + 1, dtype=bool)
        if not train_on_prompt:
            m[: len(p)] = False
        scored.append(m)
        keep_from[j] = len(p)
    return Examples(ids, scored, keep_from, keep, len(prompts) - len(keep), target, fmt)


def _alpaca_prompt(instruction: str, inp: str) -> str:
    # str.replace, not str.format: the user's text may hold braces
    if inp:
        return ALPACA_PROMPT.replace("{instruction}", instruction, 1).replace("{input}", inp, 1)
    return ALPACA_PROMPT_NO_INPUT.replace("{instruction}", instruction, 1)


def _check_messages_column(ds: Dataset, f: ExampleFields, task: str, where: str) -> None:
    feature = ds.features[f.messages_field]
    inner = getattr(feature, "feature", None)
    if inner is None and isinstance(feature, list) and feature:
        inner = feature[0]
    if not isinstance(inner, dict):
        raise TaskDataError(
            f"task {task!r}: column {f.messages_field!r} of {where!r} holds {feature}, not a list of turns; "
            f"point source.messages_field at a column of [{{{f.role_field}: ..., {f.content_field}: ...}}] lists"
        )
    for setting, key in (("role_field", f.role_field), ("content_field", f.content_field)):
        if key not in inner:
            raise TaskDataError(
                f"task {task!r}: the turns in column {f.messages_field!r} of {where!r} have no key {key!r} "
                f"(source.{setting}); their keys are {sorted(inner)}: set source.{setting} to one of them"
            )


def _conversations(ds: Dataset, f: ExampleFields, task: str, where: str, row_ids: np.ndarray) -> list[list[dict]]:
    _check_messages_column(ds, f, task, where)
    out = []
    for i, turns in enumerate(ds.with_format("arrow")[:][f.messages_field].to_pylist()):
        row = int(row_ids[i])
        conv = []
        for turn in turns or []:
            role = turn.get(f.role_field)
            role = f.role_map.get(role, role)
            if role not in ROLES:
                raise TaskDataError(
                    f"task {task!r}: row {row} of {where!r}, field {f.messages_field!r}: unknown role {role!r}; roles "
                    f"must be {list(ROLES)}: map the data's names with source.role_map "
                    "(e.g. {human: user, gpt: assistant})"
                )
            content = turn.get(f.content_field) or ""
            if not isinstance(content, str):
                raise TaskDataError(
                    f"task {task!r}: row {row} of {where!r}, field {f.messages_field!r}: a {role} turn's "
                    f"{f.content_field!r} holds {type(content).__name__}, not text; "
                    "give each turn's content as a string"
                )
            conv.append({"role": role, "content": content})
        if not any(t["role"] == "assistant" for t in conv):
            raise TaskDataError(
                f"task {task!r}: row {row} of {where!r}, field {f.messages_field!r} has no assistant turn, so nothing "
                "to train on; remove the row, or map its reply role to assistant with source.role_map"
            )
        out.append(conv)
    return out


def _render(tokenizer, conv: list[dict], template: str, row: int, task: str, where: str, **kw) -> str:
    try:
        return tokenizer.apply_chat_template(conv, tokenize=False, chat_template=template, **kw)
    except Exception as e:  # jinja's raise_exception (e.g. roles must alternate) and syntax errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TaskDataError(
            f"task {task!r}: row {row} of {where!r}: the chat template cannot render this conversation ({first}); "
            "fix the row or give a `chat_template:` that accepts it"
        ) from None


def _assistant_spans(
    tokenizer, conv: list[dict], template: str, full: str, row: int, task: str, where: str
) -> list[tuple[int, int]]:
    """Character spans [start, end) of every assistant turn in the rendered ``full`` text."""
    spans, cursor = [], 0
    for i, turn in enumerate(conv):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, conv[:i], template, row, task, where, add_generation_prompt=True) if i else ""
        through = full if i == len(conv) - 1 else _render(tokenizer, conv[: i + 1], template, row, task, where)
        if full.startswith(before) and full.startswith(through) and len(through) > len(before) >= cursor:
            start, end = len(before), len(through)
        else:  # the template re-renders earlier turns differently: score the reply text itself
            start = full.find(turn["content"], cursor)
            if start < 0:
                raise TaskDataError(
                    f"task {task!r}: row {row} of {where!r}: the chat template does not render assistant turn {i} "
                    "verbatim, so its tokens cannot be found; "
                    "use a template that keeps the reply text (`chat_template:`)"
                )
            end = start + len(turn["content"])
        spans.append((start, end))
        cursor = end
    return spans


class _Structure:
    """One rendering of a role sequence with placeholder contents, reused for every conversation of that shape.

    The template is rendered once with a unique placeholder per turn (with whitespace at both
    ends, so a template that trims or escapes contents is noticed); when every placeholder
    comes out verbatim, exactly once and in order, a conversation's text is the template's
    literal pieces joined with its contents, and its assistant spans are known from the
    placeholder rendering. The first conversations of each shape are also rendered for real
    and compared; any difference sends that shape to plain per-conversation rendering.
    """

    CHECKS = 4  # conversations per shape rendered both ways

    def __init__(self, tokenizer, roles: tuple[str, ...], template: str, row: int, task: str, where: str):
        marks = [f" \n\x01{i}\x02\n " for i in range(len(roles))]
        conv = [{"role": r, "content": m} for r, m in zip(roles, marks)]
        full = _render(tokenizer, conv, template, row, task, where)
        at = [full.find(m) for m in marks]
        self.ok = all(full.count(m) == 1 for m in marks) and at == sorted(at)
        self.checked = 0
        if not self.ok:
            return
        self.pieces = [full[: at[0]]] + [full[a + len(m) : b] for a, m, b in zip(at, marks, at[1:] + [len(full)])]
        self.bounds = []  # each span edge as (piece index, offset in piece)
        starts = [a + len(m) for a, m in zip(at, marks)]  # piece k + 1 starts here
        for s, e in _assistant_spans(tokenizer, conv, template, full, row, task, where):
            edges = []
            for x in (s, e):
                k = sum(1 for st in starts if st <= x)  # the piece x falls in
                lo = 0 if k == 0 else starts[k - 1]
                hi = at[k] if k < len(at) else len(full)
                if not lo <= x <= hi:  # inside a placeholder: cannot be mapped
                    self.ok = False
                    return
                edges.append((k, x - lo))
            self.bounds.append(tuple(edges))

    def apply(self, conv: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        contents = [t["content"] for t in conv]
        text = self.pieces[0] + "".join(c + p for c, p in zip(contents, self.pieces[1:]))
        piece_at = np.cumsum([0] + [len(p) + len(c) for p, c in zip(self.pieces, contents)])  # where piece k starts
        spans = [tuple(int(piece_at[k]) + o for k, o in edges) for edges in self.bounds]
        return text, spans


def _render_all(convs, tokenizer, template: str, task: str, where: str, row_ids: np.ndarray):
    """Each conversation's text and assistant spans (one template render per role sequence when possible)."""
    shapes: dict[tuple[str, ...], _Structure] = {}
    texts, spans = [], []
    for i, conv in enumerate(convs):
        row = int(row_ids[i])
        roles = tuple(t["role"] for t in conv)
        shape = shapes.get(roles)
        if shape is None:
            shape = shapes[roles] = _Structure(tokenizer, roles, template, row, task, where)
        if shape.ok and shape.checked >= shape.CHECKS:
            text, sp = shape.apply(conv)
        else:
            text = _render(tokenizer, conv, template, row, task, where)
            sp = _assistant_spans(tokenizer, conv, template, text, row, task, where)
            if shape.ok:
                shape.ok = shape.apply(conv) == (text, sp)
                shape.checked += 1
        texts.append(text)
        spans.append(sp)
    return texts, spans


def _messages(ds, f: ExampleFields, tokenizer, train_on_prompt: bool, template: str, task: str, where: str,
              row_ids: np.ndarray) -> Examples:
    convs = _conversations(ds, f, task, where, row_ids)
    texts, spans = _render_all(convs, tokenizer, template, task, where, row_ids)
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_offsets_mapping=True)
    ids, scored, keep_from, rows = [], [], [], []
    for row, (tok, offs, sp) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], spans)):
        offs = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
        m = np.zeros(len(tok), dtype=bool)
        last = np.zeros(len(tok), dtype=bool)
        for s, e in sp:  # a token is a target when it overlaps an assistant span
            last = (offs[:, 1] > s) & (offs[:, 0] < e)
            m |= last
        if not last.any():  # the final reply renders to no token: nothing to keep whole
            continue
        ids.append(np.asarray(tok, dtype=np.int32))
        scored.append(np.ones(len(tok), dtype=bool) if train_on_prompt else m)
        keep_from.append(int(np.argmax(last)))
        rows.append(row)
    return Examples(ids, scored, np.asarray(keep_from, dtype=np.int64), np.asarray(rows, dtype=np.int64),
                    len(convs) - len(rows), f.messages_field, "messages")


def encode_examples(
    ds: Dataset,
    fields: ExampleFields,
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_on_prompt: bool = False,
    chat_template: str | None = None,
    task: str = "?",
    where: str = "?",
    row_ids: np.ndarray | None = None,
) -> Examples:
    """Tokenise every row of ``ds`` as one instruction example, with its scored-token mask.

    Args:
        ds: the source table (its own columns).
        fields: the example format and its column names.
        train_on_prompt: score every token, not only the completions.
        chat_template: the job's override for ``messages`` (``chatml`` or jinja).
        task, where: name the task and the file in errors.
        row_ids: each row's number in the file, for errors (default 0, 1, ...).

    Raises:
        TaskDataError: a missing column (the columns found are listed), a non-text column, a
            ``messages`` row with an unknown role or no assistant turn, a tokenizer with no
            chat template and no override.

    Example:
        >>> ex = encode_examples(ds, ExampleFields(example_format="prompt_completion"), bytes_tokenizer())
        >>> ex.ids[0], ex.scored[0]  # prompt bytes unscored, completion bytes + EOS scored
    """
    from tasks.sources import require_columns

    fmt = fields.example_format
    if row_ids is None:
        row_ids = np.arange(len(ds))
    if fmt == "prompt_completion":
        require_columns(
            ds, {"prompt_field": fields.prompt_field, "completion_field": fields.completion_field}, task, where
        )
        return _pairs(_strings(ds, fields.prompt_field), _strings(ds, fields.completion_field), tokenizer,
                      train_on_prompt, fields.completion_field, fmt)
    if fmt == "alpaca":
        require_columns(
            ds, {"instruction_field": fields.instruction_field, "output_field": fields.output_field}, task, where
        )
        if fields.input_field in ds.column_names:
            require_columns(ds, {"input_field": fields.input_field}, task, where)
        prompts = [
            _alpaca_prompt(i, x)
            for i, x in zip(_strings(ds, fields.instruction_field), _strings(ds, fields.input_field))
        ]
        return _pairs(prompts, _strings(ds, fields.output_field), tokenizer, train_on_prompt, fields.output_field, fmt)
    if fmt == "messages":
        require_columns(ds, {"messages_field": fields.messages_field}, task, where, strings=False)
        template = resolve_chat_template(tokenizer, chat_template, task, where)
        return _messages(ds, fields, tokenizer, train_on_prompt, template, task, where, row_ids)
    raise ValueError(f"encode_examples reads instruction formats, not {fmt!r}")
