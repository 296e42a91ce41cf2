"""gpt-oss in plain torch, its checkpoint formats, and a simple decode loop.

Read in this order: config.py (GptOssConfig, presets), layers.py (RMSNorm, YaRN RoPE, SwiGLU; the
shape letters), attention.py (GQA with sinks and sliding window; the AttentionCache interface and
the contiguous KVCache), moe.py (router + experts; ExpertWeights, how experts are stored and
applied), transformer.py (GptOssModel: the one forward, `run_blocks`), paged.py (the paged
AttentionCache the serving engine uses), mxfp4.py (the expert weight format), checkpoint/ (layout
map, random writer, loader), generate.py (greedy, decode_stream).

Nothing here knows about parallelism or the engine; sharding wraps these modules from the outside.
"""
