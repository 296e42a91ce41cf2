"""Workloads: request arrivals with prompts given as prefix-block ids.

Prompts are not token lists (too slow at 512 replicas): a prompt is the ids of its full blocks.
Block i of system prompt s has id s*2^24 + i; block i of conversation c past its system prompt's
full blocks has id 2^52 + c*2^24 + i. Ids are unique to the whole prefix before them, exactly what the chained block
hashes of cluster/serving/prefix_index.block_hashes are, so the router's PrefixIndex and the engine's
prefix cache see the same structure as with real prompts.

- poisson: independent requests (Poisson arrivals), a shared system prompt, heavy-tailed lengths;
- multiturn: conversations arrive Poisson; each turn's prompt is system prompt + history + a new user
  message; the next turn comes a think time after the answer ends (heavy-tailed lengths);
- ramp: multiturn with the conversation rate rising linearly from 10% to 100% over the first half.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

WORKLOADS = ("poisson", "multiturn", "ramp")


@dataclass
class Conversation:
    cid: int
    system: int
    system_tokens: int
    turns_left: int
    history_tokens: int = 0  # tokens after the system prompt so far


@dataclass
class SimRequest:
    rid: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    blocks: tuple
    session: str
    conversation: Conversation | None = None
    # filled in by the simulation
    replica: int = -1
    cached_tokens: int = 0
    first_token_s: float = -1.0
    done_s: float = -1.0
    prefill_left: int = 0


def lognormal_int(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    mu = math.log(mean) - sigma * sigma / 2  # so that the mean is `mean` before clipping
    return max(lo, min(hi, int(rng.lognormvariate(mu, sigma))))


@dataclass
class WorkloadSpec:
    kind: str = "multiturn"
    rate_per_replica: float = 4.0  # requests/s per replica at full rate
    duration_s: float = 60.0
    system_prompts: int = 8
    system_tokens: int = 1500
    mean_turns: float = 6.0
    user_tokens: float = 200.0
    output_tokens: float = 250.0
    think_s: float = 3.0
    max_output: int = 2048
    block_size: int = 32
    seed: int = 0


class Workload:
    """Produces arrivals; `next_turn` is called when a conversation's answer is done."""

    def __init__(self, spec: WorkloadSpec, replicas: int) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self._rid = 0
        self._cid = 0
        turns = spec.mean_turns if spec.kind != "poisson" else 1.0
        # Conversations per second so that requests per second match rate_per_replica * replicas.
        self.conv_rate = spec.rate_per_replica * replicas / turns
        self.system_lens = [lognormal_int(self.rng, spec.system_tokens, 0.3, 200, 8000)
                            for _ in range(spec.system_prompts)]

    def rate_at(self, t: float) -> float:
        if self.spec.kind == "ramp":
            half = self.spec.duration_s / 2
            return self.conv_rate * (0.1 + 0.9 * min(1.0, t / half))
        return self.conv_rate

    def conversation_arrivals(self):
        """(time, Conversation) of new conversations, by thinning a Poisson process."""
        t = 0.0
        peak = self.conv_rate
        while True:
            t += self.rng.expovariate(peak)
            if t >= self.spec.duration_s:
                return
            if self.rng.random() * peak <= self.rate_at(t):
                s = self.rng.randrange(self.spec.system_prompts)
                turns = 1 if self.spec.kind == "poisson" else 1 + int(self.rng.expovariate(1 / (self.spec.mean_turns - 1)))
                self._cid += 1
                yield t, Conversation(self._cid, s, self.system_lens[s], turns)

    def request(self, conv: Conversation, t: float) -> SimRequest:
        spec = self.spec
        b = spec.block_size
        user = lognormal_int(self.rng, spec.user_tokens, 1.0, 4, 16000)
        out = lognormal_int(self.rng, spec.output_tokens, 1.0, 1, spec.max_output)
        prompt = conv.system_tokens + conv.history_tokens + user
        sys_blocks = conv.system_tokens // b
        sys_base = conv.system << 24
        conv_base = (1 << 52) | (conv.cid << 24)
        blocks = tuple(range(sys_base, sys_base + sys_blocks)) + \
            tuple(range(conv_base, conv_base + prompt // b - sys_blocks))
        conv.history_tokens += user + out
        conv.turns_left -= 1
        self._rid += 1
        return SimRequest(self._rid, t, prompt, out, blocks, session=f"c{conv.cid}", conversation=conv)

    def think_s(self) -> float:
        return self.rng.expovariate(1 / self.spec.think_s)
