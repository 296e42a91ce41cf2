"""gpt-oss in plain torch, its checkpoint formats, and a simple decode loop.

Read in this order: config.py (GptOssConfig, presets), layers.py (RMSNorm, YaRN RoPE, SwiGLU; the
shape letters), attention.py (GQA with sinks and sliding window, KVCache), moe.py (router +
experts), transformer.py (GptOssModel), mxfp4.py (the expert weight format), checkpoint.py
(write_checkpoint, load_model, CheckpointError), generate.py (greedy, decode_stream).

Nothing here knows about parallelism; sharding wraps these modules from the outside.
"""
