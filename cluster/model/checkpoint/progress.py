"""The progress bar of long checkpoint writes and loads."""

from __future__ import annotations

import sys

PROGRESS_MIN_BYTES = 256 << 20  # an automatic progress bar appears for loads and writes at least this big


def progress_bar(total: int, progress: bool | None, desc: str):
    from tqdm import tqdm

    if progress is None:
        progress = total >= PROGRESS_MIN_BYTES and sys.stderr.isatty()
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False)
