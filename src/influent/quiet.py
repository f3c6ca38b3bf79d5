"""Keep the expected notes of the libraries influent calls out of the user's way (errors still show).

Loading a pre-trained encoder under a new classification head makes transformers print a table of the
head's weights as ``MISSING`` ("newly initialized ... consider training"): expected, since influent trains
that head next. :func:`expected_load_notes_hidden` hides such warnings around the one call that causes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def expected_load_notes_hidden() -> Iterator[None]:
    """Run the block with transformers' logging at ERROR (its loading report is a WARNING), then restore it."""
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)
