"""Processes as Linux's /proc shows them: a process's stat fields, the process table, a tree's
descendants and its CPU time. For the benchmarks (scripts/cpu_per_token.py) and the tests that
check what a command leaves running or how it is scheduled."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

PROC = Path("/proc")
# Fields of /proc/PID/stat after "pid (comm)", numbered from 0 (proc(5) numbers them from 3).
STATE, PARENT, SESSION, UTIME, STIME, NICE = 0, 1, 3, 11, 12, 16


def stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after "pid (comm)" (the command name may hold spaces and parentheses)."""
    return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def cmdline(pid: int) -> str:
    return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process (those that end meanwhile left out)."""
    table = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            table[int(entry.name)] = (int(stat(int(entry.name))[PARENT]), cmdline(int(entry.name)))
        except (OSError, IndexError):
            continue
    return table


def descendants(root: int, table: dict[int, tuple[int, str]] | None = None) -> set[int]:
    """Every process below `root`."""
    table = process_table() if table is None else table
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def serve_replicas(root: int) -> list[int]:
    """The Ray Serve replica actors' processes below `root` (Ray titles them `ray::ServeReplica:...`)."""
    table = process_table()
    return [pid for pid in descendants(root, table) if "ServeReplica" in table[pid][1]]


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
