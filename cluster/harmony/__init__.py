"""Harmony, the chat format of gpt-oss: the o200k_harmony tokenizer (offline), prompt rendering
and incremental parsing of completions. openai-harmony does the work; its types stay in here."""

from cluster.harmony.parse import Delta, DeltaKind, StreamParser
from cluster.harmony.render import HarmonyInputError, Message, ToolDefinition, render_prompt
from cluster.harmony.tokenizer import (CALL_ID, CHANNEL_ID, CONSTRAIN_ID, END_ID, ENDOFTEXT_ID, MESSAGE_ID, RETURN_ID,
                                       START_ID, STARTOFTEXT_ID, VOCAB_SIZE, HarmonyTokenizer,
                                       StreamDecoder, VocabFileError, load_tokenizer)

__all__ = [
    "CALL_ID", "CHANNEL_ID", "CONSTRAIN_ID", "END_ID", "ENDOFTEXT_ID", "MESSAGE_ID", "RETURN_ID", "START_ID",
    "STARTOFTEXT_ID", "VOCAB_SIZE",
    "Delta", "DeltaKind", "HarmonyInputError", "HarmonyTokenizer", "Message", "StreamDecoder", "StreamParser",
    "ToolDefinition", "VocabFileError", "load_tokenizer", "render_prompt",
]
