"""The official `openai` npm package as a client of the HTTP API (tests/node/openai_client.mjs),
against a front door whose replicas answer in real harmony (tests/frontdoor/harmony_script.py)."""

from __future__ import annotations

import json
import shutil
import subprocess

from cluster.config import FrontdoorConfig
from cluster.frontdoor.auth import ApiKeys
from tests.frontdoor.harmony_script import CALL_ARGUMENTS, INFO, REASONING, HarmonyScriptHandle, ThreadedFrontdoor
from tests.tooling import NODE_DIR, missing

KEY = "node-key-0123456789abcdef"


def test_node_openai_sdk_chats_calls_a_tool_streams_responses_and_reads_errors():
    node = shutil.which("node")
    if node is None:
        missing("node")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        missing("tests/node/node_modules/openai (npm install --prefix tests/node)")
    door = ThreadedFrontdoor(HarmonyScriptHandle(chunk_tokens=4),
                             FrontdoorConfig(grpc_port=0, metrics_port=-1, http_port=0), api_keys=ApiKeys([("n", KEY)]))
    try:
        result = subprocess.run([node, str(NODE_DIR / "openai_client.mjs"), door.base_url, KEY, INFO.model_name],
                                cwd=NODE_DIR, capture_output=True, text=True, timeout=120)
    finally:
        door.close()
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["chat"]["content"] == "You said: hi. (user turns: 1)"
    assert report["chat"]["reasoning"] == REASONING
    assert report["chat"]["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    call = report["toolCall"]
    assert call["name"] == "get_weather" and call["arguments"] == CALL_ARGUMENTS and call["argumentDeltas"] > 3
    assert call["finish"] == "tool_calls" and call["usage"]["completion_tokens"] > 0
    assert report["toolAnswer"] == "The tool said: 18 C and sunny. (user turns: 1)"
    events = report["responses"]["events"]
    assert events[:2] == ["response.created", "response.in_progress"] and events[-1] == "response.completed"
    assert "response.reasoning_text.delta" in events and "response.output_text.delta" in events
    assert report["responses"]["followUp"] == "You said: Reverse: green apple. (user turns: 2)"
    assert report["responses"]["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
    errors = report["errors"]
    assert errors["badField"]["status"] == 400 and errors["badField"]["param"] == "temperature"
    assert errors["unknownModel"]["status"] == 404 and errors["unknownModel"]["param"] == "model"
    assert errors["unknownResponse"]["status"] == 404
    assert errors["badKey"]["status"] == 401 and errors["badKey"]["code"] == "api_key_invalid"
    assert errors["badField"]["requestId"]
