"""Edits of raw texts shared by attacks and defences (inserting a trigger phrase)."""

from __future__ import annotations

import hashlib


def insert_trigger(text: str, trigger: str, salt: int = 0) -> str:
    """``text`` with ``trigger`` inserted between two words (position fixed by a hash of text and salt)."""
    words = text.split()
    h = int(hashlib.sha256(f"{salt}\x00{text}".encode()).hexdigest()[:8], 16)
    pos = h % (len(words) + 1)
    return " ".join(words[:pos] + [trigger] + words[pos:])
