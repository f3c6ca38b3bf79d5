"""Report section for ``trace`` output (a causal LM's completion traced to its training sequences).

The input is :func:`influent.trace.trace`'s dict: ``{"query": {"prompt", "completion", "loss"}, "results":
[{"id", "text", "score", "loss_change", "tokens"?: [{"token", "score"}]}], "candidates": {"method", "kept",
"of"}}``. Sign convention (as the trace's): score > 0 = proponent (up-weighting the sequence lowers the
completion's loss, i.e. makes the completion more likely), score < 0 = opponent; ``loss_change = score / n``
is the predicted change of the completion's loss (nats) if the sequence were removed. A token's share is its
part of the sequence's score (the shares sum to the score); its background is blue for a positive share, red
for a negative one, with opacity ``|share| / the sequence's largest |share|``.
"""

from __future__ import annotations

from influent.report.explanations import score_bar
from influent.report.page import Raw, esc, fmt, table

POSITIVE_RGB = "31,119,180"  # blue: the same colour as a proponent's score bar
NEGATIVE_RGB = "214,39,40"  # red: an opponent's


def aligned_tokens(text: str, tokens: list[str]) -> list[tuple[str, str]]:
    """``(gap, token)`` pairs that lay ``tokens`` over ``text``: ``gap`` is the whitespace of ``text`` before
    the token (a word-level tokenizer decodes tokens without their spaces). A token not found next in
    ``text`` (a special token, a decoding that differs) gets an empty gap and leaves the position alone."""
    out, pos = [], 0
    for tok in tokens:
        at = text.find(tok, pos) if tok else -1
        if at >= 0 and not text[pos:at].strip():
            out.append((text[pos:at], tok))
            pos = at + len(tok)
        else:
            out.append(("", tok))
    return out


def _token_span(token: str, share: float, top: float) -> str:
    alpha = min(1.0, abs(share) / top) if top > 0 else 0.0
    rgb = POSITIVE_RGB if share >= 0 else NEGATIVE_RGB
    ink = "color:#fff;" if alpha > 0.6 else ""
    return (f'<span class="tok" title="{esc(f"{share:+.4g}")}" '
            f'style="background:rgba({rgb},{alpha:.2f});{ink}">{esc(token)}</span>')


def highlighted(text: str, tokens: list[dict]) -> str:
    """The sequence with every token's background coloured by its share of the score (HTML, escaped)."""
    top = max((abs(float(t["score"])) for t in tokens), default=0.0)
    pairs = aligned_tokens(text, [str(t["token"]) for t in tokens])
    return "".join(esc(gap) + _token_span(tok, float(t["score"]), top) for (gap, tok), t in zip(pairs, tokens))


def strongest_token(tokens: list[dict]) -> str:
    """``'token' +share`` of the token with the largest ``|share|`` (the row's peak colour), escaped."""
    best = max(tokens, key=lambda t: abs(float(t["score"])))
    token, share = str(best["token"]), float(best["score"])
    return f"{esc(repr(token.strip() or token))} {esc(f'{share:+.4g}')}"


LEGEND = (
    '<div class="legend"><span>token share:</span><span class="scale">'
    f'<span class="tok" style="background:rgba({NEGATIVE_RGB},1.00);color:#fff">&minus; largest</span>'
    f'<span class="ramp" style="background:linear-gradient(to right,rgba({NEGATIVE_RGB},1),rgba({NEGATIVE_RGB},0),'
    f'rgba({POSITIVE_RGB},0),rgba({POSITIVE_RGB},1))"></span>'
    f'<span class="tok" style="background:rgba({POSITIVE_RGB},1.00);color:#fff">+ largest</span></span></div>'
    '<p class="muted">Blue tokens pulled the sequence\'s score up (towards a proponent), red ones down; opacity = '
    "the token's |share| over the largest |share| in that sequence (hover a token for its value). The shares of "
    "a sequence sum to its score.</p>"
)


def _rows_table(rows: list[dict], largest: float) -> str:
    has_tokens = any(r.get("tokens") for r in rows)
    body = []
    for k, r in enumerate(rows):
        tokens = r.get("tokens") or []
        text = highlighted(str(r.get("text", "")), tokens) if tokens else esc(r.get("text", ""))
        body.append([k + 1, score_bar(float(r["score"]), largest), Raw(f'<span class="seq">{text}</span>'),
                     *([Raw(strongest_token(tokens)) if tokens else ""] if has_tokens else []),
                     r.get("loss_change"), str(r.get("id", ""))])
    # the sequence right after its score: on a phone those are what fits before the box scrolls sideways
    headers = ["rank", "score", "training sequence", *(["strongest token"] if has_tokens else []),
               "loss change (nats)", "id"]
    return table(headers, body, numeric={0, len(headers) - 2}, text_cols={2})


def trace_sections(data: dict) -> list[str]:
    """The query (prompt, completion, its loss), then the proponents and opponents with score bars and, when
    the trace has token shares, each sequence's tokens highlighted with a legend."""
    q = data.get("query", {})
    results = sorted(data.get("results", []), key=lambda r: -float(r["score"]))
    proponents = [r for r in results if float(r["score"]) >= 0]
    opponents = [r for r in results if float(r["score"]) < 0][::-1]  # most negative first
    largest = max((abs(float(r["score"])) for r in results), default=0.0)
    c = data.get("candidates", {})
    loss = q.get("loss")
    out = ["<h2>Trace: the training sequences behind a completion</h2>",
           ('<div class="query"><span class="muted">prompt</span> '
           f'<span class="seq">{esc(q.get("prompt", ""))}</span><br><span class="muted">completion</span> '
           f'<b class="seq completion">{esc(q.get("completion", ""))}</b></div>'),
           (f"<p>Completion loss <b>{esc(fmt(loss, 4))}</b> nats (summed log-loss of the completion's tokens given "
           f"the prompt). Scored {esc(c.get('kept', '?'))} of {esc(c.get('of', '?'))} training sequences "
           f"(candidates: {esc(c.get('method', '?'))}); shown: the {len(results)} with the highest score. "
           "Score &gt; 0 (blue) = proponent: up-weighting the sequence makes the completion more likely; "
           "loss change = score / n, the predicted change of the completion's loss if it were removed.</p>")]
    if any(r.get("tokens") for r in results):
        out.append(LEGEND)
    out += [f"<h3>Proponents ({len(proponents)})</h3>",
            _rows_table(proponents, largest) if proponents else '<p class="muted">None among those shown.</p>',
            f"<h3>Opponents ({len(opponents)})</h3>",
            _rows_table(opponents, largest) if opponents else
            '<p class="muted">None among those shown (the trace lists the highest scores; an opponent has a '
            "negative one).</p>"]
    return out
