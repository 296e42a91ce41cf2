"""Constrained decoding in the torch engine: compile a request's turn grammar off the step loop, keep
one matcher per sequence, and mask a step's logits for all constrained rows in one tensor operation.

    GenerateRequest.constraint --GuideCompiler (thread pool, LRU cache)--> Guide (one per Sequence)
    step: most rows: no mask ahead; the token drawn from the unmasked logits is checked against the
          grammar (validate_tokens, about a microsecond), and only a refused one is masked and drawn
          again (GuidedRows)
          rows whose draw needs the mask (top-k/top-p, wrap-up) or whose tokens were lately refused:
          masks -> packed bitmask [R, V/32] (llguidance, in parallel; on a thread, during the forward)
          -> logits masked in one op (cluster/engine/bitmask.py) -> sampled token -> Guide.consume

The grammar (cluster/harmony/structured.py) covers the whole harmony turn, so the mask is on from
the first generated token; its analysis part allows any text. Requests without a constraint carry
no Guide and cost nothing: the runner only looks for Guides.

Wrap-up: a constrained answer that is cut off by max_tokens is invalid, so in the last
`wrap_up_tokens` tokens (engine.structured_wrap_up_tokens; 0: off) the mask
is narrowed to the allowed tokens that close things (quotes, brackets, the end of the turn), or
failing those, separators; a model that writes the value briskly never notices, and one that
rambles (a random model, say) still ends with a valid, if shortened, value.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import threading
from typing import TYPE_CHECKING

import llguidance
import llguidance.torch as llg_torch
import torch

from cluster.engine.errors import InvalidRequestError
from cluster.harmony.structured import (CONSTRAINED_STOP_TOKEN_IDS, ConstraintError, TurnConstraint, check_constraint,
                                        grammar_tokenizer, parser_limits, token_bytes, turn_grammar)
from cluster.harmony.tokenizer import RETURN_ID, VOCAB_SIZE

if TYPE_CHECKING:
    from cluster.engine.sequence import SamplingSettings

log = logging.getLogger(__name__)

_CLOSERS = b'"}]'
_SEPARATORS = b'"}],:'
_MAX_MASK_AHEAD_STEPS = 16


class Guide:
    """The grammar state of one sequence: which tokens may come next, advanced by each token taken."""

    def __init__(self, matcher: llguidance.LLMatcher, wrap_up_tokens: int) -> None:
        self.matcher = matcher
        self.wrap_up_tokens = wrap_up_tokens  # tokens before max_tokens where closing tokens win
        self.mask_ahead_steps = 0  # steps whose mask is computed ahead, after refused unmasked draws
        self._refusals = 0  # consecutive unmasked draws refused
        self.draws = 0  # tokens drawn for this sequence
        self.masked_draws = 0  # of those, drawn from masked logits (masked ahead, or refused unmasked)

    def allows(self, token_id: int) -> bool:
        """Whether the grammar takes `token_id` next: the same answer as the mask's bit, without a mask.
        llguidance's check refuses <|return|> (its end-of-sequence token) even where the mask allows
        it, at the end of the final answer; taking it on a copy of the matcher (microseconds) answers
        that one exactly."""
        if self.matcher.validate_tokens([token_id]):
            return True
        return token_id == RETURN_ID and self.matcher.deep_copy().consume_token(token_id)

    def note_unmasked_draw(self, allowed: bool) -> None:
        """After a refused unmasked draw the next steps' masks are computed ahead (1, 2, 4 .. 16
        steps as refusals repeat: inside a number, say, the model's favourite is rarely a digit);
        an allowed one goes back to drawing unmasked."""
        if allowed:
            self._refusals = 0
            return
        self.mask_ahead_steps = min(1 << self._refusals, _MAX_MASK_AHEAD_STEPS)
        self._refusals = min(self._refusals + 1, _MAX_MASK_AHEAD_STEPS.bit_length() - 1)

    def consume(self, token_id: int) -> bool:
        """Advance over `token_id`; False when the grammar refused it."""
        if not self.matcher.consume_token(token_id):
            # The mask allowed only tokens the grammar accepts, so this is a bug (or a stop token
            # after the end); generation goes on unconstrained rather than failing the batch.
            log.warning("constrained decoding: token %d refused (%s); the rest is unconstrained",
                        token_id, self.matcher.get_error()[:200])
            return False
        return True


class GuideCompiler:
    """Compiles turn constraints into Guides on its own threads, caching the compiled grammar by its
    text (a schema used again costs one matcher copy)."""

    def __init__(self, wrap_up_tokens: int, max_workers: int = 2, cache_size: int = 256) -> None:
        self.wrap_up_tokens = wrap_up_tokens
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="grammar-compile")
        self._cache: collections.OrderedDict[str, llguidance.LLMatcher] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._cache_size = cache_size
        self._pool.submit(grammar_tokenizer)  # build the vocabulary's index before the first request

    async def guide_for(self, constraint: TurnConstraint, max_tokens: int, resumed: tuple[int, ...] = ()) -> Guide:
        """A fresh Guide for one request, advanced over `resumed` (the turn's tokens a migrated stream
        already sent); raises InvalidRequestError naming the bad field."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.compile, constraint, max_tokens, resumed)

    def compile(self, constraint: TurnConstraint, max_tokens: int, resumed: tuple[int, ...] = ()) -> Guide:
        try:
            grammar = turn_grammar(constraint, max_tokens)
        except ConstraintError as err:
            raise InvalidRequestError(err.field, err.problem) from None
        with self._lock:
            template = self._cache.get(grammar)
            if template is not None:
                self._cache.move_to_end(grammar)
        if template is None:
            template = self._compile(constraint, max_tokens)
            with self._lock:
                self._cache[grammar] = template
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        guide = Guide(template.deep_copy(), self.wrap_up_tokens)
        for token_id in resumed:
            if not guide.consume(token_id):
                raise InvalidRequestError("prompt_token_ids", f"the resumed turn's token {token_id} does not "
                                          "follow the constraint")
        return guide

    @staticmethod
    def _compile(constraint: TurnConstraint, max_tokens: int) -> llguidance.LLMatcher:
        try:
            grammar = check_constraint(constraint, max_tokens)  # names the field of a bad part
        except ConstraintError as err:
            raise InvalidRequestError(err.field, err.problem) from None
        matcher = llguidance.LLMatcher(grammar_tokenizer(), grammar, log_level=0, limits=parser_limits())
        if matcher.is_error():
            raise InvalidRequestError(f"{constraint.field_prefix}.schema", matcher.get_error().splitlines()[0][:500])
        return matcher

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()


@functools.cache
def _wrap_up_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """Packed masks [V/32] of the closing tokens and of the closing-or-separating tokens."""
    closers, separators = [False] * VOCAB_SIZE, [False] * VOCAB_SIZE
    for token_id, piece in enumerate(token_bytes()):
        if piece and not piece.startswith(b"<|"):  # specials are spelled <|name|>
            closers[token_id] = not piece.translate(None, _CLOSERS)
            separators[token_id] = not piece.translate(None, _SEPARATORS)
    for token_id in CONSTRAINED_STOP_TOKEN_IDS:
        closers[token_id] = separators[token_id] = True
    return _pack(torch.tensor(closers)), _pack(torch.tensor(separators))


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """bool [V] -> int32 [V/32], bit j of word i for token 32 i + j (llguidance's layout)."""
    bytes_ = allowed.view(-1, 8).to(torch.uint8).mul(_BIT_VALUES).sum(dim=1, dtype=torch.uint8)
    return bytes_.view(torch.int32)  # little-endian: byte k of a word holds its bits 8 k .. 8 k + 7


def guide_bitmask(guides: list[Guide], tokens_left: list[int]) -> torch.Tensor:
    """Packed allowed-token bits [R, V/32] (int32) of each guide's next token, computed in parallel;
    rows with `tokens_left` within their guide's wrap-up are narrowed to closing tokens where any is allowed."""
    bitmask = torch.empty((len(guides), VOCAB_SIZE // 32), dtype=torch.int32)
    llg_torch.fill_next_token_bitmask_par(_executor(), [(g.matcher, i) for i, g in enumerate(guides)], bitmask)
    wrap = [i for i, (guide, left) in enumerate(zip(guides, tokens_left)) if left <= guide.wrap_up_tokens]
    if wrap:
        rows = bitmask[wrap]  # [W, V/32]
        for tier in _wrap_up_masks():
            narrowed = rows & tier
            rows = torch.where(narrowed.any(dim=1, keepdim=True), narrowed, rows)
        bitmask[wrap] = rows
    return bitmask


def start_guide_bitmask(guides: list[Guide], tokens_left: list[int]) -> concurrent.futures.Future[torch.Tensor]:
    """guide_bitmask on a thread of its own, started before the step's forward: llguidance and the
    forward both release the GIL, so the mask is usually ready when the logits are."""
    return _mask_thread().submit(guide_bitmask, guides, tokens_left)


@functools.cache
def _mask_thread() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="guide-mask")


class GuidedRows:
    """The constrained rows of a step's logits (runner -> sampler), in two kinds:

    * checked rows: no mask is computed ahead; the sampler draws from the unmasked logits and masks
      only a row whose token the grammar refuses. A token the grammar allows is the masked draw
      too (the argmax, or the winner of the same exponential race, over a subset that holds it),
      and a model that knows the format mostly draws allowed tokens: its rows cost no mask;
    * masked rows: their masks are computed on a thread while the forward runs. These are rows
      whose draw depends on the mask (top-k/top-p truncate the masked distribution; the wrap-up
      window narrows it) and rows whose guide saw its unmasked draws refused lately (a random
      model inside a number), where a mask after the draw would be a second, serial draw."""

    def __init__(self, rows: list[int], guides: list[Guide], tokens_left: list[int],
                 settings: list[SamplingSettings]) -> None:
        self.rows, self.guides, self.tokens_left = rows, guides, tokens_left
        self._position = {row: k for k, row in enumerate(rows)}  # row of the logits -> index in rows
        masked = [k for k, (guide, left, s) in enumerate(zip(guides, tokens_left, settings))
                  if guide.mask_ahead_steps > 0 or left <= guide.wrap_up_tokens or s.top_k > 0 or s.top_p < 1.0]
        for guide in guides:
            guide.draws += 1
        for k in masked:
            guides[k].mask_ahead_steps = max(0, guides[k].mask_ahead_steps - 1)
            guides[k].masked_draws += 1
        masked_set = set(masked)
        self.masked_rows = [rows[k] for k in masked]
        self.checked_rows = [row for k, row in enumerate(rows) if k not in masked_set]
        self._masks = start_guide_bitmask([guides[k] for k in masked], [tokens_left[k] for k in masked]) \
            if masked else None

    def masks(self) -> torch.Tensor:
        """The bitmask of masked_rows [len(masked_rows), V/32], waiting for its thread."""
        return self._masks.result()

    def refused(self, tokens: list[int]) -> list[int]:
        """Of checked_rows, those whose drawn token (`tokens`, by row) the grammar refuses; each
        checked row's guide notes the outcome (cluster/engine/guided.py Guide.note_unmasked_draw)."""
        refused = []
        for row in self.checked_rows:
            guide = self.guides[self._position[row]]
            allowed = guide.allows(tokens[row])
            guide.note_unmasked_draw(allowed)
            if not allowed:
                guide.masked_draws += 1
                refused.append(row)
        return refused

    def bitmask(self, rows: list[int]) -> torch.Tensor:
        """guide_bitmask of `rows` (a subset of self.rows), in their order, computed now."""
        picked = [self._position[row] for row in rows]
        return guide_bitmask([self.guides[k] for k in picked], [self.tokens_left[k] for k in picked])


_BIT_VALUES = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)

