"""Structured, quiet logging: one `key=value` line per record on stderr."""

from __future__ import annotations

import calendar
import logging
import sys
import time

_TS = "%Y-%m-%dT%H:%M:%S"  # UTC, then .mmmZ


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime(_TS, time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        message = record.getMessage().replace('"', "'")
        line = f'ts={ts} level={record.levelname.lower()} logger={record.name} msg="{message}"'
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def logged_at(line: str) -> float:
    """When a KeyValueFormatter line was logged (Unix seconds, to the millisecond)."""
    stamp = line[len("ts="):line.index(" ")]  # 2026-12-06T11:09:20.123Z
    return calendar.timegm(time.strptime(stamp[:19], _TS)) + float(stamp[19:-1])


def configure(level: str = "warning") -> None:
    """Send our loggers (`cluster.*`) to stderr at `level`; other libraries stay at warning."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    ours = logging.getLogger("cluster")
    ours.handlers[:] = [handler]
    ours.setLevel(level.upper())
    ours.propagate = False
