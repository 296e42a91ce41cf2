"""Structured, quiet logging: one `key=value` line per record on stderr."""

from __future__ import annotations

import logging
import sys
import time


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        message = record.getMessage().replace('"', "'")
        line = f'ts={ts} level={record.levelname.lower()} logger={record.name} msg="{message}"'
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str = "warning") -> None:
    """Send our loggers (`cluster.*`) to stderr at `level`; other libraries stay at warning."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    ours = logging.getLogger("cluster")
    ours.handlers[:] = [handler]
    ours.setLevel(level.upper())
    ours.propagate = False
