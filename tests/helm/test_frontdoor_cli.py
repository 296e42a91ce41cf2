"""`gptoss-cluster frontdoor`, the command the chart's front door pods run: it refuses to start
without a Ray cluster to join, finds a deployed application by name (or times out naming it), and
stops when the Ray cluster stops answering so Kubernetes restarts the pod."""

from __future__ import annotations

import asyncio

import pytest

from cluster.cli import main
from cluster.cli.frontdoor import wait_for_app, watch_ray


def test_frontdoor_needs_a_ray_address(capsys, monkeypatch):
    monkeypatch.delenv("GPTOSS_RAY_ADDRESS", raising=False)
    assert main(["frontdoor"]) == 2
    assert "needs a Ray cluster to join" in capsys.readouterr().err


def test_frontdoor_refuses_a_bad_config_naming_the_field(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("frontdoor:\n  grpc_port: 70000\nray:\n  address: auto\n")
    assert main(["frontdoor", "--config", str(path)]) == 2
    assert "frontdoor.grpc_port" in capsys.readouterr().err


def test_watch_ray_stops_once_the_gcs_has_not_answered_for_the_timeout(monkeypatch):
    import ray

    def unreachable():
        raise ConnectionError("GCS gone")

    monkeypatch.setattr(ray, "cluster_resources", unreachable)

    async def run():
        stop = asyncio.Event()
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(watch_ray(stop, lost_after_s=0.3, period_s=0.01), 5)
        return stop, asyncio.get_running_loop().time() - started

    stop, took_s = asyncio.run(run())
    assert stop.is_set() and stop.lost_ray
    assert 0.3 <= took_s < 2


def test_watch_ray_rides_out_a_gcs_restart_with_one_check_at_a_time(monkeypatch):
    """A GCS that hangs (checks block, as Ray's client does while it reconnects) and then fails
    fast, for less than the timeout in all, then answers again: the front door keeps going, and
    never has more than one check waiting."""
    import threading
    import time

    import ray

    started = time.monotonic()
    waiting, most_waiting, lock = 0, 0, threading.Lock()

    def gcs():
        nonlocal waiting, most_waiting
        with lock:
            waiting += 1
            most_waiting = max(most_waiting, waiting)
        try:
            down_for = time.monotonic() - started
            if down_for < 0.3:
                time.sleep(0.3)  # hangs while reconnecting
            elif down_for < 0.6:
                raise ConnectionError("GCS restarting")
            return {"CPU": 1.0}
        finally:
            with lock:
                waiting -= 1

    monkeypatch.setattr(ray, "cluster_resources", gcs)

    async def run():
        stop = asyncio.Event()
        watching = asyncio.create_task(watch_ray(stop, lost_after_s=1.5, period_s=0.02))
        await asyncio.sleep(2.5)  # longer than the timeout, but the GCS answered after 0.6 s
        lost = stop.is_set()
        watching.cancel()
        return lost

    assert asyncio.run(run()) is False
    assert most_waiting == 1


@pytest.mark.slow
def test_wait_for_app_finds_a_deployed_app_and_times_out_naming_a_missing_one(ray_serving, serving_config):
    handle = wait_for_app(serving_config.serving.app_name, 10)
    assert handle.model_info.remote().result(timeout_s=60).model_name == "gpt-oss-tiny-test"
    with pytest.raises(TimeoutError, match="'no-such-app'"):
        wait_for_app("no-such-app", 0)
