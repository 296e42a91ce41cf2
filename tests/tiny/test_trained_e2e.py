"""gpt-oss-tiny end to end through the real stack: gRPC Chat -> front door -> Ray Serve replica ->
torch engine (expert parallel 1 and 2) -> the trained checkpoint, with real harmony conversations
(tests/tiny/conversations.py): channels streamed in order, the trained answers, tool calls, a tool
result fed back, multi-turn, reasoning effort, usage and stop tokens."""

from __future__ import annotations

import copy

import pytest

from tests.parallel.ep_apps import EpApp
from tests.tiny.conversations import EVERY_CONVERSATION

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=[1, 2], ids=["ep1", "ep2"])
def tiny_stub(request, ray_serving, serving_config, trained_checkpoint):
    config = copy.deepcopy(serving_config)
    config.model.path, config.model.name = str(trained_checkpoint), "gpt-oss-tiny"
    app = EpApp(config, f"gptoss-tiny-ep{request.param}", ep_size=request.param)
    yield app.stub
    app.close()


@EVERY_CONVERSATION
def test_a_real_conversation(tiny_stub, check):
    check(tiny_stub)
