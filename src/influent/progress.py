"""Progress bars for long work (fits, scoring passes, retraining loops): one place to change how they look.

Every long loop in influent asks :func:`progress_bar` for its bar, so a quieter or log-based display (for
example when the output is not a terminal) is a change here, not in each loop.
"""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it") -> tqdm:
    """A progress bar over ``total`` steps (``enabled=False``: a silent one with the same interface).

    Args:
        total: number of steps.
        desc: what is being done, shown before the bar.
        enabled: show it at all.
        initial: steps already done (a resumed run).
        unit: what one step is.
    """
    return tqdm(total=total, desc=desc, disable=not enabled, initial=initial, unit=unit, leave=False)
