#!/usr/bin/env bash
# llama.cpp as `bench roofline`'s peer: its own virtualenv (.venv-llama-cpp) with llama-cpp-python,
# the llama.cpp it wraps and the deps of llama.cpp's converter, then the peer's tests.
#   scripts/llama-cpp-peer.sh            build (if needed) and run tests/bench/test_peer_llama_cpp.py
#   scripts/llama-cpp-peer.sh --install  build only
# Then: gptoss-cluster bench roofline ... --peer llama-cpp --llama-cpp-python .venv-llama-cpp/bin/python
#       --llama-cpp-src .venv-llama-cpp/src/llama_cpp_python-$version/vendor/llama.cpp
# Why not `pip install llama-cpp-python`: PyPI has its sdist only, whose build compiles llama.cpp's
# tools, common library and mtmd too (~193 objects, over an hour on 2 cores). Here ninja builds
# libllama and ggml alone (78 objects, minutes) from the sdist's own vendored llama.cpp, so the
# bindings and the library are one version; the Python package installs without building any.
# The converter (convert_hf_to_gguf.py) lives in that source tree, and it pins transformers 4.57.
# Needs cmake, ninja and a C++ compiler (Debian: cmake ninja-build g++).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${GPTOSS_LLAMA_CPP_VENV:-.venv-llama-cpp}
version=0.3.36
src="$venv/src/llama_cpp_python-$version"
start=$(date +%s)
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q torch==2.13.0 transformers==4.57.6 "numpy>=2.2.6" \
        "sentencepiece>=0.1.98,<0.3.0" "protobuf>=4.21.0,<5.0.0" tqdm pyyaml requests typing-extensions diskcache \
        jinja2 scikit-build-core
    "$venv/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$venv/src"
    tar xzf "$venv/src/llama_cpp_python-$version.tar.gz" -C "$venv/src"
    # $ORIGIN: libllama finds the ggml libraries beside it once all are copied into the package
    cmake -S "$src/vendor/llama.cpp" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF > "$src/cmake.log"
    ninja -C "$src/build" llama > "$src/build.log"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$venv/bin/python" -m pip install -q --no-deps \
        --no-build-isolation "$venv/src/llama_cpp_python-$version.tar.gz"
    lib=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/llama_cpp/lib
    mkdir -p "$lib"
    cp -a "$src/build/bin/"*.so* "$lib/"
fi
"$venv/bin/python" -c "import llama_cpp; print(f'llama.cpp peer venv: llama-cpp-python {llama_cpp.__version__}')"
echo "llama.cpp peer: venv ready in $(( $(date +%s) - start )) s"
[ "${1:-}" = "--install" ] && exit 0
GPTOSS_LLAMA_CPP_PYTHON="$venv/bin/python" GPTOSS_LLAMA_CPP_SRC="$src/vendor/llama.cpp" \
    "${PYTHON:-python}" -m pytest tests/bench/test_peer_llama_cpp.py -p no:cacheprovider
echo "llama.cpp peer: done in $(( $(date +%s) - start )) s"
