"""Processes for the benchmarks (scripts/cpu_per_token.py) and the tests that check what a command
leaves running or how it is scheduled: sessions, CPU time, priority (on cluster/procfs.py's /proc
reading)."""

from __future__ import annotations

import os
import signal
import time

from cluster.procfs import NICE, PROC, SESSION, STATE, STIME, UTIME, process_table, stat


def session_members(sid: int) -> list[int]:
    """The live processes of session `sid` (zombies, which hold no CPU or memory, left out)."""
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = stat(int(entry.name))
        except (OSError, IndexError):
            continue
        if int(fields[SESSION]) == sid and fields[STATE] != "Z":
            members.append(int(entry.name))
    return members


def end_session(sid: int, timeout: float) -> list[int]:
    """Wait until session `sid`, led by a server that has exited, has no process left (a server's
    Ray daemons and vLLM's engine processes exit after it), SIGKILL what is left after `timeout`;
    return the pids that had to be killed."""
    deadline = time.monotonic() + timeout
    while (left := session_members(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5.0  # a killed process is gone only once the kernel has torn it down
    while left and session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def alive(pids) -> set[int]:
    table = process_table()
    return {pid for pid in pids if pid in table}


def _cpu_s(fields: list[str]) -> float:
    return (int(fields[UTIME]) + int(fields[STIME])) / os.sysconf("SC_CLK_TCK")


def cpu_s(pids) -> float:
    """User + system CPU seconds of `pids` (all their threads) so far; every one must still run."""
    return sum(_cpu_s(stat(pid)) for pid in pids)


def cpu_s_each(pids) -> dict[int, float]:
    """User + system CPU seconds so far of each of `pids` that still runs."""
    found = {}
    for pid in pids:
        try:
            found[pid] = _cpu_s(stat(pid))
        except OSError:
            continue
    return found


def nice(pid: int) -> int:
    return int(stat(pid)[NICE])
