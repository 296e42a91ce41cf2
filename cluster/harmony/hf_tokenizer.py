"""o200k_harmony as Hugging Face tokenizer files, built locally, for engines that insist on one.

vLLM's structured outputs (its guidance backend builds llguidance's token index from a fast HF
tokenizer) need a tokenizer directory; a real gpt-oss checkpoint ships one, the checkpoints this
cluster writes do not, and nothing here downloads. `hf_tokenizer_dir()` writes tokenizer.json and
tokenizer_config.json once into the cache, from the same verified o200k_base BPE file as
`load_tokenizer()` and tiktoken's definition of o200k_harmony (its split pattern and the names of
the special and reserved ids 199998-201087), converted by transformers' TikTokenConverter.

Needs transformers and tiktoken (both come with vLLM); the default install never calls this.
The EOS token is <|endoftext|>, which the turn grammar never names: a turn ends at <|return|> or
<|call|>, both stop ids the engine passes explicitly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from unittest import mock

from cluster.harmony.tokenizer import VOCAB_SIZE, default_cache_dir, materialize_vocab_file

FILES = ("tokenizer.json", "tokenizer_config.json")
_lock = threading.Lock()


def hf_tokenizer_dir(cache_dir: Path | None = None) -> Path:
    """A directory holding o200k_harmony as HF tokenizer files (built on first use, ~1 min)."""
    target = Path(cache_dir or default_cache_dir().parent / "hf-o200k_harmony")
    with _lock:
        if all((target / name).is_file() for name in FILES):
            return target
        target.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            _build().save_pretrained(partial)
            for name in FILES:  # each file whole or absent, for another process looking at the same cache
                os.replace(partial / name, target / name)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target


def _build():
    import tiktoken.load
    import tiktoken_ext.openai_public as openai_public
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = str(materialize_vocab_file(default_cache_dir()))
    # tiktoken's o200k_harmony definition, reading the local file instead of its URL.
    local = lambda _url, expected_hash=None: tiktoken.load.load_tiktoken_bpe(vocab_file, expected_hash)  # noqa: E731
    with mock.patch.object(openai_public, "load_tiktoken_bpe", local):
        definition = openai_public.o200k_harmony()
    # One name per id (o200k_base's <|endofprompt|> and harmony's <|reserved_200018|> share 200018: harmony's).
    names = {token_id: name for name, token_id in definition["special_tokens"].items()}
    specials = sorted((token_id, name) for token_id, name in names.items())
    first = len(definition["mergeable_ranks"])
    if [i for i, _ in specials] != list(range(first, VOCAB_SIZE)):
        raise RuntimeError(f"o200k_harmony's special ids are not {first}..{VOCAB_SIZE - 1} in a row")
    converted = TikTokenConverter(vocab_file=vocab_file, pattern=definition["pat_str"],
                                  extra_special_tokens=[name for _, name in specials]).converted()
    return PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="<|endoftext|>",
                                   model_max_length=131072, clean_up_tokenization_spaces=False)
