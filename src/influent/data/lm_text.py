"""Training data for causal language models: plain text or prompt/completion pairs, tokenized into sequences.

Sources are those of :func:`~influent.data.loaders.load_corpus` (CSV / TSV / JSONL / Parquet / ``hf:``), read
through it, plus ``.txt`` files (paragraphs separated by blank lines are the documents). A plain-text
document is tokenized and cut into sequences of at most ``max_length`` tokens, each token after the first a
target; a prompt/completion pair is one sequence ``prompt tokens + tokens of " " + completion`` (truncated
to ``max_length``) whose targets are the completion tokens only.

Read through the corpus loaders, texts are de-duplicated (first kept) and blank ones dropped; a completion is
read as the loaders read a label, so surrounding whitespace is stripped (one space joins it to the prompt,
here and in queries) and the pairs must not all share one completion.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from influent.data.corpus import text_id
from influent.data.loaders import load_corpus
from influent.errors import UserError

_PARAGRAPH = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class LMSequence:
    """One training (or query) sequence.

    Attributes:
        id: stable id (:func:`~influent.data.corpus.text_id` of the document, ``:k`` for its k-th chunk).
        text: the sequence as text (decoded tokens), for display and retrieval.
        input_ids: token ids.
        loss_mask: 1 where the token is a target whose prediction counts (never the first token).
    """

    id: str
    text: str
    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]


def read_documents(
    spec: str,
    *,
    text_column: str = "text",
    prompt_column: str | None = None,
    completion_column: str | None = None,
    hf_split: str = "train",
) -> list[tuple[str, str | None]]:
    """``(text, None)`` per plain-text document, or ``(prompt, completion)`` per pair, in file order.

    Raises:
        UserError: unreadable source, unknown column, no text, one of prompt/completion columns missing.
    """
    if (prompt_column is None) != (completion_column is None):
        raise UserError("give both a prompt and a completion column, or neither", field="prompt_column")
    path = Path(spec)
    if path.suffix.lower() == ".txt":
        if prompt_column is not None:
            raise UserError(f"{spec}: a .txt file holds plain text, not prompt/completion pairs",
                            field="prompt_column")
        if not path.is_file():
            raise UserError(f"file not found: {spec}", field="data")
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{spec}: cannot read as UTF-8 text: {exc}", field="data") from None
        docs = [p.strip() for p in _PARAGRAPH.split(raw) if p.strip()]
        if not docs:
            raise UserError(f"{spec}: no text", field="data")
        return [(d, None) for d in docs]
    first, second = (prompt_column, completion_column) if prompt_column else (text_column, text_column)
    try:
        corpus = load_corpus(spec, text_column=first, label_column=second, hf_split=hf_split)
    except UserError as err:
        if "only one class" in str(err):
            what = "all completions are the same" if prompt_column else "fewer than two distinct texts"
            raise UserError(f"{spec}: {what}; need at least two", field="data") from None
        raise
    if prompt_column is None:
        return [(t, None) for t in corpus.texts]
    return [(p, corpus.label_names[int(c)]) for p, c in zip(corpus.texts, corpus.labels)]


def pair_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` (with the tokenizer's special tokens) and of ``" " + completion`` (without)."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = list(tokenizer(" " + completion.strip(), add_special_tokens=False)["input_ids"])
    return prompt_ids, completion_ids


def pair_sequence(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], tokenizer, *, seq_id: str | None = None
) -> LMSequence:
    """The sequence ``prompt + completion`` whose targets are the completion tokens."""
    ids = tuple(int(i) for i in (*prompt_ids, *completion_ids))
    mask = (0,) * len(prompt_ids) + (1,) * len(completion_ids)
    if len(prompt_ids) == 0:  # the first token is never a target: nothing predicts it
        mask = (0, *mask[1:])
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    return LMSequence(seq_id or text_id(text), text, ids, mask)


def tokenize_documents(
    tokenizer, documents: Sequence[tuple[str, str | None]], max_length: int
) -> list[LMSequence]:
    """Sequences of at most ``max_length`` tokens from :func:`read_documents`' output, in order.

    Raises:
        UserError: ``max_length`` below 2; a pair whose prompt leaves no completion token; no sequence of
            at least two tokens.
    """
    if max_length < 2:
        raise UserError(f"max_length must be at least 2, got {max_length}", field="max_length")
    out: list[LMSequence] = []
    for row, (text, completion) in enumerate(documents):
        if completion is not None:
            prompt_ids, completion_ids = pair_ids(tokenizer, text, completion)
            room = max_length - len(prompt_ids)
            if room < 1 or not completion_ids:
                raise UserError(f"row {row}: the prompt has {len(prompt_ids)} tokens, which leaves no completion "
                                f"token within max_length {max_length}", field="max_length")
            out.append(pair_sequence(prompt_ids, completion_ids[:room], tokenizer,
                                     seq_id=text_id(text + "\n" + completion)))
            continue
        ids = [int(i) for i in tokenizer(text)["input_ids"]]
        chunks = [ids[s : s + max_length] for s in range(0, len(ids), max_length)]
        chunks = [c for c in chunks if len(c) >= 2]
        base = text_id(text)
        for k, chunk in enumerate(chunks):
            out.append(LMSequence(base if len(chunks) == 1 else f"{base}:{k}",
                                  tokenizer.decode(chunk, skip_special_tokens=True), tuple(chunk),
                                  (0,) + (1,) * (len(chunk) - 1)))
    if not out:
        raise UserError("no training sequence of at least two tokens", field="data")
    return out


def lm_batches(sequences: Sequence[LMSequence], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded dict batches (``input_ids``, ``attention_mask``, ``loss_mask``; ``[B, T]`` long), in order."""
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    out = []
    for start in range(0, len(sequences), batch_size):
        part = sequences[start : start + batch_size]
        width = max(len(s.input_ids) for s in part)
        ids = torch.full((len(part), width), int(pad_id), dtype=torch.long)
        attention = torch.zeros((len(part), width), dtype=torch.long)
        loss = torch.zeros((len(part), width), dtype=torch.long)
        for i, s in enumerate(part):
            n = len(s.input_ids)
            ids[i, :n] = torch.tensor(s.input_ids)
            attention[i, :n] = 1
            loss[i, :n] = torch.tensor(s.loss_mask)
        out.append({"input_ids": ids, "attention_mask": attention, "loss_mask": loss})
    return out
