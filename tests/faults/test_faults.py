"""The fault-injection suite: each scenario of tests/faults/scenarios.py (a cluster shape, a load,
a fault at a time, checks) in a process of its own on a real multi-node Ray cluster; prints one
table row per scenario (sent, completed, migrated, failed by status, hung, time to recover).
A scenario that does not finish within its time counts as hung."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

TIMEOUT_S = 420  # "spread" starts 3 replicas at once: ~4.5 min on the loaded 2-core box
ROWS: list[dict] = []


def _run(name: str, checkpoint, cache_dir) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        done = subprocess.run([sys.executable, "-m", "tests.faults.scenarios", name, str(checkpoint), str(cache_dir)],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"scenario {name} hung past {TIMEOUT_S} s:\n{(err.stderr or b'')[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"scenario {name} printed no result (exit {done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _table(row: dict) -> str:
    failed = ",".join(f"{k}:{v}" for k, v in sorted(row["failed"].items())) or "-"
    return (f"{row['scenario'][:44]:44} sent {row['sent']:3} completed {row['completed']:3} migrated "
            f"{row['migrated']:3} failed {failed:14} hung {row['hung']} recover {row['recover_s']:6.2f} s")


@pytest.mark.parametrize("name", ["replica_killed", "node_lost", "ep_rank_killed", "no_replica", "controller_killed",
                                  "head_restart", "burst", "spread", "drain", "unplaceable", "sigterm_start"])
def test_scenario(name, tiny_checkpoint, cache_dir):
    row = _run(name, tiny_checkpoint, cache_dir)
    ROWS.append(row)
    print("\n" + "\n".join(_table(r) for r in ROWS))
    failed = [check for check, ok in row["checks"].items() if not ok]
    assert not failed, f"{name}: {failed}\n{json.dumps(row, indent=1)}"
    assert row["hung"] == 0
