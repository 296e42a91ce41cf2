"""Stored responses of the Responses API (store: true), for GET /v1/responses/{id} and
previous_response_id.

A record is a JSON object: the response as returned, plus the conversation it ended (harmony
messages) so a follow-up can continue it on any front door. Keys are per tenant, so a tenant
reads, continues and deletes only its own responses; an id of another tenant is simply not
found. Every record expires ttl_s after it was written, and one larger than max_response_bytes
is not stored.

MemoryResponseStore lives in one process (the embedded default): a second front door, or a
restart, does not see its responses. RedisResponseStore is shared by every front door that
points at the same Redis and survives their restarts.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict

from cluster.config import ResponseStoreConfig
from cluster.frontdoor.errors import StoreUnavailableError

log = logging.getLogger(__name__)

KEY_PREFIX = "gptoss:response"


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

    async def close(self) -> None:
        await self._redis.aclose()


def open_store(config: ResponseStoreConfig) -> ResponseStore:
    if config.kind == "redis":
        return RedisResponseStore(config)
    return MemoryResponseStore(config)
