"""``influent review``: walk through the audit's most suspicious training examples and decide on each.

Each example is shown with its label, the model's prediction and its most incompatible counter-example
(:func:`influent.defenses.review.counter_examples`); keys: ``k`` keep, ``r`` relabel, ``d`` drop, ``s`` skip,
``u`` undo the last decision, ``q`` quit. Every decision is appended to the JSON-lines log (flushed before the
next question) and the cleaned data file is rewritten after it, so quitting or killing the process loses
nothing; a later run with the same ``--log`` resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from influent.cli.common import add_data_options, checked, head_setup
from influent.errors import UserError

PROMPT = "[k]eep [r]elabel [d]rop [s]kip [u]ndo [q]uit > "


def _queue(ranking: dict, ranker: str | None) -> list[dict]:
    rows = ranking["rows"]
    if ranker is None:
        return sorted(rows, key=lambda r: r["rank"])
    if not rows or ranker not in rows[0]:
        raise UserError(f"ranker {ranker!r} is not in the ranking; it has {', '.join(ranking['rankers'])}",
                        field="ranker")
    return sorted(rows, key=lambda r: -float(r[ranker]))


def _ask_label(names: list[str], current: str) -> str | None:
    others = [n for n in names if n != current]
    if len(others) == 1:
        return others[0]
    answer = input(f"new label ({', '.join(others)}) > ").strip()
    return answer if answer in others else None


def _retrain(setup, decisions: dict[str, dict], pos_of: dict[str, int]) -> float:
    """Held-out accuracy of the head retrained on the training split with the decisions applied."""
    from influent.models.head import accuracy, train_head

    names = list(setup.corpus.label_names)
    y = setup.train_y.clone()
    keep = torch.ones(len(y), dtype=torch.bool)
    for i, d in decisions.items():
        if i not in pos_of:
            continue
        if d["action"] == "drop":
            keep[pos_of[i]] = False
        elif d["action"] == "relabel":
            y[pos_of[i]] = names.index(d["label"])
    model, _, _ = train_head(setup.train_x[keep], y[keep], len(names), float(setup.task.l2))
    return accuracy(model, setup.test_x, setup.test_y)


def _show(setup, row: dict, pos: int, counter: tuple[int, float], number: int, total: int) -> None:
    names = list(setup.corpus.label_names)
    probs = setup.model.probabilities(setup.train_x[pos : pos + 1].double()).detach()[0]
    pred = int(probs.argmax())
    k, score = counter
    other = setup.corpus.texts[int(setup.train_idx[k])]
    print(f"\n--- {number}/{total}  rank {row.get('rank')}  id {row['id']}")
    print(f"text:       {row['text']}")
    print(f"label:      {row['label']}    model predicts: {names[pred]} ({float(probs[pred]):.3f})")
    print(f"counter-example (raises this example's loss most, score {score:+.4g}): "
          f"[{names[int(setup.train_y[k])]}] {other}")


def cmd_review(args: argparse.Namespace) -> int:
    from influent.defenses.review import DecisionLog, counter_examples, write_cleaned

    if args.data is None:
        raise UserError("data: review needs the data file the audit ranked", field="data")
    if args.retrain_every is not None:
        checked("retrain_every", args.retrain_every, low=1, integer=True)
    try:
        ranking = json.loads(Path(args.ranking).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"ranking {args.ranking!r} cannot be read as JSON ({err})", field="ranking") from None
    setup = head_setup(args)
    names = list(setup.corpus.label_names)
    pos_of = {setup.corpus.ids[int(r)]: p for p, r in enumerate(setup.train_idx)}
    log = DecisionLog(args.log)
    decisions = log.replay()
    queue = [r for r in _queue(ranking, args.ranker) if r["id"] in pos_of][: args.top]
    print(f"review: {len(queue)} examples; {len(decisions)} decisions already in {args.log}; "
          f"cleaned data -> {args.out}")
    out = Path(args.out)
    method = setup.influence()
    base_accuracy = float(setup.info.get("test_accuracy", _retrain(setup, {}, pos_of)))
    history: list[str] = [i for i in decisions]  # ids in decision order, for undo
    since_retrain = 0
    at = 0
    while at < len(queue):
        row = queue[at]
        if row["id"] in decisions:
            at += 1
            continue
        pos = pos_of[row["id"]]
        counter = counter_examples(method, setup.train_x, setup.train_y, [pos])[0]
        _show(setup, row, pos, counter, at + 1, len(queue))
        key = input(PROMPT).strip().lower()[:1]
        if key == "q":
            break
        if key == "u":
            if not history:
                print("nothing to undo")
                continue
            last = history.pop()
            log.append({"id": last, "action": "undo"})
            decisions = log.replay()
            write_cleaned(args.data, args.text_column, args.label_column, decisions, out)
            at = next((j for j, r in enumerate(queue) if r["id"] == last), at)
            print(f"undone: {last}")
            continue
        action = {"k": "keep", "r": "relabel", "d": "drop", "s": "skip"}.get(key)
        if action is None:
            print("keys: k keep, r relabel, d drop, s skip, u undo, q quit")
            continue
        record = {"id": row["id"], "action": action, "old_label": row["label"]}
        if action == "relabel":
            new = _ask_label(names, row["label"])
            if new is None:
                print("not a class; nothing changed")
                continue
            record["label"] = new
        log.append(record)
        decisions = log.replay()
        history.append(row["id"])
        counts = write_cleaned(args.data, args.text_column, args.label_column, decisions, out)
        print(f"{action}: {row['id']} ({counts['dropped']} dropped, {counts['relabelled']} relabelled so far)")
        since_retrain += action != "skip"
        if args.retrain_every and since_retrain >= args.retrain_every:
            since_retrain = 0
            acc = _retrain(setup, decisions, pos_of)
            print(f"retrained: held-out accuracy {base_accuracy:.4f} -> {acc:.4f} ({acc - base_accuracy:+.4f})")
        at += 1
    counts = write_cleaned(args.data, args.text_column, args.label_column, decisions, out)
    print(f"done: {len(decisions)} decisions in {args.log}; {counts['rows']} rows written to {out}")
    return 0


def add_review_parser(sub) -> None:
    p = sub.add_parser("review", help="decide on the audit's most suspicious training examples, one by one")
    p.add_argument("--ranking", required=True, help="the audit's ranking.json")
    p.add_argument("--ranker", default=None, help="order by this ranker (default: the audit's primary order)")
    p.add_argument("--top", type=int, default=50, help="review at most this many examples (default 50)")
    p.add_argument("--out", required=True, help="cleaned data file, same format as --data")
    p.add_argument("--log", required=True, help="JSON-lines decision log (appended; resumes from it)")
    p.add_argument("--retrain-every", type=int, default=None, metavar="K",
                   help="retrain the head after every K decisions and show the held-out accuracy change")
    add_data_options(p)
    p.set_defaults(func=cmd_review)
