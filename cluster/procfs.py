"""Processes as Linux's /proc shows them: whether one runs, a process's stat fields and threads, the process table,
a tree's descendants, and the Serve replica actors in it. Used by `serve` (cluster/serving/engine_cores.py),
the benchmarks and the tests that check what a command leaves running or how it is scheduled."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
# Fields of /proc/PID/stat after "pid (comm)", numbered from 0 (proc(5) numbers them from 3).
STATE, PARENT, SESSION, UTIME, STIME, NICE = 0, 1, 3, 11, 12, 16


def stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after "pid (comm)" (the command name may hold spaces and parentheses)."""
    return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a process killed and not yet reaped by its parent, a zombie, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return stat(pid)[STATE] != "Z"
    except (OSError, IndexError):
        return False


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


def serve_replicas(root: int, table: dict[int, tuple[int, str]] | None = None) -> list[int]:
    """The Ray Serve replica actors' processes below `root` (Ray titles them `ray::ServeReplica:...`)."""
    table = process_table() if table is None else table
    return [pid for pid in descendants(root, table) if "ServeReplica" in table[pid][1]]


def threads(pid: int) -> list[int]:
    """The thread ids of process `pid` (none once it has ended)."""
    try:
        return [int(tid) for tid in os.listdir(PROC / str(pid) / "task")]
    except OSError:
        return []
