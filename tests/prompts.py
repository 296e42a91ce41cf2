"""Random prompts of ordinary-text token ids for end-to-end tests (no harmony stop token among them),
and a long Generate stream to cancel midway."""

from __future__ import annotations

import torch

TOP_ID = 100_000  # ids below this are plain BPE text; the harmony specials start at 199998


def random_prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TOP_ID, (n,), generator=g).tolist() for n in lengths]


def open_long_stream(stub, prompt, min_tokens=10):
    """Start a Generate of 3000 tokens (stops ignored) and read until `min_tokens` have arrived;
    returns the call, still streaming, for the test to cancel."""
    from gptoss.v1 import inference_pb2 as pb

    call = stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(
        max_tokens=3000, ignore_stop=True)), timeout=120)
    received = 0
    for response in call:
        received += len(response.chunk.token_ids)
        if received >= min_tokens:
            break
    return call
