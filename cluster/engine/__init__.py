"""Engines turn requests into streams of token-id chunks.

`protocol.Engine` is the contract the serving layer relies on; `torch_engine.TorchEngine` is the
simple engine (one decode loop per request). Importing this package does not import torch.
"""
