"""Report section for ``explain`` output: each query, its proponents and opponents with score bars, and the
tokens coloured by their score when the JSON carries them (``tokens`` + ``token_scores``, as a language-model
trace will write them: positive = the token raised the explained output, blue; negative red)."""

from __future__ import annotations

from influent.report.page import Raw, esc, fmt, table


def token_html(tokens: list[str], scores: list[float]) -> str:
    """Tokens as spans whose background opacity is ``|score| / max |score|`` (blue positive, red negative)."""
    top = max((abs(float(s)) for s in scores), default=0.0) or 1.0
    spans = []
    for tok, score in zip(tokens, scores):
        alpha = min(1.0, abs(float(score)) / top)
        rgb = "31,119,180" if score >= 0 else "214,39,40"
        spans.append(f'<span class="tok" title="{float(score):+.4g}" '
                     f'style="background:rgba({rgb},{alpha:.2f})">{esc(tok)}</span>')
    return " ".join(spans)


def _text(item: dict) -> str:
    if item.get("tokens") and item.get("token_scores"):
        return token_html(item["tokens"], item["token_scores"])
    return esc(item.get("text", ""))


def score_bar(score: float, largest: float) -> Raw:
    """A horizontal bar of width ``|score| / largest`` (blue proponent, red opponent) and the number."""
    width = 100.0 * min(1.0, abs(score) / largest) if largest > 0 else 0.0
    sign = "pos" if score >= 0 else "neg"
    return Raw(f'<div class="bar"><span class="fill {sign}" style="width:{width:.1f}px"></span>'
               f"<span>{esc(f'{score:+.4g}')}</span></div>")


def _examples_table(items: list[dict], largest: float) -> str:
    rows = [[i + 1, score_bar(float(e["score"]), largest), e.get("loss_change"), e.get("label", ""), Raw(_text(e))]
            for i, e in enumerate(items)]
    return table(["#", "score", "loss change (nats)", "label", "training example"], rows, numeric={0, 2},
                 text_cols={4})


def explanation_section(result: dict, number: int) -> str:
    """One explanation: the query, then its proponents and opponents."""
    q = result.get("query", {})
    items = list(result.get("proponents", [])) + list(result.get("opponents", []))
    largest = max((abs(float(e["score"])) for e in items), default=0.0)
    facts = [f"prediction <b>{esc(q.get('prediction', '?'))}</b>"]
    if q.get("probability") is not None:
        facts.append(f"probability {esc(fmt(q['probability'], 3))}")
    if q.get("true_label") is not None:
        facts.append(f"true label {esc(q['true_label'])}")
    if q.get("explained_label") is not None:
        facts.append(f"scores explain the loss of <b>{esc(q['explained_label'])}</b>")
    parts = [f"<h2>Explanation {number}</h2>", f'<div class="query">{_text(q)}</div>',
             (f"<p>{'; '.join(facts)}. Score = g<sub>query</sub><sup>T</sup> H<sup>-1</sup> g<sub>train</sub>: "
             "positive (blue) = proponent, removing it would raise the query's loss by about loss change = "
             "score / n; negative (red) = opponent.</p>")]
    parts += ["<h3>Proponents (helped this prediction)</h3>", _examples_table(result.get("proponents", []), largest)]
    parts += ["<h3>Opponents (pushed against it)</h3>", _examples_table(result.get("opponents", []), largest)]
    solver = result.get("solver")
    if solver:
        parts.append(f'<p class="muted">solver: {esc(", ".join(f"{k}={fmt(v)}" for k, v in solver.items()))}</p>')
    return "".join(parts)


def explain_sections(data: dict) -> list[str]:
    """Every explanation in ``data`` (one ``explain --json`` object, or ``{"explanations": [...]}``)."""
    results = data.get("explanations", [data])
    return [explanation_section(r, i + 1) for i, r in enumerate(results)]
