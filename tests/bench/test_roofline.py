"""`gptoss-cluster bench roofline` on a tiny preset: it runs, and its byte counts are the model's; a
peer that cannot run is said in one line and the run goes on without it."""

from __future__ import annotations

import json
import subprocess
import sys

from cluster.model.config import GptOssConfig


def test_roofline_reports_both_batches_against_the_bytes_each_layer_reads(tmp_path):
    out = tmp_path / "roofline.json"
    context = 8
    done = subprocess.run(
        [sys.executable, "-m", "cluster", "bench", "roofline", "--preset", "tiny-small-vocab", "--layers", "2",
         "--runs", "1", "--probe-mb", "16", "--batch", "3", "--context", str(context), "--new-tokens", "2",
         "--threads", "1", "--json", str(out), "--peer", "llama-cpp", "--llama-cpp-src", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "read bandwidth" in done.stdout and "tokens/s" in done.stdout
    summary = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == summary
    reason = f"--llama-cpp-src {tmp_path} has no convert_hf_to_gguf.py"
    assert [line for line in done.stdout.splitlines() if "llama.cpp" in line] == [
        f"llama.cpp peer unavailable: {reason}; measuring ours alone"]
    assert summary["peer"] == {"name": "llama-cpp", "unavailable": reason} and "ratio_vs_llama_cpp" not in summary

    c = GptOssConfig.from_preset("tiny-small-vocab")
    assert (summary["layers"], summary["full_layers"], summary["dtype"]) == (2, c.num_hidden_layers, "bfloat16")
    H, N, K, D, I = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    bf16 = 2
    attention = ((H * (N + 2 * K) * D + (N + 2 * K) * D) + (N * D * H + H) + N) * bf16
    router = (c.num_local_experts * H + c.num_local_experts) * bf16
    expert = 2 * I * (H // 32) * 17 + H * (I // 32) * 17 + (2 * I + H) * bf16  # MXFP4 blocks + scales, biases
    batch1, batch3 = summary["rows"]
    assert (batch1["batch"], batch3["batch"]) == (1, 3)
    assert batch1["experts_per_layer"] == c.num_experts_per_tok  # one token: exactly top-k experts
    assert c.num_experts_per_tok <= batch3["experts_per_layer"] <= c.num_local_experts
    for row in (batch1, batch3):
        kv = 2 * row["batch"] * K * context * D * bf16
        expected = attention + kv + router + row["experts_per_layer"] * expert
        assert abs(row["layer_mb"] * 1e6 - expected) < 1
        assert row["layer_ms"] > 0 and row["unembedding_ms"] > 0 and row["tokens_per_s"] > 0
        assert abs(row["layer_fraction_of_roofline"] - row["layer_roofline_ms"] / row["layer_ms"]) < 1e-9
        unembedding_ms = c.vocab_size * H * bf16 / (summary["bandwidth_gb_s"] * 1e9) * 1e3
        assert abs(row["unembedding_roofline_ms"] - unembedding_ms) < 1e-6 * unembedding_ms
    assert summary["greedy_tokens_per_s"] > 0
    # the weights are the model's bytes (bf16 floats, float32 norms, MXFP4 experts; + RoPE tables), and
    # resident once a decode has read them all
    norms = (2 * 2 + 1) * H * 4
    floats = 2 * c.vocab_size * H * bf16 + 2 * (attention + router)
    packed_experts = 2 * c.num_local_experts * expert
    assert floats + packed_experts + norms <= summary["weights_gb"] * 1e9 <= 1.05 * (floats + packed_experts + norms)
    assert summary["weights_gb"] < summary["resident_gb"] <= summary["peak_resident_gb"]
