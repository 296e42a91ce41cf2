"""The weights download step the chart renders (an init container of each worker pod), run here
as the shell script it is: with `source: preset` it writes the tiny checkpoint with
`gptoss-cluster checkpoint make`, leaves an existing checkpoint alone, and of two pods racing on
one volume exactly one writes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helm.helm_chart import one, render
from tests.tooling import REPO_ROOT


def download_script(tmp_path) -> tuple[str, dict, object]:
    target = tmp_path / "models" / "gpt-oss-tiny"
    target.parent.mkdir()
    pod = one(render("tiny-cpu", **{"model.path": str(target), "model.volume.mountPath": str(target.parent)}),
              "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["command"] == ["/bin/sh", "-c"]
    # The image's `gptoss-cluster` command, from this checkout.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "gptoss-cluster"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m cluster \"$@\"\n")
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO_ROOT)}
    return init["args"][0], env, target


def run(script, env, hostname):
    # `hostname` names the temporary directory; give each simulated pod its own.
    return subprocess.Popen(["/bin/sh", "-c", f"hostname() {{ echo {hostname}; }}\n{script}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_preset_download_writes_the_checkpoint_once_and_racing_pods_are_safe(tmp_path):
    script, env, target = download_script(tmp_path)
    pods = [run(script, env, f"worker-{i}") for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in pods]
    assert [p.returncode for p in pods] == [0, 0], outputs
    config = json.loads((target / "config.json").read_text())
    assert config["num_hidden_layers"] >= 1
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".partial")]  # no leftovers
    assert not (target / target.name).exists()  # the loser did not nest its copy inside
    again = run(script, env, "worker-2")
    assert f"weights already at {target}" in again.communicate(timeout=60)[0]
    assert again.returncode == 0
