"""One batched decoding engine for both decoder families: greedy, sampling and beam search.

A model takes part by implementing `Decodable.start_decoding`: it encodes/prefills a batch,
expands every input into `expand` rows (row `b * expand + j` is beam j of input b), and
returns a `DecodeState` and the first next-token logits. The state feeds one token per row
(`step`) and keeps rows whose indices beam search chooses (`reorder`); beams only ever move
within their own input's rows, so per-input state (padding masks, positions, cross-attention
keys/values) never needs reordering.

    state, logits = model.start_decoding(input_ids, attention_mask, expand=4, max_new_tokens=32)
    logits = state.step(tokens)          # (R,) tokens → (R, V) logits
    state.reorder(index)                 # row i becomes old row index[i]

Beam search follows Hugging Face's `generate`: the 2·K best continuations of the K live beams
are ranked; an eos continuation among the first K ranks ends a hypothesis scored
`sum log p / length ** length_penalty` (length counts the generated tokens, eos included);
the K best others stay live. An input is done when it holds K hypotheses and either
`early_stopping` or no live beam can still beat the worst of them (judged at the current
length, as Hugging Face's `early_stopping=False`). Every step is tensor operations over all
inputs and beams at once; nothing loops per beam in Python.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from dapeng.errors import ModelError
from dapeng.layers.attention import KVCache

# Below this temperature logits / temperature overflow (1e-40 gives inf, then NaN
# probabilities): sampling is then the argmax it converges to (vLLM's threshold too).
MIN_TEMPERATURE = 1e-5


class DecodeState(Protocol):
    """A model's running decoding state over R rows (inputs × expansion)."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (R,); return the next-token logits (R, V)."""
        ...

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (R,): row i becomes old row index[i]."""
        ...


class Decodable(Protocol):
    """A model that decodes through this engine."""

    def start_decoding(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, expand: int, max_new_tokens: int
    ) -> tuple[DecodeState, torch.Tensor]:
        """Prepare B inputs as B·expand rows for up to `max_new_tokens` steps; return the state and first logits."""
        ...


@dataclass(frozen=True)
class BeamResult:
    """The n best hypotheses per input.

    Attributes:
        sequences: (B, n, L) generated ids (no prompt), sorted best first; padded with pad_id after eos.
        scores: (B, n) `sum log p / length ** length_penalty` of each.
    """

    sequences: torch.Tensor
    scores: torch.Tensor


def select_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick the next token (B,) from (B, V) logits: argmax, or temperature / top-k / top-p sampling."""
    if temperature < MIN_TEMPERATURE:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class CacheRows:
    """Moves the rows of KV caches for beam search without allocating: each cache has a spare buffer.

    A reorder gathers the positions written so far into the spare (`index_select(out=...)`)
    and swaps the two, so a step copies only the filled prefix once.
    """

    def __init__(self, caches: Sequence[KVCache]) -> None:
        self.caches = caches
        self.spares: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reorder(self, index: torch.Tensor, end: int) -> None:
        """Row i of every cache becomes old row index[i]; only the first `end` positions are moved."""
        if bool((index == torch.arange(index.shape[0], device=index.device)).all()):
            return  # every beam kept its own row
        if not self.spares:
            self.spares = [(torch.empty_like(c.k), torch.empty_like(c.v)) for c in self.caches]
        for i, cache in enumerate(self.caches):
            spare_k, spare_v = self.spares[i]
            torch.index_select(cache.k[:, :, :end], 0, index, out=spare_k[:, :, :end])
            torch.index_select(cache.v[:, :, :end], 0, index, out=spare_v[:, :, :end])
            self.spares[i] = (cache.k, cache.v)
            cache.k, cache.v = spare_k, spare_v


def block_ngrams(logits: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """Set to -inf, in place, every token that would repeat an n-gram of `history` (R, T) in its row."""
    if n < 1 or history.shape[1] < n:  # no n-gram seen yet
        return logits
    if n == 1:
        return logits.scatter_(1, history, float("-inf"))
    windows = history.unfold(1, n, 1)  # (R, W, n): every n-gram so far
    prefix = history[:, history.shape[1] - n + 1 :]  # (R, n-1): what the next token would extend
    match = (windows[:, :, :-1] == prefix[:, None]).all(dim=-1)  # (R, W)
    rows, where = match.nonzero(as_tuple=True)
    logits[rows, windows[rows, where, -1]] = float("-inf")
    return logits


def _forbid(
    logits: torch.Tensor, history: torch.Tensor, step: int, min_new_tokens: int, eos: torch.Tensor | None, ngram: int
) -> torch.Tensor:
    """Apply min_new_tokens (no eos yet) and n-gram blocking to (R, V) logits, in place."""
    if eos is not None and step < min_new_tokens:
        logits[:, eos] = float("-inf")
    if ngram > 0:
        block_ngrams(logits, history, ngram)
    return logits


def _check(max_new_tokens: int, min_new_tokens: int, num_beams: int = 1) -> None:
    if max_new_tokens < 1:
        raise ModelError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ModelError(f"min_new_tokens must be between 0 and max_new_tokens={max_new_tokens}, got {min_new_tokens}")
    if num_beams < 1:
        raise ModelError(f"num_beams must be at least 1, got {num_beams}")


@torch.inference_mode()
def sample_steps(
    model: Decodable,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    min_new_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    no_repeat_ngram_size: int = 0,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Greedy (temperature 0) or sampled decoding; yield the (B,) new tokens step by step.

    A row ends after producing one of `eos_ids` (kept); ended rows continue with `pad_id`,
    and decoding stops once every row has ended or after `max_new_tokens` steps.
    """
    _check(max_new_tokens, min_new_tokens)
    state, logits = model.start_decoding(input_ids, attention_mask, 1, max_new_tokens)
    device = logits.device
    eos = torch.tensor(list(eos_ids), device=device) if eos_ids else None
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    history = torch.zeros(logits.shape[0], 0, dtype=torch.long, device=device)
    for i in range(max_new_tokens):
        if min_new_tokens or no_repeat_ngram_size:
            logits = _forbid(logits.float(), history, i, min_new_tokens, eos, no_repeat_ngram_size)
        token = select_token(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos is not None:
            token = token.masked_fill(finished, pad_id)
            finished |= torch.isin(token, eos)
        yield token
        if i == max_new_tokens - 1 or (eos is not None and bool(finished.all())):
            return
        if no_repeat_ngram_size:
            history = torch.cat([history, token[:, None]], dim=1)
        logits = state.step(token)


@torch.inference_mode()
def beam_search(
    model: Decodable,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    num_beams: int,
    *,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    min_new_tokens: int = 0,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    no_repeat_ngram_size: int = 0,
    num_return_sequences: int = 1,
) -> BeamResult:
    """Beam search over a batch; return the `num_return_sequences` best hypotheses per input.

    Args:
        model: the decoder (see `Decodable`).
        input_ids: (B, T) prompts or sources.
        attention_mask: (B, T) bool, True for real tokens.
        max_new_tokens: longest hypothesis.
        num_beams: live beams per input (K).
        eos_ids: tokens that end a hypothesis.
        pad_id: fills hypotheses shorter than the longest.
        min_new_tokens: eos is forbidden before this many tokens.
        length_penalty: exponent of the length that divides a hypothesis' log-probability
            (0: plain log-probability; above 0 favours longer outputs).
        early_stopping: an input is done as soon as it holds K finished hypotheses.
        no_repeat_ngram_size: no n-gram of this size occurs twice in a hypothesis (0: off).
        num_return_sequences: how many hypotheses per input to return (at most K).
    """
    _check(max_new_tokens, min_new_tokens, num_beams)
    if not 1 <= num_return_sequences <= num_beams:
        raise ModelError(f"num_return_sequences must be between 1 and num_beams={num_beams}, got {num_return_sequences}")
    k = num_beams
    state, logits = model.start_decoding(input_ids, attention_mask, k, max_new_tokens)
    device = logits.device
    b, vocab = input_ids.shape[0], logits.shape[-1]
    eos = torch.tensor(list(eos_ids), device=device) if eos_ids else None
    width = min(2 * k, k * vocab)  # enough candidates that K of them don't end
    offsets = torch.arange(b, device=device)[:, None] * k  # (B, 1): first row of each input
    rank = torch.arange(width, device=device)[None, :]  # (1, 2K)
    tokens = torch.full((b * k, max_new_tokens), pad_id, dtype=torch.long, device=device)  # live beams
    live = torch.zeros(b, k, device=device)
    live[:, 1:] = float("-inf")  # every beam starts identical: keep one until the first expansion
    best = torch.full((b, k, max_new_tokens), pad_id, dtype=torch.long, device=device)  # finished hypotheses
    best_scores = torch.full((b, k), float("-inf"), device=device)
    best_lengths = torch.zeros(b, k, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        logprobs = logits.float().log_softmax(dim=-1)  # (B·K, V)
        _forbid(logprobs, tokens[:, :i], i, min_new_tokens, eos, no_repeat_ngram_size)
        total = (live.view(-1, 1) + logprobs).view(b, k * vocab)
        cand_scores, flat = total.topk(width, dim=-1)  # (B, 2K), best first
        source, token = flat // vocab + offsets, flat % vocab  # (B, 2K) rows and tokens
        ends = torch.isin(token, eos) if eos is not None else torch.zeros_like(token, dtype=torch.bool)
        ends &= cand_scores > float("-inf")
        if i == max_new_tokens - 1:
            ends |= cand_scores > float("-inf")  # the last step ends every hypothesis
        # a hypothesis ends only from the first K ranks, and only for an input not done yet
        ending = ends & (rank < k) & ~done[:, None]
        if bool(ending.any()):
            normed = torch.where(ending, cand_scores / (i + 1) ** length_penalty, float("-inf"))
            seqs = tokens[source.view(-1)].view(b, width, -1).clone()  # (B, 2K, L)
            seqs.view(b * width, -1)[:, i] = token.view(-1)
            merged = torch.cat([best_scores, normed], dim=1).topk(k, dim=-1)
            best_scores = merged.values
            best = torch.cat([best, seqs], dim=1).gather(1, merged.indices[:, :, None].expand(-1, -1, max_new_tokens))
            lengths = torch.cat([best_lengths, torch.full_like(normed, i + 1, dtype=torch.long)], dim=1)
            best_lengths = lengths.gather(1, merged.indices)
        if i == max_new_tokens - 1:
            break
        # the K best continuations that don't end stay live
        kept_scores, keep = cand_scores.masked_fill(ends, float("-inf")).topk(k, dim=-1)  # (B, K)
        rows = source.gather(1, keep).view(-1)  # (B·K,)
        nxt = token.gather(1, keep).view(-1)
        tokens = tokens.index_select(0, rows)
        tokens[:, i] = nxt
        live = kept_scores
        full = best_scores[:, -1] > float("-inf")
        if early_stopping:
            done |= full
        else:
            done |= full & (live[:, 0] / (i + 1) ** length_penalty <= best_scores[:, -1])
        done |= live[:, 0] == float("-inf")  # nothing left to extend
        if bool(done.all()):
            break
        state.reorder(rows)
        logits = state.step(nxt)
    n = num_return_sequences
    sequences, scores = best[:, :n], best_scores[:, :n]
    return BeamResult(sequences[:, :, : int(best_lengths[:, :n].max())], scores)
