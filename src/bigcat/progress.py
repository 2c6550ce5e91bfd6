"""Progress bars that show on a terminal and stay quiet elsewhere."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(*, total: int | None, unit: str, desc: str, enabled: bool | None = None) -> Iterator[tqdm]:
    """A tqdm bar (rate and ETA) on stderr.

    Parameters
    ----------
    total
        Number of units expected, or ``None`` when unknown.
    unit
        What is counted (``"cells"``).
    desc
        Label shown before the bar.
    enabled
        ``True``/``False`` force the bar on/off; ``None`` shows it only when stderr is a terminal.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    # SI prefixes (1.2M cells) for large counts only: small ones stay integers (3/16 blocks, not 3.00/16.0)
    scale = total is None or total >= 10_000
    bar = tqdm(
        total=total, unit=unit, desc=desc, disable=not enabled, unit_scale=scale, dynamic_ncols=True, file=sys.stderr
    )
    try:
        yield bar
    finally:
        bar.close()
