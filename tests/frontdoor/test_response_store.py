"""Stored responses: the in-process store and the Redis store (a real redis-server on a free
loopback port), and previous_response_id across TWO front door processes sharing one Redis, a
front door restart, tenant isolation, TTL, the size bound, and Redis going away (503)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import openai
import pytest

from cluster.config import ResponseStoreConfig
from cluster.frontdoor.http.store import MemoryResponseStore, RedisResponseStore
from cluster.sockets import free_port
from tests.frontdoor.harmony_script import INFO
from tests.tooling import REPO_ROOT, missing
from tests.waiting import async_wait_until

KEY, OTHER_KEY = "acme-key-0123456789abcdef", "other-key-0123456789abcdef"


@pytest.fixture(scope="module")
def redis_url():
    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def stores(redis_url: str, **fields):
    config = ResponseStoreConfig(kind="redis", redis_url=redis_url, **fields)
    return [MemoryResponseStore(config), RedisResponseStore(config)]


def test_both_stores_keep_records_per_tenant_with_ttl_and_size_bound(redis_url):
    async def body():
        for store in stores(redis_url, ttl_s=0.5, max_response_bytes=2048):
            name = type(store).__name__
            record = {"response": {"id": "resp_1"}, "conversation": [{"role": "user", "content": "hi"}]}
            assert await store.put("acme", "resp_1", record), name
            assert await store.get("acme", "resp_1") == record, name
            assert await store.get("other", "resp_1") is None, name  # another tenant's id is simply unknown
            assert not await store.delete("other", "resp_1"), name
            assert not await store.put("acme", "resp_big", {"conversation": ["x" * 4096]}), name
            assert await store.get("acme", "resp_big") is None, name
            async def expired():
                return await store.get("acme", "resp_1") is None

            await async_wait_until(expired, timeout=10, message=f"{name}: kept past its TTL")
            assert await store.put("acme", "resp_2", record) and await store.delete("acme", "resp_2"), name
            assert await store.get("acme", "resp_2") is None, name
            await store.close()
    asyncio.run(body())


def test_memory_store_drops_the_oldest_beyond_max_entries():
    async def body():
        store = MemoryResponseStore(ResponseStoreConfig(max_entries=2))
        for i in range(3):
            await store.put("t", f"r{i}", {"i": i})
        assert [await store.get("t", f"r{i}") for i in range(3)] == [None, {"i": 1}, {"i": 2}]
    asyncio.run(body())


class FrontdoorProcess:
    """`python -m tests.frontdoor.harmony_script`: a front door process over the harmony script."""

    def __init__(self, redis_url: str, **handle) -> None:
        overrides = {"frontdoor.http_port": 0, "frontdoor.grpc_port": 0, "frontdoor.metrics_port": 0,
                     "frontdoor.load_poll_interval_s": 0,  # a scripted handle: no Serve replicas to poll
                     "frontdoor.responses.kind": "redis", "frontdoor.responses.redis_url": redis_url}
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), GPTOSS_API_KEYS=f"acme:{KEY},other:{OTHER_KEY}")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.frontdoor.harmony_script", json.dumps(overrides),
                                      json.dumps(handle)],
                                     cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("READY"), self.proc.stderr.read()[-3000:]
        self.base_url = f"http://127.0.0.1:{line.split()[1]}/v1"
        self.metrics_url = f"http://127.0.0.1:{line.split()[3]}/metrics"

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0)

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def test_previous_response_id_across_two_frontdoor_processes_and_a_restart(redis_url):
    a, b = FrontdoorProcess(redis_url), FrontdoorProcess(redis_url)
    try:
        first = a.client().responses.create(model=INFO.model_name, input="remember me")
        assert first.output_text == "You said: remember me. (user turns: 1)"
        with b.client() as client:
            second = client.responses.create(model=INFO.model_name, input="and me", previous_response_id=first.id)
            assert second.output_text == "You said: and me. (user turns: 2)"  # the turn stored by A was rendered
            assert client.responses.retrieve(first.id).output_text == first.output_text
        with b.client(OTHER_KEY) as other:
            with pytest.raises(openai.NotFoundError):
                other.responses.retrieve(first.id)
            with pytest.raises(openai.NotFoundError):
                other.responses.create(model=INFO.model_name, input="x", previous_response_id=second.id)
        a.stop()
        a = FrontdoorProcess(redis_url)  # a restarted front door still knows both
        with a.client() as client:
            third = client.responses.create(model=INFO.model_name, input="third", previous_response_id=second.id)
            assert third.output_text == "You said: third. (user turns: 3)"
            client.responses.delete(first.id)
        with b.client() as client:
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(first.id)
    finally:
        a.stop()
        b.stop()


def test_an_unreachable_redis_is_503_for_stored_responses_only():
    dead = f"redis://127.0.0.1:{free_port()}/0"
    door = FrontdoorProcess(dead)
    try:
        with door.client() as client:
            with pytest.raises(openai.InternalServerError) as err:
                client.responses.create(model=INFO.model_name, input="hi")  # store: true by default
            assert err.value.status_code == 503 and err.value.body["code"] == "store_unavailable"
            assert err.value.response.headers["retry-after"]
            unstored = client.responses.create(model=INFO.model_name, input="hi", store=False)
            assert unstored.output_text.startswith("You said: hi.")
            chat = client.chat.completions.create(model=INFO.model_name, messages=[{"role": "user", "content": "hi"}])
            assert chat.choices[0].message.content.startswith("You said: hi.")
    finally:
        door.stop()
