"""docs/configuration.md is generated from cluster/config.py and current; every key is described;
the example file deploy/config.example.yaml is a valid configuration."""

from __future__ import annotations

import subprocess
import sys

import yaml

from cluster.config import FIELDS, ClusterConfig, load_config, markdown_reference
from tests.tooling import REPO_ROOT

DOC = REPO_ROOT / "docs" / "configuration.md"
EXAMPLE = REPO_ROOT / "deploy" / "config.example.yaml"


def test_every_key_has_a_description():
    undescribed = [path for path, info in FIELDS.items() if not (info.description or "").strip()]
    assert not undescribed, f"give these fields a docstring in cluster/config.py: {undescribed}"


def test_the_committed_reference_is_current():
    assert DOC.read_text() == markdown_reference(), \
        "docs/configuration.md is stale: run `python -m cluster.config --markdown > docs/configuration.md`"


def test_the_reference_lists_every_key_with_its_env_var_and_constraint():
    doc = DOC.read_text()
    for path in FIELDS:
        assert f"| `{path}` |" in doc
    row = next(line for line in doc.splitlines() if line.startswith("| `frontdoor.grpc_port` |"))
    assert "`50051`" in row and "in [0, 65535]" in row and "`GPTOSS_FRONTDOOR_GRPC_PORT`" in row


def test_the_generator_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "cluster.config", "--markdown"], capture_output=True, text=True,
                         check=True, cwd=REPO_ROOT, timeout=120).stdout
    assert out == markdown_reference()


def test_the_example_file_is_a_valid_configuration_that_sets_what_it_says():
    config = load_config(EXAMPLE, env={})
    assert config.engine.kind == "vllm" and config.model.path == "/models/gpt-oss-20b"
    assert config.serving.max_ongoing_requests >= config.engine.max_num_seqs + config.engine.max_waiting_requests
    assert config.frontdoor.responses.kind == "redis" and config.ray.address == "auto"
    # Every value the file sets differs from the default, so none of it is noise.
    defaults = ClusterConfig()

    def leaves(data, prefix=""):
        for key, value in data.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    for path in leaves(yaml.safe_load(EXAMPLE.read_text())):
        node_default, node = defaults, config
        for part in path.split("."):
            node_default, node = getattr(node_default, part), getattr(node, part)
        assert node != node_default, f"{path} in the example only repeats the default"
