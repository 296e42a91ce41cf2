"""VllmEngine's chunk pacing (no vLLM needed: ChunkPacer is plain arithmetic on the times the
engine's stream loop reads): tokens are left to pile up for chunk_interval after each chunk
while vLLM's outputs come faster than that, and no wait is added once a pull already waited a
whole interval for vLLM's next step (the wait would only cost a timer and a wake-up)."""

from __future__ import annotations

import pytest

from cluster.engine.vllm_engine import ChunkPacer

INTERVAL = 0.010


def test_the_first_chunk_is_always_followed_by_the_rest_of_the_interval():
    pacer = ChunkPacer(INTERVAL)
    # the first pull waited 0.5 s (queue and prefill), the consumer took 1 ms
    assert pacer.pause_s(0.0, 0.5, 0.501) == pytest.approx(0.009)


def test_fast_steps_are_coalesced_into_one_chunk_per_interval():
    """Steps of 2 ms: after each pause the next pull finds tokens ready at once, so each pause
    stays the rest of the interval."""
    pacer = ChunkPacer(INTERVAL)
    t = 0.0
    for _ in range(20):
        pulled = t + 0.0001  # the pull returned at once: tokens had piled up
        pause = pacer.pause_s(t, pulled, pulled + 0.0005)
        assert pause == pytest.approx(INTERVAL - 0.0005)
        t = pulled + 0.0005 + pause


def test_steps_longer_than_the_interval_get_no_pause():
    """Steps of 23 ms (32 streams on CPU): after the first chunk, each pull waits for the next
    step by itself, so no timer is added per message."""
    pacer = ChunkPacer(INTERVAL)
    pause = pacer.pause_s(0.0, 0.3, 0.3001)  # the first chunk
    assert pause == pytest.approx(INTERVAL - 0.0001)
    t = 0.3001 + pause
    for _ in range(20):
        pulled = t + 0.013  # the rest of a 23 ms step
        assert pacer.pause_s(t, pulled, pulled + 0.0002) == 0.0
        t = pulled + 0.0002


def test_a_consumer_slower_than_the_interval_gets_no_pause():
    pacer = ChunkPacer(INTERVAL)
    pacer.pause_s(0.0, 0.1, 0.1)
    assert pacer.pause_s(0.2, 0.2001, 0.215) < 0  # the caller sleeps only for a positive pause
