"""The service-time model of one replica (a continuous-batching engine on one GPU group).

Each engine step runs every decoding sequence one token plus up to `max_batched_tokens` of prompt
(chunked prefill), and takes

    step_s = step_base_s + decode_per_seq_s * decoding + prefill_per_token_s * prefill_tokens

Defaults are calibrated on published gpt-oss-120b H100 figures (docs/simulation.md; ../shared/GPT-OSS.md):
- batch-1 decode 318.5 tok/s on H100 (SGLang, MXFP4) -> step_base_s = 1/318.5 = 3.14 ms;
- 2xH100 vLLM, 2000-token prompts / 100 output: 34,083 tok/s total, ~95% of it prompt tokens ->
  ~16.2k prompt tok/s per GPU -> prefill_per_token_s = 1/16,200 = 62 us;
- ShareGPT on the same pair: TPOT 86.5 ms at a large batch; with ~256 sequences in a step beside some
  prefill that gives decode_per_seq_s ~ (86.5 - 3.1 - ~40 prefill) / 256 = 0.17 ms;
- 120b on one 80 GB GPU leaves ~18 GiB for KV at ~36 KiB/token -> ~500k tokens of KV cache;
- max_num_seqs 256 and --max-num-batched-tokens 1024, as the vLLM recipe runs 120b on one H100 (TP1).
The prefix cache keeps the most recently used prompt blocks within the KV capacity (LRU); a
request's cached prefix is not prefilled again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceModel:
    step_base_s: float = 1 / 318.5
    decode_per_seq_s: float = 0.00017
    prefill_per_token_s: float = 1 / 16200
    max_batched_tokens: int = 1024
    max_seqs: int = 256
    kv_capacity_tokens: int = 500_000
    block_size: int = 32

    def step_s(self, decoding: int, prefill_tokens: int) -> float:
        return self.step_base_s + self.decode_per_seq_s * decoding + self.prefill_per_token_s * prefill_tokens
