"""llama.cpp as a peer of `bench roofline`: its batch-1 decode speed on the same checkpoint and cores.

llama.cpp runs through llama-cpp-python in a Python of its own (`--llama-cpp-python`; default: this
one), as a subprocess that runs this file as a script, so this file imports nothing but the standard
library at the top. The checkpoint is converted to GGUF by llama.cpp's own converter
(`convert_hf_to_gguf.py` of the llama.cpp source tree given by `--llama-cpp-src`, run by that same
Python), unless `--peer-gguf` names a converted file. Its gpt-oss converter keeps the MXFP4 experts
as MXFP4 (repacked into ggml's block layout) and writes the other matrices in the bench's dtype.
The checkpoints this cluster writes carry no tokenizer, which the converter reads; the o200k_harmony
HF tokenizer (cluster/harmony/hf_tokenizer.py) is put beside the checkpoint's files for it.

The peer's number: one batch-1 decode step at a `--context`-token KV cache (one token per
`llama_decode`, with its logits), on as many threads as ours. Its steps alternate with our timed
batch-1 steps (ours, then its, `--runs` + 1 times), so both sides see the same load of a shared
machine, with a pause of SETTLE_S before and after each of its steps; each side's best step counts.
Its process stays up through our whole run, the GGUF mapped from the page cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

NAME = "llama-cpp"
CONVERTER = "convert_hf_to_gguf.py"
# the converter's --outtype for each `bench roofline --dtype`
OUTTYPES = {"bfloat16": "bf16", "float32": "f32"}
# After its last parallel region an OpenMP thread spin-waits a while before it sleeps (libgomp's
# GOMP_SPINCOUNT: milliseconds); a pause before and after each peer step lets each side's step start
# with the other's threads asleep
SETTLE_S = 0.1
# transformers 5 saves "TokenizersBackend", a class the converter's transformers 4 lacks; both load
# tokenizer.json through this one
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("peer", "also measure a peer's batch-1 decode on the same checkpoint and cores")
    g.add_argument("--peer", choices=(NAME,), default=None,
                   help="llama-cpp: llama.cpp through llama-cpp-python (prints ratio_vs_llama_cpp = ours / peer)")
    g.add_argument("--llama-cpp-python", default=sys.executable,
                   help="a Python with llama-cpp-python installed; it also runs the converter (default: this one)")
    g.add_argument("--llama-cpp-src", default=None,
                   help=f"a llama.cpp source tree ({CONVERTER}, gguf-py) to convert the checkpoint with")
    g.add_argument("--peer-gguf", default=None,
                   help="run this GGUF (converted from the same checkpoint) instead of converting")


def unavailable(args: argparse.Namespace) -> str | None:
    """Why the peer cannot run (None: it can), from the arguments alone and an import check."""
    python = args.llama_cpp_python
    if args.peer_gguf is not None and not Path(args.peer_gguf).is_file():
        return f"--peer-gguf {args.peer_gguf} is not a file"
    if args.peer_gguf is None:
        if args.llama_cpp_src is None:
            return (f"no GGUF to run: give --llama-cpp-src DIR (a llama.cpp source tree with {CONVERTER}) "
                    "or --peer-gguf FILE")
        if not (Path(args.llama_cpp_src) / CONVERTER).is_file():
            return f"--llama-cpp-src {args.llama_cpp_src} has no {CONVERTER}"
    try:
        done = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True, timeout=120)
    except OSError as e:
        return f"--llama-cpp-python {python} does not run ({e.strerror})"
    if done.returncode != 0:
        return (f"{python} cannot import llama_cpp ({_last_line(done.stderr)}); "
                "give --llama-cpp-python, a Python with llama-cpp-python")
    return None


class LlamaCppDecoder:
    """llama.cpp in its own process, holding the GGUF and a `context`-token prompt's KV cache; each
    `step()` has it decode one token at that context (as ours is timed) and records its seconds.
    A failure is kept for `result()`, and later steps do nothing, so our side runs on."""

    def __init__(self, python: str, gguf: str, threads: int, context: int, log: Path) -> None:
        self.gguf, self.log, self.times, self.error = gguf, log, [], None
        self._stderr = open(log, "w")
        self._proc = subprocess.Popen([python, __file__, gguf, "--threads", str(threads), "--context", str(context)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        try:
            self.info = json.loads(self._read())
        except RuntimeError:
            self._stderr.close()
            raise

    def _read(self) -> str:
        line = self._proc.stdout.readline()
        if not line:
            self._stderr.flush()
            raise RuntimeError(f"llama.cpp decode exited {self._proc.wait()}: {_last_line(self.log.read_text())}")
        return line

    def step(self) -> None:
        if self.error is None:
            time.sleep(SETTLE_S)
            try:
                self._proc.stdin.write("step\n")
                self._proc.stdin.flush()
                self.times.append(float(self._read()))
            except (OSError, RuntimeError) as e:
                self.error = str(e)
            time.sleep(SETTLE_S)

    def result(self) -> dict:
        """The peer's numbers from the steps so far; raises RuntimeError if it failed."""
        if self.error is not None:
            raise RuntimeError(self.error)
        if not self.times:
            raise RuntimeError("llama.cpp ran no decode step")
        best = min(self.times)
        return {"name": NAME, "gguf": str(self.gguf), **self.info, "steps": len(self.times), "step_ms": best * 1e3,
                "tokens_per_s": 1 / best, "mean_tokens_per_s": len(self.times) / sum(self.times)}

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()


def start(args: argparse.Namespace, checkpoint: str, work_dir: str, threads: int) -> LlamaCppDecoder:
    """The peer ready to step: `checkpoint` converted into `work_dir` first unless --peer-gguf names
    a GGUF. Raises RuntimeError with the reason when the conversion or the load fails."""
    gguf = args.peer_gguf or convert(args.llama_cpp_python, args.llama_cpp_src, checkpoint, work_dir,
                                     OUTTYPES[args.dtype])
    print(f"llama.cpp peer: loading {gguf}, {threads} threads, a {args.context}-token prompt", flush=True)
    return LlamaCppDecoder(args.llama_cpp_python, str(gguf), threads, args.context,
                           Path(work_dir) / "llama-cpp-decode.log")


def convert(python: str, src: str, checkpoint: str, work_dir: str, outtype: str) -> Path:
    """`checkpoint` as GGUF in `work_dir` by llama.cpp's converter, with a line of progress every 15 s."""
    model_dir = _with_tokenizer(Path(checkpoint), Path(work_dir) / "llama-cpp-model")
    out = Path(work_dir) / f"model-{outtype}.gguf"
    log = Path(work_dir) / "llama-cpp-convert.log"
    print(f"llama.cpp peer: converting {checkpoint} to GGUF ({outtype}, experts as MXFP4) with "
          f"{Path(src) / CONVERTER}; log in {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([python, str(Path(src) / CONVERTER), str(model_dir), "--outfile", str(out),
                                 "--outtype", outtype], stdout=f, stderr=subprocess.STDOUT)
        while True:
            try:
                rc = proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                written = out.stat().st_size / 1e9 if out.exists() else 0.0
                print(f"llama.cpp peer: converting, {time.perf_counter() - start:.0f} s, "
                      f"{written:.2f} GB written", flush=True)
    if rc != 0:
        raise RuntimeError(f"{CONVERTER} exited {rc}: {_last_line(log.read_text())} (log: {log})")
    print(f"llama.cpp peer: converted in {time.perf_counter() - start:.0f} s, "
          f"{out.stat().st_size / 1e9:.2f} GB", flush=True)
    return out


def _with_tokenizer(checkpoint: Path, model_dir: Path) -> Path:
    """A directory of links to the checkpoint's files, plus o200k_harmony's HF tokenizer files when
    the checkpoint has none (the converter reads the vocabulary from them)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for entry in checkpoint.iterdir():
        (model_dir / entry.name).symlink_to(entry.resolve())
    if not (model_dir / "tokenizer.json").exists():
        from cluster.harmony.hf_tokenizer import hf_tokenizer_dir

        try:
            tokenizer = hf_tokenizer_dir()
        except ImportError as e:
            raise RuntimeError(f"the o200k_harmony HF tokenizer the converter reads needs transformers ({e})") from e
        (model_dir / "tokenizer.json").symlink_to(tokenizer / "tokenizer.json")
        tokenizer_config = json.loads((tokenizer / "tokenizer_config.json").read_text())
        tokenizer_config["tokenizer_class"] = TOKENIZER_CLASS
        (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return model_dir


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _serve_steps(gguf: str, threads: int, context: int) -> None:
    """Runs in the peer's Python: load, decode a `context`-token prompt and one warm-up token, print
    one JSON line; then for each "step" line on stdin decode one token at position `context` (with
    its logits) and print the seconds it took."""
    import random

    import llama_cpp

    llm = llama_cpp.Llama(gguf, n_threads=threads, n_threads_batch=threads, n_ctx=context + 8,
                          n_batch=max(context, 1), verbose=False)
    vocab = llm.n_vocab()
    rng = random.Random(0)
    start = time.perf_counter()
    llm.eval([rng.randrange(vocab) for _ in range(context)])
    prefill_s = time.perf_counter() - start
    llm.eval([rng.randrange(vocab)])
    print(json.dumps({"llama_cpp_python": llama_cpp.__version__, "threads": threads, "context": context,
                      "prefill_s": prefill_s}), flush=True)
    for _ in sys.stdin:
        llm.n_tokens = context  # the next eval drops the last step's KV entry: every step sees `context`
        token = rng.randrange(vocab)
        start = time.perf_counter()
        llm.eval([token])
        print(time.perf_counter() - start, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="batch-1 decode steps of a GGUF through llama-cpp-python")
    parser.add_argument("gguf")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--context", type=int, required=True)
    a = parser.parse_args()
    _serve_steps(a.gguf, a.threads, a.context)
