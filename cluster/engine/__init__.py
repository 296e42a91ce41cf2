"""Engines turn requests into streams of token-id chunks.

`protocol.Engine` is the contract the serving layer relies on. `batching_engine.BatchingEngine`
(engine.kind torch) implements it with continuous batching over a paged KV cache: `core.EngineCore`
(scheduler, KV cache, model runner, sampler) driven by `async_engine.AsyncEngine` from one step-loop
thread. `echo_engine.EchoEngine` is a test engine without a model. Importing this package does
not import torch.
"""
