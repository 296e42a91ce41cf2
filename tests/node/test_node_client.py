"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader) against the live test cluster."""

from __future__ import annotations

import json
import subprocess

import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2

from cluster import protogen
from tests.tooling import NODE_DIR, require_node

pytestmark = pytest.mark.slow


def test_node_client_chats_with_a_tool_cancels_and_reads_health(frontdoor, tmp_path):
    node = require_node()
    health_set = tmp_path / "health.binpb"
    files = descriptor_pb2.FileDescriptorSet()
    health_pb2.DESCRIPTOR.CopyToProto(files.file.add())
    health_set.write_bytes(files.SerializeToString())
    result = subprocess.run([node, str(NODE_DIR / "client.mjs"), frontdoor.target, str(protogen.PROTO_ROOT),
                             str(health_set)], cwd=NODE_DIR, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    chat = report["chat"]
    assert chat["requestId"] == "node-chat-1"
    assert chat["deltas"] >= 1 and chat["text"].strip()
    # Random weights never speak harmony: every delta is tagged, as raw with no channel claimed.
    assert chat["channels"] == ["CHANNEL_UNSPECIFIED"] and chat["raw"] == chat["deltas"]
    complete = chat["complete"]
    assert complete["finish_reason"] == "FINISH_REASON_LENGTH"
    usage = complete["usage"]
    assert usage["completion_tokens"] == 16 and usage["prompt_tokens"] > 50  # tool schema rendered into it
    # Random weights produce no analysis channel; the rendered system prompt may be in the prefix cache
    # from an earlier chat, but never the whole prompt (the last token is always computed).
    assert usage["reasoning_tokens"] == 0 and 0 <= usage["cached_prompt_tokens"] < usage["prompt_tokens"]

    assert report["cancel"]["code"] == "CANCELLED" and report["cancel"]["chunks"] >= 2
    assert report["health"] == "SERVING"
    invalid = report["invalid"]
    assert invalid["code"] == "INVALID_ARGUMENT" and invalid["hasStatusDetails"]
    assert invalid["details"].startswith("prompt_token_ids:")
