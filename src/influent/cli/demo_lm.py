"""``influent demo lm``: fine-tune the default causal LM briefly on an instruction set built from the bundled
Rotten Tomatoes snippets, then trace two queries (one completion given, one generated) and write the JSON.

Sized for 2 busy CPU cores: ``--lm-pairs`` (default 48; 2 held out as queries) short reviews (at most 120
characters) as ``Review: ... Is this review positive or negative? Answer:`` -> ``positive`` / ``negative``
pairs, sequences of at most 64 tokens, the last 2 blocks fine-tuned for 1 epoch, EK-FAC over their MLP
modules fitted on every training pair. The fit's last pass writes the training token cache
(:mod:`influent.curvature.token_cache`, about 46 KB per token, some 70 MB), so both queries are scored
without another pass over the training data; the checkpoint, the factors and that cache are kept, so a
second run only loads the model, generates and scores.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from influent.cli.common import check_output_dir, checked
from influent.cli.trace import query_sequence, tracked_modules

PROMPT = "Review: {text}\nIs this review positive or negative? Answer:"
MAX_CHARS = 120  # short reviews keep every pair under MAX_LENGTH tokens
MAX_LENGTH = 64
TRAIN_FILE = "demo_lm_train.csv"
OUTPUT_FILE = "demo_lm_traces.json"


def instruction_file(out: Path, n: int, seed: int) -> tuple[Path, list[tuple[str, str]]]:
    """Draw ``n`` short reviews (seeded, label-stratified), hold out two ``(review, label)`` rows for the queries
    and write the other ``n - 2`` as prompt/completion pairs to ``out/demo_lm_train.csv``."""
    from influent.data import load_rotten_tomatoes, stratified_sample

    corpus = load_rotten_tomatoes()
    short = [i for i, t in enumerate(corpus.texts) if len(t) <= MAX_CHARS]
    labels = corpus.labels[short]
    chosen = [short[int(j)] for j in stratified_sample(labels, n, seed)]
    rows = [(corpus.texts[i], corpus.label_names[int(corpus.labels[i])]) for i in chosen]
    picks = [next(k for k, row in enumerate(rows) if row[1] == name) for name in ("negative", "positive")]
    held_out = [rows[k] for k in picks]  # the first sampled review of either label
    train = [row for k, row in enumerate(rows) if k not in picks]
    out.mkdir(parents=True, exist_ok=True)
    path = out / TRAIN_FILE
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "completion"])
        writer.writerows((PROMPT.format(text=text), label) for text, label in train)
    return path, held_out


def cmd_demo_lm(args: argparse.Namespace) -> int:
    from influent.factored_influence import FactorConfig, FactoredInfluence
    from influent.lm_pipeline import LMSettings, prepare_lm
    from influent.store import write_json
    from influent.trace import format_trace, trace

    start = time.perf_counter()
    checked("top", args.top, low=1, integer=True)
    checked("lm_pairs", args.lm_pairs, low=4, integer=True)
    check_output_dir(args.out, "out")
    out = Path(args.out)
    data, held_out = instruction_file(out, args.lm_pairs, args.seed)
    print(f"influent demo lm: SmolLM2-135M-Instruct, last 2 blocks fine-tuned (1 epoch) on {args.lm_pairs - 2} "
          f"review -> positive/negative instructions from the bundled corpus ({data})")
    settings = LMSettings(data=str(data), prompt_column="prompt", completion_column="completion",
                          max_length=MAX_LENGTH, last_k=2, epochs=1, lr=1e-4, batch_size=8, seed=args.seed)
    setup = prepare_lm(settings, cache_dir=args.cache_dir, progress=not args.quiet)
    losses = ", ".join(f"{x:.3f}" for x in setup.metrics["epoch_loss"])
    print(f"  {len(setup.sequences)} training sequences; fine-tuning loss per epoch {losses} nats/sequence "
          f"({time.perf_counter() - start:.0f} s so far)")
    config = FactorConfig(strategy="ekfac", modules=tracked_modules(setup.model, "mlp"), seed=args.seed)
    method = FactoredInfluence(setup.model, setup.task, setup.batches(), config, cache_dir=setup.folder / "factors",
                               train_cache=True, progress=not args.quiet)
    (text0, label0), (text1, _) = held_out
    queries = [("completion given", query_sequence(setup, PROMPT.format(text=text0), label0, 4)),
               ("completion generated (greedy)", query_sequence(setup, PROMPT.format(text=text1), None, 4))]
    traces = []
    for title, query in queries:
        result = trace(method, setup.sequences, query, setup.tokenizer, top=args.top, tokens=True,
                       batch_size=settings.batch_size)
        traces.append({"kind": title, **result})
        print(f"\n=== query: {title} ===\n{format_trace(result)}")
    write_json(out / OUTPUT_FILE, {"model": setup.metrics, "settings": vars(settings),
                                   "influence": method.describe(), "traces": traces})
    print(f"\nOutputs: {out / OUTPUT_FILE}; model and factors under {setup.folder}")
    print(f"Done in {time.perf_counter() - start:.1f} s.")
    return 0
