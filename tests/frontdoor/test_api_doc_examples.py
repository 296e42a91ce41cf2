"""Every HTTP example in docs/api.md (a block after `<!-- http-example -->`) runs as written
against a front door whose replicas answer in real harmony (tests/frontdoor/harmony_script.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from cluster.config import FrontdoorConfig
from cluster.frontdoor.auth import ApiKeys
from tests.frontdoor.harmony_script import HarmonyScriptHandle, ThreadedFrontdoor
from tests.tooling import REPO_ROOT, missing

KEY = "docs-key-0123456789abcdef"
EXAMPLES = re.findall(r"<!-- http-example -->\n```(bash|python)\n(.*?)```", (REPO_ROOT / "docs" / "api.md").read_text(),
                      re.S)


@pytest.fixture(scope="module")
def door():
    door = ThreadedFrontdoor(HarmonyScriptHandle(), FrontdoorConfig(grpc_port=0, metrics_port=-1, http_port=0),
                             api_keys=ApiKeys([("docs", KEY)]))
    yield door
    door.close()


def test_the_doc_has_curl_and_sdk_examples():
    assert [kind for kind, _ in EXAMPLES].count("bash") >= 3 and [kind for kind, _ in EXAMPLES].count("python") >= 2


@pytest.mark.parametrize("kind, code", EXAMPLES, ids=[f"{i}-{kind}" for i, (kind, _) in enumerate(EXAMPLES)])
def test_doc_example_runs(door, kind, code):
    if kind == "bash" and shutil.which("curl") is None:
        missing("curl")
    url = door.server.http_url
    env = dict(os.environ, GPTOSS_URL=url, GPTOSS_API_KEY=KEY, OPENAI_BASE_URL=url + "/v1", OPENAI_API_KEY=KEY)
    command = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.strip()
    if "chat/completions" in code:
        assert '"reasoning_content"' in out and '"usage"' in out
    if "/v1/responses" in code:
        assert "event: response.completed" in out
    if "get_weather" in code:
        assert "call get_weather {'city': 'Paris', 'unit': 'celsius'}" in out and "The tool said: 18 C" in out
    if "stream=True" in code:
        assert "You said: Why is the sky blue?" in out and "usage:" in out
