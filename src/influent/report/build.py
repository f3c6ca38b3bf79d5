"""``influent report``: one self-contained HTML page from any of influent's JSON outputs.

The kind is read from the JSON's shape: ``explain --json`` / the demo's explanations, ``audit``'s
``ranking.json``, ``validate.json``, ``attack_KIND.json``, ``trace --json`` (a causal LM's completion traced to
its training sequences, with token highlighting when it has token shares). An explanation whose items carry
``tokens`` and ``token_scores`` renders with token highlighting too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from influent.errors import UserError
from influent.report.attack import attack_sections
from influent.report.audit import audit_sections
from influent.report.explanations import explain_sections
from influent.report.page import page
from influent.report.trace import trace_sections
from influent.report.validation import validate_sections


def _is_trace(d: dict) -> bool:
    return isinstance(d.get("query"), dict) and "completion" in d["query"] and isinstance(d.get("results"), list)


def _is_explain(d: dict) -> bool:
    return "explanations" in d or ("query" in d and ("proponents" in d or "opponents" in d))


# kind -> (recognises the JSON, builds its sections, page title); first match wins.
KINDS: dict[str, tuple[Callable[[dict], bool], Callable[[dict], list[str]], str]] = {
    "trace": (_is_trace, trace_sections, "influent trace"),
    "explain": (_is_explain, explain_sections, "influent explain"),
    "audit": (lambda d: "rows" in d and "rankers" in d, audit_sections, "influent audit"),
    "validate": (lambda d: "estimates" in d and "ground_truth" in d, validate_sections, "influent validate"),
    "attack": (lambda d: "summary" in d and "rows" in d and "kind" in d, attack_sections, "influent attack"),
}


def report_kind(data) -> str:
    """The kind of influent output ``data`` is (a key of :data:`KINDS`), or a UserError naming ``input``."""
    if isinstance(data, dict):
        for kind, (matches, _, _) in KINDS.items():
            if matches(data):
                return kind
    raise UserError("input is not an influent JSON output (explain, trace, audit, validate or attack)", field="input")


def build_report(data: dict, kind: str | None = None, source: str = "") -> str:
    """The HTML text of the report of ``data`` (its kind detected unless given)."""
    kind = kind or report_kind(data)
    _, sections, title = KINDS[kind]
    subtitle = f"{kind} report" + (f" of {source}" if source else "") + "; self-contained: no network needed."
    return page(title, subtitle, sections(data), data)


def write_report(data: dict, path: str | Path, kind: str | None = None, source: str = "") -> Path:
    """Write the report of ``data`` to ``path`` atomically (temp file, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = build_report(data, kind, source)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def report_from_file(json_path: str | Path, out: str | Path | None = None) -> tuple[Path, str]:
    """Read an influent JSON output and write its report (default: beside it, ``.html``); (path, kind)."""
    json_path = Path(json_path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"input {str(json_path)!r} does not exist", field="input") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"input {str(json_path)!r} is not JSON ({err})", field="input") from None
    kind = report_kind(data)
    out = Path(out) if out is not None else json_path.with_suffix(".html")
    return write_report(data, out, kind, source=json_path.name), kind
