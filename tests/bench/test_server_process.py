"""The benches start their servers one after the other; stopping one waits for every process it
started (a server's Ray daemons and vLLM's engine processes exit after it), so the next server
never shares the cores with what is left of the last."""

from __future__ import annotations

import os
import sys
import time

from cluster.bench.overhead import ServerProcess
from cluster.bench.processes import session_members

# A server whose child outlives it: the child ignores SIGTERM and sleeps on.
LINGERING_SERVER = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])\n"
    "print('ready', flush=True)\n"
    "time.sleep(300)\n")


def test_stopping_a_server_ends_what_it_left_running_in_its_session(tmp_path):
    server = ServerProcess("lingering", [sys.executable, "-c", LINGERING_SERVER], dict(os.environ), "ready", tmp_path)
    server.wait_ready(time.monotonic() + 60)
    session = server.proc.pid  # the server leads a session of its own
    assert len(session_members(session)) == 2
    started = time.monotonic()
    server.stop(timeout=2.0)
    assert session_members(session) == []
    assert time.monotonic() - started < 10  # the child was waited for 2 s, then killed
