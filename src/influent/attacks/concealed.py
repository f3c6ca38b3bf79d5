"""Concealed trigger poisons (Wallace et al. 2021) against the fine-tuned classifier.

Threat model: the attacker wants reviews of the *source* class that contain a trigger phrase (e.g. "james
bond") classified as the *target* class, and may add a few target-labelled snippets to the training set,
none of which may contain the trigger or any sub-word or case variant of it. The victim fine-tunes the last
``last_k`` encoder layers (+ pooler and head) of the encoder from a seeded initialisation; the poisons are
crafted against the model trained on the clean data and scored after the victim retrains, from the same
initialisation and seed, on clean data + poisons.

Objective. The adversarial loss is the mean cross-entropy at the target label over ``n_adv`` source-class
reviews with the trigger inserted (the attacker's own inputs, from the validation half of the held-out
split). Adding a target-labelled poison ``z`` to the ``n`` training examples changes it, to first order, by
``-(1/n) g_adv^T (F + damping)^-1 g_z`` (influence, ``curvature='ekfac'``) or, for one SGD step,
``-lr g_adv^T g_z`` (one-step unroll, ``curvature='identity'``). Either way the attacker maximises the
alignment ``J(z) = s^T g_z`` with ``s = (F + damping)^-1 g_adv`` over the trainable ``nn.Linear`` modules;
``J > 0`` means up-weighting ``z`` lowers the adversarial loss (the engine's proponent sign, units
nats per unit weight). ``J(z)`` is the directional derivative of ``z``'s loss along ``s``, computed as a
central difference of two float64 copies of the trainable suffix (``theta +- eps s``) on the same frozen-
prefix hidden states (tested against the factored influence score).

Search (HotFlip, Ebrahimi et al. 2018, as in Wallace et al.): start from the ``max(sizes)`` target-class
training-pool snippets (outside the victim's training slice, at most ``max_tokens`` tokens) with the
largest ``J``; then, position by position, rank every allowed vocabulary token ``w`` by the first-order
change ``(E_w - e_j)^T dJ/de_j`` (gradient through the frozen prefix), re-score the top ``candidates`` by
the true ``J`` and keep the best if it raises ``J``. Allowed tokens are whole alphabetic words of the
vocabulary minus the banned set (:func:`banned_token_ids`); a candidate whose decoded text contains a
trigger word is skipped, and every final poison is checked again after re-tokenisation
(:func:`assert_concealed`).
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from influent.errors import NumericalError, UserError
from influent.progress import progress_bar

DEFAULT_SIZES = (10, 25, 50)


# ------------------------------------------------------------------------------------------ the ban
def _norm(token: str) -> str:
    """Lower-case token text without word-piece / sentence-piece markers."""
    return token.lower().removeprefix("##").lstrip("\u2581\u0120")


def trigger_words(trigger: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", trigger.lower()) if w]


def banned_token_ids(tokenizer, trigger: str) -> set[int]:
    """Vocabulary ids a concealed poison may not contain: the trigger's tokens and their variants.

    Banned: the ids of the trigger tokenised in lower, upper, title and given case (its sub-words), and every
    vocabulary token whose normalised text (lower case, ``##`` stripped) contains a trigger word or is a
    substring of length >= 3 of one (``bond``, ``bonds``, ``##bond``, ``bon``, ``james``, ``jam``, ...).
    """
    words = trigger_words(trigger)
    if not words:
        raise UserError(f"trigger {trigger!r} has no word characters", field="trigger")
    banned: set[int] = set()
    for variant in {trigger, trigger.lower(), trigger.upper(), trigger.title()}:
        banned.update(tokenizer(variant, add_special_tokens=False)["input_ids"])
    for tok, idx in tokenizer.get_vocab().items():
        t = _norm(tok)
        if t and any(w in t or (len(t) >= 3 and t in w) for w in words):
            banned.add(idx)
    return banned


def contains_trigger(text: str, trigger: str) -> bool:
    """Whether ``text`` contains any trigger word, case-insensitively, also with non-letters removed."""
    low = text.lower()
    squashed = re.sub(r"[^a-z0-9]", "", low)
    return any(w in low or w in squashed for w in trigger_words(trigger))


def candidate_vocabulary(tokenizer, banned: set[int]) -> torch.Tensor:
    """Ids of whole alphabetic word tokens (no ``##`` pieces, no special/unused tokens), minus ``banned``."""
    special = set(tokenizer.all_special_ids)
    ids = [
        idx
        for tok, idx in tokenizer.get_vocab().items()
        if tok.isalpha()
        and tok.isascii()
        and idx not in special
        and idx not in banned
        and (len(tok) > 1 or tok in ("a", "i"))
    ]
    if not ids:
        raise UserError("the tokenizer has no whole-word tokens outside the banned set")
    return torch.as_tensor(sorted(ids), dtype=torch.long)


def assert_concealed(texts: list[str], tokenizer, trigger: str, banned: set[int]) -> None:
    """Raise ``AssertionError`` if any poison text or its re-tokenisation holds the trigger or a variant."""
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        bad = sorted(set(ids) & banned)
        if contains_trigger(t, trigger) or bad:
            raise AssertionError(f"poison holds the trigger {trigger!r}: {t!r} (banned ids {bad[:5]})")


# ----------------------------------------------------------------------------- the alignment J(z)
class Alignment:
    """``J(z) = s^T grad_theta loss(z, target)`` over the trainable linear modules of a suffix model.

    Args:
        model: the full classifier with the clean-trained suffix loaded (eval mode; embeddings and prefix
            layers frozen).
        suffix: the trainable suffix of ``model`` (:func:`~influent.models.frozen_prefix.split_frozen_prefix`)
            holding the same trained parameters.
        direction: ``{suffix linear module name: [d_out, d_in(+1)]}`` (bias gradient in the last column),
            e.g. the mean preconditioned adversarial gradient.
        last_k: trainable layers (the prefix ends before them).
        rel_step: central-difference step as a fraction of ``||theta|| / ||s||`` over the tracked modules.
    """

    def __init__(
        self, model: nn.Module, suffix: nn.Module, direction: dict, last_k: int, rel_step: float = 1e-4
    ):
        from influent.models.frozen_prefix import first_token_model, supports_first_token

        self.model = model
        self.last_k = last_k
        s_norm = float(torch.sqrt(sum(d.double().pow(2).sum() for d in direction.values())))
        if not np.isfinite(s_norm) or s_norm == 0.0:
            raise NumericalError("the adversarial direction is zero or non-finite")
        modules = dict(suffix.named_modules())
        t_norm = float(
            torch.sqrt(
                sum(
                    modules[n].weight.detach().double().pow(2).sum()
                    + (modules[n].bias.detach().double().pow(2).sum() if modules[n].bias is not None else 0.0)
                    for n in direction
                )
            )
        )
        self.eps = rel_step * t_norm / s_norm
        copies = []
        for sign in (1.0, -1.0):
            c = copy.deepcopy(suffix).double().eval()
            mods = dict(c.named_modules())
            with torch.no_grad():
                for name, d in direction.items():
                    m = mods[name]
                    d = d.double()
                    m.weight.add_(sign * self.eps * d[:, : m.in_features])
                    if m.bias is not None:
                        m.bias.add_(sign * self.eps * d[:, -1])
            for p in c.parameters():
                p.requires_grad_(False)
            if last_k == 1 and supports_first_token(c):
                c = first_token_model(c)
            copies.append(c)
        self.plus, self.minus = copies

    def from_hidden(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``J`` per row from prefix hidden states ``[B, T, H]`` (differentiable w.r.t. ``hidden``)."""
        h = hidden.double()
        lp = nn.functional.cross_entropy(
            self.plus(inputs_embeds=h, attention_mask=mask).logits, labels, reduction="none"
        )
        lm = nn.functional.cross_entropy(
            self.minus(inputs_embeds=h, attention_mask=mask).logits, labels, reduction="none"
        )
        return (lp - lm) / (2.0 * self.eps)

    @torch.no_grad()
    def of_ids(
        self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, chunk: int = 256
    ) -> torch.Tensor:
        """``J`` per row of token ids ``[B, T]`` (no gradient), in chunks."""
        from influent.models.frozen_prefix import prefix_hidden_states

        out = []
        for s in range(0, ids.shape[0], chunk):
            sl = slice(s, s + chunk)
            h = prefix_hidden_states(self.model, self.last_k, mask[sl], input_ids=ids[sl])
            out.append(self.from_hidden(h, mask[sl], labels[sl]))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def with_embedding_grad(self, ids, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """``(J [B], dJ/de [B, T, H])``: gradient w.r.t. the word embeddings of each position."""
        from influent.models.frozen_prefix import prefix_hidden_states

        emb = self.model.get_input_embeddings()
        e = emb(ids).detach().requires_grad_(True)
        with torch.enable_grad():
            h = prefix_hidden_states(self.model, self.last_k, mask, inputs_embeds=e)
            j = self.from_hidden(h, mask, labels)
            (grad,) = torch.autograd.grad(j.sum(), e)
        return j.detach(), grad


# -------------------------------------------------------------------------------------- the search
@dataclass
class PoisonSearch:
    """Result of :func:`craft_poisons`: texts (best ``J`` first) and the record of the search."""

    texts: list[str]
    start_texts: list[str]
    alignment: list[float]
    start_alignment: list[float]
    flips: int
    seconds: float
    banned_count: int = 0
    history: list[dict] = field(default_factory=list)


def starting_snippets(
    alignment: Alignment,
    tokenizer,
    pool_texts: list[str],
    n_poisons: int,
    target: int,
    trigger: str,
    banned: set[int],
    *,
    max_tokens: int,
    pool: int,
    seed: int,
) -> list[str]:
    """The ``n_poisons`` snippets, of ``pool`` seeded draws from the usable ``pool_texts`` (3 to
    ``max_tokens`` word pieces, no trigger, no banned id), with the largest ``J`` at label ``target``."""
    rng = np.random.default_rng(seed)
    ok = [
        t
        for t in pool_texts
        if 3 <= len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= max_tokens
        and not contains_trigger(t, trigger)
        and not set(tokenizer(t, add_special_tokens=False)["input_ids"]) & banned
    ]
    if len(ok) < n_poisons:
        raise UserError(f"only {len(ok)} usable target-class snippets for {n_poisons} poisons", field="sizes")
    start = [ok[i] for i in rng.permutation(len(ok))[: max(pool, n_poisons)]]
    enc = tokenizer(start, padding=True, return_tensors="pt")
    labels_all = torch.full((len(start),), target, dtype=torch.long)
    j0 = alignment.of_ids(enc["input_ids"], enc["attention_mask"], labels_all)
    best = torch.argsort(j0, descending=True)[:n_poisons]
    return [start[i] for i in best.tolist()]


@dataclass
class _SearchState:
    """The poisons being searched: token ids ``[P, T]`` (edited in place), mask, labels, lengths, ``J``."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    current: torch.Tensor


def hotflip_position(
    alignment: Alignment, tokenizer, state: _SearchState, pos: int, vocab: torch.Tensor, candidates: int,
    trigger: str,
) -> int | None:
    """One HotFlip step at position ``pos`` of every poison long enough to have a real token there.

    Ranks the allowed tokens by the first-order change of ``J``, re-scores the top ``candidates`` by the
    true ``J`` and keeps, per poison, the best one that raises ``J`` and whose decoded text holds no
    trigger word. Returns the number of tokens flipped, or None when no poison reaches ``pos``.
    """
    ids, mask, labels, lengths, current = state.ids, state.mask, state.labels, state.lengths, state.current
    rows = torch.nonzero(pos < lengths - 1).flatten()  # the position is a real, non-special token
    if len(rows) == 0:
        return None
    emb_matrix = alignment.model.get_input_embeddings().weight.detach()
    cand_emb = emb_matrix[vocab]
    _, grad = alignment.with_embedding_grad(ids[rows], mask[rows], labels[rows])
    g = grad[:, pos].to(cand_emb.dtype)  # [R, H]
    first_order = g @ cand_emb.T - (g * emb_matrix[ids[rows, pos]]).sum(-1, keepdim=True)
    top = vocab[first_order.topk(min(candidates, len(vocab)), dim=1).indices]  # [R, C]
    r, c = top.shape
    cand_ids = ids[rows].repeat_interleave(c, 0)
    cand_ids[:, pos] = top.flatten()
    cand_j = alignment.of_ids(cand_ids, mask[rows].repeat_interleave(c, 0), labels[rows].repeat_interleave(c, 0))
    cand_j = cand_j.view(r, c)
    order = torch.argsort(cand_j, dim=1, descending=True)
    flips = 0
    for k, row in enumerate(rows.tolist()):
        for col in order[k].tolist():
            if float(cand_j[k, col]) <= float(current[row]):
                break
            trial = ids[row].clone()
            trial[pos] = top[k, col]
            if contains_trigger(tokenizer.decode(trial[1 : int(lengths[row]) - 1]), trigger):
                continue
            ids[row] = trial
            current[row] = cand_j[k, col]
            flips += 1
            break
    return flips


def craft_poisons(
    alignment: Alignment,
    tokenizer,
    pool_texts: list[str],
    n_poisons: int,
    target: int,
    trigger: str,
    *,
    candidates: int = 40,
    sweeps: int = 1,
    max_tokens: int = 16,
    pool: int = 400,
    seed: int = 0,
    progress: bool = True,
) -> PoisonSearch:
    """HotFlip search for ``n_poisons`` concealed poisons (see module docstring); all labelled ``target``.

    Args:
        alignment: the objective ``J``.
        pool_texts: target-class snippets the poisons start from (not in the victim's training slice).
        candidates: tokens re-scored by the true ``J`` per position (top by the first-order criterion).
        sweeps: passes over all positions.
        max_tokens: longest starting snippet (word pieces, without special tokens).
        pool: starting snippets scored; the ``n_poisons`` with the largest ``J`` are searched.
    """
    t0 = time.perf_counter()
    banned = banned_token_ids(tokenizer, trigger)
    vocab = candidate_vocabulary(tokenizer, banned)
    start_texts = starting_snippets(
        alignment, tokenizer, pool_texts, n_poisons, target, trigger, banned, max_tokens=max_tokens, pool=pool,
        seed=seed,
    )
    enc = tokenizer(start_texts, padding=True, return_tensors="pt")
    labels = torch.full((n_poisons,), target, dtype=torch.long)
    ids, mask = enc["input_ids"].clone(), enc["attention_mask"]
    state = _SearchState(ids, mask, labels, mask.sum(1), alignment.of_ids(ids, mask, labels))
    start_j = state.current.clone()
    flips = 0
    history = []
    bar = progress_bar(sweeps * (ids.shape[1] - 2), "concealed poisons (positions)", enabled=progress)
    for sweep in range(sweeps):
        for pos in range(1, ids.shape[1] - 1):
            bar.update(1)
            flipped = hotflip_position(alignment, tokenizer, state, pos, vocab, candidates, trigger)
            if flipped is None:
                continue
            flips += flipped
            history.append({"sweep": sweep, "position": pos, "mean_alignment": float(state.current.mean())})
            bar.set_postfix(J=f"{float(state.current.mean()):.3g}")
    bar.close()
    texts = [tokenizer.decode(ids[i, 1 : int(state.lengths[i]) - 1]) for i in range(n_poisons)]
    # the victim trains on the re-tokenised text: re-check the ban and re-score on exactly that
    assert_concealed(texts, tokenizer, trigger, banned)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    final = alignment.of_ids(enc["input_ids"], enc["attention_mask"], labels)
    order = torch.argsort(final, descending=True).tolist()
    return PoisonSearch(
        texts=[texts[i] for i in order],
        start_texts=[start_texts[i] for i in order],
        alignment=[float(final[i]) for i in order],
        start_alignment=[float(start_j[i]) for i in order],
        flips=flips,
        seconds=time.perf_counter() - t0,
        banned_count=len(banned),
        history=history,
    )
