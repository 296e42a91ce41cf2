"""Stored responses of the Responses API (store: true), for GET /v1/responses/{id} and
previous_response_id.

A record is a JSON object: the response as returned, plus the conversation it ended (harmony
messages) so a follow-up can continue it on any front door. Keys are per tenant, so a tenant
reads, continues and deletes only its own responses; an id of another tenant is simply not
found. Every record expires ttl_s after it was written, and one larger than max_response_bytes
is not stored.

MemoryResponseStore lives in one process (the embedded default): a second front door, or a
restart, does not see its responses. RedisResponseStore is shared by every front door that
points at the same Redis and survives their restarts; it also carries the cancels of background
responses to the front door that runs them (a Redis pub/sub channel).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import Callable

from cluster.config import ResponseStoreConfig
from cluster.frontdoor.errors import StoreUnavailableError

log = logging.getLogger(__name__)

KEY_PREFIX = "gptoss:response"
CANCEL_CHANNEL = "gptoss:response-cancel"  # messages "<tenant>:<response id>"


class ResponseStore:
    """The interface: async put/get/delete of one tenant's records."""

    def __init__(self, config: ResponseStoreConfig) -> None:
        self.ttl_s = config.ttl_s
        self.max_bytes = config.max_response_bytes

    def _encode(self, record: dict) -> bytes | None:
        data = json.dumps(record, separators=(",", ":")).encode()
        if len(data) > self.max_bytes:
            log.info("response %s not stored: %d bytes > frontdoor.responses.max_response_bytes %d",
                     record.get("response", {}).get("id"), len(data), self.max_bytes)
            return None
        return data

    async def put(self, tenant: str, response_id: str, record: dict) -> bool:
        """Store `record`; False when it is too large to keep."""
        raise NotImplementedError

    async def get(self, tenant: str, response_id: str) -> dict | None:
        raise NotImplementedError

    async def delete(self, tenant: str, response_id: str) -> bool:
        raise NotImplementedError

    async def publish_cancel(self, tenant: str, response_id: str) -> None:
        """Ask whichever front door runs this background response to cancel it (none but this
        process shares an in-process store, and this one was asked directly)."""
        return None

    async def watch_cancels(self, on_cancel: Callable[[str, str], None]) -> None:
        """Call on_cancel(tenant, response_id) for every cancel another front door publishes."""
        return None

    async def close(self) -> None:
        return None


class MemoryResponseStore(ResponseStore):
    """In this process; the least recently written go first beyond max_entries."""

    def __init__(self, config: ResponseStoreConfig, clock=time.monotonic) -> None:
        super().__init__(config)
        self.max_entries = config.max_entries
        self._clock = clock
        self._records: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()

    async def put(self, tenant: str, response_id: str, record: dict) -> bool:
        data = self._encode(record)
        if data is None:
            return False
        key = (tenant, response_id)
        self._records.pop(key, None)
        self._records[key] = (self._clock() + self.ttl_s, data)
        while len(self._records) > self.max_entries:
            self._records.popitem(last=False)
        return True

    async def get(self, tenant: str, response_id: str) -> dict | None:
        entry = self._records.get((tenant, response_id))
        if entry is None:
            return None
        expires, data = entry
        if expires <= self._clock():
            del self._records[(tenant, response_id)]
            return None
        return json.loads(data)

    async def delete(self, tenant: str, response_id: str) -> bool:
        return await self.get(tenant, response_id) is not None and \
            self._records.pop((tenant, response_id), None) is not None


class RedisResponseStore(ResponseStore):
    """In Redis (redis-py asyncio): one key per response, written with its TTL."""

    def __init__(self, config: ResponseStoreConfig) -> None:
        super().__init__(config)
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(config.redis_url, socket_connect_timeout=5, socket_timeout=5)
        self._cancels: asyncio.Task | None = None

    @staticmethod
    def _key(tenant: str, response_id: str) -> str:
        # Tenant names are [A-Za-z0-9._-] (auth.py), ids [A-Za-z0-9_]; ":" cannot occur in either.
        return f"{KEY_PREFIX}:{tenant or '-'}:{response_id}"

    async def _run(self, command, *args, **kwargs):
        from redis.exceptions import RedisError

        try:
            return await command(*args, **kwargs)
        except RedisError as err:
            raise StoreUnavailableError(f"response store (Redis): {type(err).__name__}: {err}") from err

    async def put(self, tenant: str, response_id: str, record: dict) -> bool:
        data = self._encode(record)
        if data is None:
            return False
        await self._run(self._redis.set, self._key(tenant, response_id), data, px=max(1, int(self.ttl_s * 1000)))
        return True

    async def get(self, tenant: str, response_id: str) -> dict | None:
        data = await self._run(self._redis.get, self._key(tenant, response_id))
        return None if data is None else json.loads(data)

    async def delete(self, tenant: str, response_id: str) -> bool:
        return bool(await self._run(self._redis.delete, self._key(tenant, response_id)))

    async def ping(self) -> None:
        await self._run(self._redis.ping)

    async def publish_cancel(self, tenant: str, response_id: str) -> None:
        await self._run(self._redis.publish, CANCEL_CHANNEL, f"{tenant}:{response_id}")

    async def watch_cancels(self, on_cancel: Callable[[str, str], None]) -> None:
        if self._cancels is not None:
            return
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        await self._run(pubsub.subscribe, CANCEL_CHANNEL)  # before the first background response is answered
        self._cancels = asyncio.get_running_loop().create_task(self._listen(pubsub, on_cancel))

    async def _listen(self, pubsub, on_cancel: Callable[[str, str], None]) -> None:
        from redis.exceptions import RedisError

        try:
            while True:
                try:
                    if not pubsub.subscribed:
                        await pubsub.subscribe(CANCEL_CHANNEL)
                    # A bounded wait: the client's socket_timeout would fail an unbounded one.
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                except (RedisError, OSError) as err:
                    log.warning("response store: cancel channel lost (%s); retrying", err)
                    await asyncio.sleep(1.0)
                    continue
                if message is not None and message["type"] == "message":
                    tenant, _, response_id = message["data"].decode().partition(":")
                    on_cancel(tenant, response_id)
        finally:
            await pubsub.aclose()

    async def close(self) -> None:
        if self._cancels is not None:
            self._cancels.cancel()
            await asyncio.gather(self._cancels, return_exceptions=True)
            self._cancels = None
        await self._redis.aclose()


def open_store(config: ResponseStoreConfig) -> ResponseStore:
    if config.kind == "redis":
        return RedisResponseStore(config)
    return MemoryResponseStore(config)
