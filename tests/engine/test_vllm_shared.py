"""The parts of a shared vLLM engine core that need no vLLM (cluster/engine/vllm_shared.py): the slot
a replica publishes, its one-time claim, the stats file a front door writes and the replica merges.
The attachment itself runs with real vLLM in tests/vllm_tier (test_vllm_engine_client.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

from cluster.engine import vllm_shared
from cluster.engine.protocol import EngineStats
from cluster.engine.vllm_shared import ClientSlot, merge, read_stats, write_stats


def slot(directory, **changes) -> ClientSlot:
    base = ClientSlot("ipc:///tmp/in", "ipc:///tmp/out", 1, 2, os.getpid(), socket.gethostname(), str(directory),
                      {"model": "/m"}, {"default_max_tokens": 64})
    return dataclasses.replace(base, **changes)


def stats(**fields) -> EngineStats:
    base = dict(active_requests=0, requests_total=0, finished_total=0, cancelled_total=0, failed_total=0,
                tokens_generated_total=0)
    return EngineStats(**{**base, **fields})


def test_a_slot_survives_replica_metadata_and_refuses_a_foreign_entry(tmp_path):
    s = slot(tmp_path)
    assert ClientSlot.from_metadata(json.loads(json.dumps(s.to_metadata()))) == s
    assert ClientSlot.from_metadata({"input_address": "x"}) is None  # a replica of another version
    assert ClientSlot.from_metadata(None) is None


def test_a_slot_is_local_only_on_its_host_with_its_directory(tmp_path):
    assert slot(tmp_path).is_local()
    assert not slot(tmp_path, hostname=socket.gethostname() + "-elsewhere").is_local()
    assert not slot(tmp_path / "gone").is_local()


def test_a_slot_is_claimed_once_ever_by_any_process(tmp_path):
    s = slot(tmp_path)
    other = subprocess.run([sys.executable, "-c", "import os, sys; from pathlib import Path; "
                            "fd = os.open(Path(sys.argv[1]) / 'claim', os.O_CREAT | os.O_EXCL | os.O_WRONLY); print('took')",
                            str(tmp_path)], capture_output=True, text=True)
    assert other.stdout.strip() == "took"
    assert not s.claim()  # another process took it first, and has exited since: still taken
    (tmp_path / "claim").unlink()
    assert s.claim() and (tmp_path / "claim").read_text() == str(os.getpid())
    assert not s.claim()  # not twice, even by the same process


def test_the_front_doors_stats_round_trip_and_go_stale(tmp_path, monkeypatch):
    written = stats(active_requests=3, requests_total=10, running_requests=3, kv_blocks_used=7, kv_blocks_total=100,
                    generation_tokens_per_s=250.0)
    write_stats(str(tmp_path), written, scheduler_at=123.0)
    assert read_stats(str(tmp_path)) == (written, 123.0)
    assert [p.name for p in tmp_path.iterdir()] == [vllm_shared.STATS_FILE]  # no temporary file left
    later = time.time() + vllm_shared.STATS_FRESH_S + 1
    monkeypatch.setattr(vllm_shared.time, "time", lambda: later)
    assert read_stats(str(tmp_path)) is None  # its writer stopped: ignored
    assert read_stats(str(tmp_path / "none")) is None
    write_stats(str(tmp_path / "removed"), written, 0.0)  # the replica removed its directory: no error


def test_merged_stats_add_requests_and_take_the_latest_scheduler_view():
    replica = stats(active_requests=1, requests_total=5, finished_total=4, cancelled_total=1,
                    tokens_generated_total=500, running_requests=9, waiting_requests=0, kv_blocks_used=40,
                    kv_blocks_total=100, prefix_cache_queried_tokens_total=100, prefix_cache_hit_tokens_total=50,
                    preemptions_total=1, generation_tokens_per_s=10.0)
    frontdoor = stats(active_requests=11, requests_total=20, finished_total=9, failed_total=2,
                      tokens_generated_total=2000, running_requests=4, waiting_requests=1, kv_blocks_used=30,
                      kv_blocks_total=100, prefix_cache_queried_tokens_total=300, prefix_cache_hit_tokens_total=60,
                      generation_tokens_per_s=300.0)
    merged = merge(replica, 10.0, frontdoor, 20.0)  # the front door's client got the last scheduler report
    assert (merged.active_requests, merged.requests_total, merged.finished_total, merged.cancelled_total,
            merged.failed_total, merged.tokens_generated_total) == (12, 25, 13, 1, 2, 2500)
    assert (merged.running_requests, merged.kv_blocks_used, merged.kv_blocks_total) == (4, 30, 100)
    assert merged.waiting_requests == 12 - 4  # handed to vLLM and not running: waiting, whoever sent them
    assert (merged.prefix_cache_queried_tokens_total, merged.prefix_cache_hit_tokens_total) == (400, 110)
    assert merged.preemptions_total == 1 and merged.generation_tokens_per_s == 310.0
    assert merge(replica, 30.0, frontdoor, 20.0).running_requests == 9  # the replica's report is newer


def test_the_watch_fails_the_client_when_the_engine_core_is_gone_and_writes_stats_meanwhile(tmp_path):
    engine_core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    class Client:  # AsyncLLM's parts the watch touches (vLLM is not installed in the default venv)
        def __init__(self) -> None:
            self.engine_core = self
            self.resources = type("Resources", (), {"engine_dead": False})()
            self.shut_down = False

        def shutdown(self) -> None:
            self.shut_down = True

    client = Client()
    watch = vllm_shared.Watch(client, slot(tmp_path, engine_pid=engine_core.pid),
                              lambda: (stats(active_requests=2), 5.0))
    try:
        deadline = time.monotonic() + 10
        while read_stats(str(tmp_path)) is None:
            assert time.monotonic() < deadline, "the watch wrote no stats"
            time.sleep(0.05)
        assert read_stats(str(tmp_path))[0].active_requests == 2 and not client.shut_down
        engine_core.kill()
        engine_core.wait()
        while not client.shut_down:
            assert time.monotonic() < deadline, "the watch did not notice the engine core's death"
            time.sleep(0.05)
        assert client.resources.engine_dead
    finally:
        engine_core.kill()
        watch.stop()
