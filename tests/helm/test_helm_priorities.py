"""The chart sets the priority of Ray's worker processes (replicas, engine processes) on every
Ray container, instead of Ray's default nice 15 below the daemons and serving path."""

from __future__ import annotations

import pytest

from tests.helm.helm_chart import PRESETS, one, render, render_error


def _ray_containers(objects) -> list[dict]:
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_ray_container_runs_workers_at_nice_0_by_default(preset):
    containers = _ray_containers(render(preset))
    assert len(containers) >= 2  # the head and at least one worker group
    for container in containers:
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_worker_niceness"] == "0", container["name"]


def test_worker_niceness_is_a_value_checked_by_the_schema():
    for container in _ray_containers(render(**{"ray.workerNiceness": "5"})):
        assert {e["name"]: e.get("value") for e in container["env"]}["RAY_worker_niceness"] == "5"
    assert "workerNiceness" in render_error(**{"ray.workerNiceness": "25"})
