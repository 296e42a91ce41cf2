"""This process's resident memory, for the reports that state it (replica start-up, bench roofline)."""

from __future__ import annotations

import resource
from pathlib import Path


def resident_bytes() -> tuple[int, int]:
    """(now, peak) resident bytes of this process (Linux: /proc/self/statm and getrusage). The kernel
    updates the peak lazily, so it can trail the current figure by a few pages."""
    now = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    return now, max(now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
