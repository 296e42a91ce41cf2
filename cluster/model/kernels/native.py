"""The AVX-512 kernels in C (`<name>.c` beside this file): built on first use, loaded through ctypes.

`load(name)` (and `function`, one typed symbol of it) compiles `<name>.c` with the system C compiler (`$CC`, else `cc` or `gcc`) into a per-user
cache (`$XDG_CACHE_HOME/gptoss-cluster/kernels`, about a second, once per machine and source) and
returns the library, or None where it cannot run: a CPU torch does not report as AVX512, no compiler,
or a failed build. Nothing is needed at install time; callers keep their fallback on None.

The kernels' OpenMP threads are torch's: the library needs `libgomp.so.1`, which torch has already
loaded, so one runtime (one pool, one thread count per calling thread) serves both.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-fopenmp", "-shared", "-fPIC")
# Instruction sets beyond FLAGS that a kernel needs; it checks at run time that the CPU has them.
EXTRA_FLAGS = {name: ("-mavx512bf16",) for name in
               ("mxfp4_avx512bf16", "bf16_avx512bf16", "attention_avx512bf16", "rms_norm_avx512bf16",
                "expert_epilogue_avx512bf16")}
_loaded: dict[str, ctypes.CDLL | None] = {}
_lock = threading.Lock()


def load(name: str) -> ctypes.CDLL | None:
    """The built library of `<name>.c`, or None where it cannot be had (decided once per process)."""
    if name not in _loaded:
        with _lock:
            if name not in _loaded:
                path = _build(Path(__file__).with_name(f"{name}.c"))
                _loaded[name] = None if path is None else ctypes.CDLL(str(path))
    return _loaded[name]


def function(name: str, symbol: str, argtypes: list, restype=None) -> ctypes._CFuncPtr | None:
    """`symbol` of `load(name)`, typed (returns nothing unless `restype`), or None where the library
    cannot be had. ctypes drops the GIL for each call."""
    lib = load(name)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


def supported_function(name: str, check: str, symbol: str, argtypes: list, restype=None) -> ctypes._CFuncPtr | None:
    """`function(name, symbol, ...)` where the library's `check` (int check(void), true when this CPU has
    the instructions the library was built for) says it runs here; else None."""
    supported = function(name, check, [], restype=ctypes.c_int)
    if supported is None or not supported():
        return None
    return function(name, symbol, argtypes, restype)


def _build(source: Path) -> Path | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None
    flags = FLAGS + EXTRA_FLAGS.get(source.stem, ())
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + compiler.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptoss-cluster" / "kernels"
    lib = cache / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: concurrent builds are safe
            built = Path(tmp) / lib.name
            subprocess.run([compiler, *flags, "-o", str(built), str(source)], check=True, capture_output=True,
                           timeout=300)
            os.replace(built, lib)
    except (OSError, subprocess.SubprocessError):
        return None
    return lib
