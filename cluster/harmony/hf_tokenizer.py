"""o200k_harmony as Hugging Face tokenizer files, built locally, for engines that insist on one.

vLLM's structured outputs (its guidance backend builds llguidance's token index from a fast HF
tokenizer) need a tokenizer directory; a real gpt-oss checkpoint ships one, the checkpoints this
cluster writes do not, and nothing here downloads. `hf_tokenizer_dir()` writes tokenizer.json and
tokenizer_config.json once into the cache, converted by transformers' TikTokenConverter from the
three parts of the o200k_harmony definition: the verified o200k_base BPE file `load_tokenizer()`
reads, o200k's pre-tokenizer split pattern, and the names of the special and reserved ids
199998-201087 as openai-harmony's own encoding spells them. The result must encode a sample text
exactly as `load_tokenizer()` does, or the build fails.

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

from cluster.harmony.tokenizer import (FIRST_SPECIAL_ID, VOCAB_SIZE, default_cache_dir, load_tokenizer,
                                       materialize_vocab_file)

FILES = ("tokenizer.json", "tokenizer_config.json")

# o200k's pre-tokenizer split (tiktoken_ext.openai_public defines it inline for o200k_base, whose
# o200k_harmony reuses it): cased letter runs with English contractions, digits in threes,
# punctuation runs, newlines, other white space.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# Checked after conversion: the HF tokenizer must split and merge these as load_tokenizer() does
# (contractions, digit runs, mixed case, CJK, emoji, code, white space runs, a special token).
_SAMPLE = ("I'm sure they'LL say it's 1234567 km/h, isn't it?\n\n  Ünïcödé ΑΒΓ δ ПРИВЕТмир 東京タワー 😀👍🏽\n"
           "def f(x):\r\n\treturn x**2  # done\t\t<|end|>   ")

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
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = materialize_vocab_file(default_cache_dir())
    harmony = load_tokenizer()
    # Every id above the BPE ranks is a special or reserved token; openai-harmony decodes each to its name.
    specials = [harmony.decode([token_id]) for token_id in range(FIRST_SPECIAL_ID, VOCAB_SIZE)]
    converted = TikTokenConverter(vocab_file=str(vocab_file), pattern=O200K_PATTERN,
                                  extra_special_tokens=specials).converted()
    if converted.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"the converted o200k_harmony has {converted.get_vocab_size()} ids, not {VOCAB_SIZE}")
    ours, theirs = converted.encode(_SAMPLE).ids, harmony.encode(_SAMPLE, allow_special=True)
    if ours != theirs:
        raise RuntimeError(f"the converted o200k_harmony encodes {_SAMPLE!r} as {ours}, openai-harmony as {theirs}")
    return PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="<|endoftext|>",
                                   model_max_length=131072, clean_up_tokenization_spaces=False)
