"""ServingRuntime.stop() in a process that lives on after it (a test session, an embedding program):
nothing of the stopped Serve app keeps calling into Ray. A DeploymentHandle's router pushes
autoscaling metrics every serving.autoscaling.metrics_interval_s; left running after
ray.shutdown(), its next push made Ray start a whole new local instance (Ray's auto-init) and log
a traceback about an object of the old session at each push after that. Every handle Serve gave
the process counts: the one start_serving keeps, and those from serve.run or serve.get_app_handle
elsewhere (tests deploy apps of their own on the session's Ray). The driver runs in a
subprocess: it starts and stops a Ray of its own, which the test session's Ray must not be."""

from __future__ import annotations

import subprocess
import sys

DRIVER = """
import sys, time
import ray
from ray import serve
from cluster.config import load_config
from cluster.serving.builder import build_app
from cluster.serving.runtime import start_serving

def config(app_name):
    return load_config(overrides={
        "model.path": sys.argv[1], "model.preset": "", "cache_dir": sys.argv[2], "ray.num_cpus": 2,
        "ray.temp_dir": sys.argv[3], "serving.app_name": app_name, "serving.autoscaling.enabled": True,
        "serving.autoscaling.metrics_interval_s": 0.5})

runtime = start_serving(config("gptoss"))
runtime.handle.stats.remote().result(timeout_s=60)  # its router is up and pushing metrics
# an app of another caller's on the same Ray, as tests deploy, used and deleted before the stop
other = serve.run(build_app(config("other")), name="other", route_prefix=None)
other.stats.remote().result(timeout_s=60)
serve.delete("other")
runtime.stop()
time.sleep(3.0)  # six pushes' worth
print("ray initialized after stop:", ray.is_initialized(), flush=True)
"""


def test_a_stopped_runtime_leaves_no_handle_calling_into_ray(tiny_checkpoint, cache_dir, short_tmp):
    driver = subprocess.run([sys.executable, "-c", DRIVER, str(tiny_checkpoint), str(cache_dir), str(short_tmp)],
                            capture_output=True, text=True, timeout=240)
    output = driver.stdout + driver.stderr
    assert driver.returncode == 0, output[-3000:]
    assert "ray initialized after stop: False" in driver.stdout, output[-3000:]
    assert "Started a local Ray instance" not in output, output[-3000:]  # start_serving's own start is quiet
    assert "owner is unknown" not in output, output[-3000:]
