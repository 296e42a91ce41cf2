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


def test_watch_ray_stops_after_missed_checks(monkeypatch):
    import ray

    def unreachable():
        raise ConnectionError("GCS gone")

    monkeypatch.setattr(ray, "cluster_resources", unreachable)

    async def run():
        stop = asyncio.Event()
        await asyncio.wait_for(watch_ray(stop, period_s=0.01, misses=3), 5)
        return stop

    stop = asyncio.run(run())
    assert stop.is_set() and stop.lost_ray


@pytest.mark.slow
def test_wait_for_app_finds_a_deployed_app_and_times_out_naming_a_missing_one(ray_serving, serving_config):
    handle = wait_for_app(serving_config.serving.app_name, 10)
    assert handle.model_info.remote().result(timeout_s=60).model_name == "gpt-oss-tiny-test"
    with pytest.raises(TimeoutError, match="'no-such-app'"):
        wait_for_app("no-such-app", 0)
