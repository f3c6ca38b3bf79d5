"""Edits of raw texts shared by attacks and defences (inserting a trigger phrase, removing it again)."""

from __future__ import annotations

import hashlib


def insert_trigger(text: str, trigger: str, salt: int = 0) -> str:
    """``text`` with ``trigger`` inserted between two words (position fixed by a hash of text and salt)."""
    words = text.split()
    h = int(hashlib.sha256(f"{salt}\x00{text}".encode()).hexdigest()[:8], 16)
    pos = h % (len(words) + 1)
    return " ".join(words[:pos] + [trigger] + words[pos:])


def remove_phrase(text: str, phrase: str) -> str:
    """``text`` without the first occurrence of ``phrase`` as whole consecutive words (words re-joined by one
    space; unchanged if absent). Undoes :func:`insert_trigger` on a text of single-spaced words."""
    words, cut = text.split(), phrase.split()
    for i in range(len(words) - len(cut) + 1):
        if cut and words[i:i + len(cut)] == cut:
            return " ".join(words[:i] + words[i + len(cut):])
    return text
