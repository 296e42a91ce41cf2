"""Background responses (background: true) through the OFFICIAL `openai` Python package against a
real front door: created at once, polled to completion, streamed and resumed, cancelled (the
replica stream stops), and cancelled through a SECOND front door process sharing a real
redis-server. The replicas are the harmony script (tests/frontdoor/harmony_script.py)."""

from __future__ import annotations

import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.frontdoor.harmony_script import HarmonyScriptHandle, ThreadedFrontdoor, completion_for
from tests.frontdoor.test_openai_http import KEY, MODEL, OTHER_KEY, config, counter, keys
from tests.frontdoor.test_response_store import FrontdoorProcess, redis_url  # noqa: F401 - a fixture
from tests.parallel.ep_apps import wait_for
from tests.waiting import holds

ROUTE = "/v1/responses"


def wait_until(predicate, timeout: float, what: str):
    return wait_for(predicate, timeout, what, interval_s=0.02)


def scrape(url: str) -> dict:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def slow_door():
    """One token every 80 ms: a response runs for seconds, so it is seen in progress even on a busy box."""
    door = ThreadedFrontdoor(HarmonyScriptHandle(chunk_tokens=1, delay_s=0.08), config(), api_keys=keys())
    yield door
    door.close()


@pytest.fixture
def endless_door():
    door = ThreadedFrontdoor(HarmonyScriptHandle(chunk_tokens=2, delay_s=0.02, endless=True), config(),
                             api_keys=keys())
    yield door
    door.close()


def test_background_response_answers_at_once_and_is_polled_to_completion_with_usage(slow_door):
    door = slow_door
    before = door.metrics()
    with openai.OpenAI(base_url=door.base_url, api_key=KEY, max_retries=0) as client:
        created = client.responses.create(model=MODEL, input="in the background", background=True)
        assert created.status in ("queued", "in_progress") and created.background is True
        assert created.usage is None
        seen = {client.responses.retrieve(created.id).status}
        final = wait_until(lambda: (r := client.responses.retrieve(created.id)).status == "completed" and r,
                           30, "the background response to complete")
        assert "in_progress" in seen  # polled while it ran
    assert final.output_text == "You said: in the background. (user turns: 1)"
    request = door.handle.requests[-1]
    assert final.usage.input_tokens == len(request.prompt_token_ids)
    assert final.usage.output_tokens == len(completion_for(request.prompt_token_ids))
    after = door.settled_metrics()
    labels = {"api": "http", "method": ROUTE}
    assert counter(after, "gptoss_frontdoor_completion_tokens_total", **labels) - \
        counter(before, "gptoss_frontdoor_completion_tokens_total", **labels) == final.usage.output_tokens
    assert counter(after, "gptoss_frontdoor_prompt_tokens_total", **labels) - \
        counter(before, "gptoss_frontdoor_prompt_tokens_total", **labels) == final.usage.input_tokens
    assert counter(after, "gptoss_frontdoor_requests_total", code="OK", **labels) - \
        counter(before, "gptoss_frontdoor_requests_total", code="OK", **labels) == 1
    assert counter(after, "gptoss_frontdoor_requests_in_flight", **labels) == 0
    with openai.OpenAI(base_url=door.base_url, api_key=KEY, max_retries=0) as client:
        follow = client.responses.create(model=MODEL, input="next", previous_response_id=final.id)
        assert follow.output_text == "You said: next. (user turns: 2)"
        assert client.responses.cancel(final.id).status == "completed"  # an ended response stays as it ended


def test_background_needs_store_and_a_running_one_cannot_be_continued_yet(endless_door):
    with openai.OpenAI(base_url=endless_door.base_url, api_key=KEY, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model=MODEL, input="x", background=True, store=False)
        assert err.value.body["param"] == "store"
        running = client.responses.create(model=MODEL, input="x", background=True)
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model=MODEL, input="y", previous_response_id=running.id)
        assert err.value.body["param"] == "previous_response_id"
        client.responses.cancel(running.id)


def test_cancel_stops_the_replica_stream_within_a_second_and_only_its_tenant_may(endless_door):
    door = endless_door
    with openai.OpenAI(base_url=door.base_url, api_key=KEY, max_retries=0) as client, \
            openai.OpenAI(base_url=door.base_url, api_key=OTHER_KEY, max_retries=0) as other:
        created = client.responses.create(model=MODEL, input="go on forever", background=True)
        wait_until(lambda: len(client.responses.retrieve(created.id).output) >= 1, 30, "output to flow")
        with pytest.raises(openai.NotFoundError):
            other.responses.cancel(created.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(created.id)
        replica = door.handle.responses[-1]
        assert not replica.cancelled.is_set()
        started = time.monotonic()
        cancelled = client.responses.cancel(created.id)
        took = time.monotonic() - started
        assert cancelled.status == "cancelled" and cancelled.id == created.id
        assert replica.cancelled.is_set() and not replica.finished
        assert took < 1.0, f"cancel took {took:.3f} s"
        assert cancelled.output and cancelled.output[0].type == "reasoning"  # what it had made is kept
        assert client.responses.retrieve(created.id).status == "cancelled"
        assert client.responses.cancel(created.id).status == "cancelled"  # again: no change
    snapshot = door.metrics()
    labels = {"api": "http", "method": ROUTE}
    assert counter(snapshot, "gptoss_frontdoor_requests_total", code="CANCELLED", **labels) == 1
    assert counter(snapshot, "gptoss_frontdoor_requests_in_flight", **labels) == 0
    assert door.server.admission.in_flight == 0


def test_a_streamed_background_response_outlives_its_client_and_resumes_after_a_sequence_number(slow_door):
    door = slow_door
    with openai.OpenAI(base_url=door.base_url, api_key=KEY, max_retries=0) as client:
        stream = client.responses.create(model=MODEL, input="stream me", background=True, stream=True)
        first = []
        for event in stream:
            first.append(event)
            if len(first) == 6:
                break
        stream.close()  # the client goes away: the response goes on
        response_id = first[0].response.id
        assert first[0].type == "response.created" and first[0].response.background is True
        # Must not happen: the client going away cancels the response.
        holds(lambda: not door.handle.responses[-1].cancelled.is_set(), 0.1, message="the response was cancelled")
        resumed = list(client.responses.retrieve(response_id, stream=True, starting_after=first[-1].sequence_number))
        assert [e.sequence_number for e in resumed] == list(range(6, 6 + len(resumed)))
        assert resumed[-1].type == "response.completed"
        text = "".join(e.delta for e in first + resumed if e.type == "response.output_text.delta")
        assert text == resumed[-1].response.output_text == "You said: stream me. (user turns: 1)"
        assert client.responses.retrieve(response_id).status == "completed"
        with pytest.raises(openai.BadRequestError) as err:  # ended: its events are not kept
            list(client.responses.retrieve(response_id, stream=True))
        assert err.value.body["param"] == "stream"


def test_cancel_reaches_the_front_door_process_that_runs_it_through_redis(redis_url):  # noqa: F811
    a = FrontdoorProcess(redis_url, chunk_tokens=2, delay_s=0.02, endless=True)
    b = FrontdoorProcess(redis_url)
    try:
        with a.client() as on_a, b.client() as on_b:
            created = on_a.responses.create(model=MODEL, input="go on forever", background=True)
            assert on_b.responses.retrieve(created.id).status == "in_progress"  # B sees A's record
            labels = {"api": "http", "method": ROUTE}
            wait_until(lambda: counter(scrape(a.metrics_url), "gptoss_frontdoor_completion_tokens_total",
                                       **labels) > 20, 30, "tokens to flow on A")
            with b.client(OTHER_KEY) as other:
                with pytest.raises(openai.NotFoundError):
                    other.responses.cancel(created.id)
            started = time.monotonic()
            cancelled = on_b.responses.cancel(created.id)  # B does not run it: the cancel goes through Redis
            took = time.monotonic() - started
            assert cancelled.status == "cancelled", cancelled.status
            assert took < 1.0, f"cancel through Redis took {took:.3f} s"
            snapshot = scrape(a.metrics_url)
            assert counter(snapshot, "gptoss_frontdoor_requests_total", code="CANCELLED", **labels) == 1
            assert counter(snapshot, "gptoss_frontdoor_requests_in_flight", **labels) == 0
            tokens = counter(snapshot, "gptoss_frontdoor_completion_tokens_total", **labels)
            # Must not happen: the replica stream is closed, so A takes no more tokens.
            holds(lambda: counter(scrape(a.metrics_url), "gptoss_frontdoor_completion_tokens_total", **labels)
                  == tokens, 0.3, message="A took tokens after the cancel")
            assert on_a.responses.retrieve(created.id).status == "cancelled"
    finally:
        a.stop()
        b.stop()


def test_a_running_background_response_is_recorded_cancelled_when_its_front_door_stops(endless_door):
    door = endless_door
    store = door.server._store  # in-process: it outlives the server's stop, for this check
    with openai.OpenAI(base_url=door.base_url, api_key=KEY, max_retries=0) as client:
        created = client.responses.create(model=MODEL, input="forever", background=True)
    wait_until(lambda: door.handle.responses, 30, "the replica call")
    door.call(door.server.stop(0.2))  # the drain waits for it 0.2 s, then it is cancelled
    assert door.handle.responses[-1].cancelled.is_set()
    assert door.call(store.get("acme", created.id))["response"]["status"] == "cancelled"
