"""Task `causal-lm`: next-token language modelling on plain text, and generation with a chat template.

Training: records `{"text": ...}` (a text file's documents or lines) are tokenized, joined
with the end-of-text token and cut into blocks of `block_size` tokens; the loss is the
next-token cross-entropy, the metric perplexity. Fine-tune a pretrained LM with
`model.init: smollm2-135m` (its tokenizer is adopted) or train a small one from scratch
(a byte-level BPE is learned from the training texts).

Generation: `generate(model, prompt, ...)` renders chat messages through the model's own
chat template, runs the model's KV-cache decoding (greedy, temperature, top-k, top-p, beam
search with length penalty and n-gram blocking, stop tokens and stop strings) and returns the text, or an iterator of text pieces with
`stream=True`. Pieces are detokenized incrementally, never splitting a UTF-8 character.

Serving: `decoding(prompt, ...)` is one sequence's own state for a scheduler that runs many
sequences in one batch (`models.lm.DecodeBatch`): it picks each next token from that
sequence's logits with its own sampling options, penalties and random generator, and turns
its tokens into text pieces (and log-probabilities when asked).
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dapeng.errors import DataError
from dapeng.models.decoding import select_token
from dapeng.tasks.base import Capabilities

__all__ = ["CausalLM", "Decoding", "Perplexity", "TokenLogprob", "render_chat"]

EOT = "<|endoftext|>"
Messages = list[dict[str, str]]


def render_chat(template: str, messages: Messages, add_generation_prompt: bool = True, **extra: Any) -> str:
    """Render chat `messages` with a Hugging Face-style Jinja chat template (sandboxed)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)


class Perplexity:
    """Token-weighted mean negative log-likelihood over an evaluation pass, and its exponent."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        self.nll += float(outputs["nll_sum"])
        self.tokens += int(outputs["tokens"])

    def compute(self) -> dict[str, float]:
        mean = self.nll / max(self.tokens, 1)
        return {"perplexity": math.exp(min(mean, 50.0)), "token_nll": mean}


class CausalLM:
    """Language modelling and generation.

    Args:
        tokenizer: a `tokenizers` JSON string (None: learn a byte-level BPE in `setup`).
        chat_template: Jinja template turning messages into a prompt (None: chat unavailable).
        block_size: tokens per training example.
        vocab_size: vocabulary size when learning a tokenizer.
        bos_id, eos_id, pad_id: special token ids; stop_ids: tokens that end generation.
        add_bos: start every text with `bos_id`.
        max_length: the model's context length (prompt + new tokens).
        join: "newline" joins the records (a text file's lines) into one text; "eos" ends
            each record with the end-of-text token (separate documents).
    """

    name = "causal-lm"
    # `predict` would only score a text's perplexity; requests for text go through `generate`
    capabilities = Capabilities(
        input="text", output="text", verbs=frozenset({"generate", "explain"}), explain=("attention", "rollout"),
        batching=True, output_schema={"type": "string"},
    )

    def __init__(
        self,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        block_size: int = 256,
        vocab_size: int = 8000,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        stop_ids: Sequence[int] | None = None,
        add_bos: bool = False,
        max_length: int = 2048,
        join: str = "newline",
    ) -> None:
        if join not in ("newline", "eos"):
            raise DataError(f"causal-lm join must be 'newline' or 'eos', got {join!r}")
        if block_size < 2:
            raise DataError(f"causal-lm block_size must be at least 2, got {block_size}")
        self.tokenizer_json = tokenizer
        self.chat_template = chat_template
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.stop_ids = list(stop_ids) if stop_ids is not None else None
        self.add_bos = add_bos
        self.max_length = max_length
        self.join = join
        self._tokenizer: Any = None

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CausalLM:
        known = ("tokenizer", "chat_template", "block_size", "vocab_size", "bos_id", "eos_id", "pad_id",
                 "stop_ids", "add_bos", "max_length", "join")
        return cls(**{k: state[k] for k in known if k in state})

    # -- tokenizer ------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.tokenizer_json is None:
                raise DataError("causal-lm has no tokenizer yet", "call setup(train) or start from model.init")
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
            self._fill_special_ids()
        return self._tokenizer

    def use_tokenizer(self, tokenizer_json: str) -> None:
        """Adopt a pretrained model's tokenizer (called when a run starts from `model.init`)."""
        self.tokenizer_json = tokenizer_json
        self._tokenizer = None

    def _fill_special_ids(self) -> None:
        eot = self._tokenizer.token_to_id(EOT)
        if self.eos_id is None:
            self.eos_id = eot
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        if self.stop_ids is None:
            self.stop_ids = sorted({i for i in (self.eos_id, eot) if i is not None})

    def setup(self, train: Sequence[dict[str, Any]]) -> None:
        """Learn a byte-level BPE from the training texts unless a tokenizer was given."""
        if self.tokenizer_json is None:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=self.vocab_size, special_tokens=[EOT],
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            tok.train_from_iterator((self._text(r, i) for i, r in enumerate(train)), trainer)
            self.tokenizer_json = tok.to_str()
            self._tokenizer = None
        self.tokenizer  # noqa: B018 - parse now, so a bad tokenizer fails before training

    def model_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": self.tokenizer.get_vocab_size(), "pad_id": self.pad_id,
                "max_positions": max(self.block_size, 16)}

    # -- records → blocks -----------------------------------------------------------------

    @staticmethod
    def _text(record: dict[str, Any], i: int) -> str:
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f"record {i}: no 'text' field", "causal-lm reads plain text (set data.text_column)")
        return text

    def encode(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Join the texts (by newlines or end-of-text tokens) and cut the stream into `block_size` blocks."""
        texts = [self._text(r, i) for i, r in enumerate(records)]
        if self.join == "newline":
            texts = ["\n".join(texts)]
        stream: list[int] = []
        for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False):
            if self.add_bos and self.bos_id is not None:
                stream.append(self.bos_id)
            stream.extend(enc.ids)
            if self.eos_id is not None:
                stream.append(self.eos_id)
        if len(stream) < 2:
            raise DataError("causal-lm: the texts hold fewer than 2 tokens", "give it some text")
        size = self.block_size
        blocks = [stream[i : i + size] for i in range(0, len(stream), size)]
        if len(blocks) > 1 and len(blocks[-1]) < 2:
            blocks.pop()
        return [{"input_ids": torch.tensor(b, dtype=torch.long)} for b in blocks]

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id or 0, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.bool)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n] = it["input_ids"]
            mask[i, :n] = True
        return {"input_ids": ids, "attention_mask": mask}  # (B, T), (B, T)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean next-token cross-entropy over real tokens."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        # Right padding only: causal attention never lets a real token see the padding after it.
        logits = model(ids)  # (B, T, V)
        target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # (B, T-1)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                              reduction="sum")
        tokens = (target != -100).sum()
        return nll / tokens.clamp_min(1), {"nll_sum": nll.detach(), "tokens": tokens}

    def metric(self) -> Perplexity:
        return Perplexity()

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[Any]:
        mean = float(outputs["nll_sum"]) / max(int(outputs["tokens"]), 1)
        return [{"perplexity": math.exp(min(mean, 50.0))}]

    def state(self) -> dict[str, Any]:
        return {"labels": None, "tokenizer": self.tokenizer_json, "chat_template": self.chat_template,
                "block_size": self.block_size, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "stop_ids": self.stop_ids,
                "add_bos": self.add_bos, "max_length": self.max_length, "join": self.join}

    # -- generation -----------------------------------------------------------------------

    def prompt_text(self, prompt: str | Messages, chat: bool = False, system: str | None = None) -> str:
        """The text fed to the model: `prompt` as is, or chat messages rendered by the template."""
        if isinstance(prompt, str) and not chat:
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None and (not messages or messages[0].get("role") != "system"):
            messages.insert(0, {"role": "system", "content": system})
        if not self.chat_template:
            raise DataError("this model has no chat template", "pass a plain prompt without --chat")
        tok = self.tokenizer
        special = {
            "bos_token": tok.id_to_token(self.bos_id) if self.bos_id is not None else "",
            "eos_token": tok.id_to_token(self.eos_id) if self.eos_id is not None else "",
        }
        return render_chat(self.chat_template, messages, add_generation_prompt=True, **special)

    def prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if not ids:
            raise DataError("the prompt is empty", "give the model some text to continue")
        return ids

    def generate(
        self,
        model: nn.Module,
        prompt: str | Messages,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        stream: bool = False,
        chat: bool = False,
        system: str | None = None,
        seed: int | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
    ) -> str | Generation:
        """Continue `prompt` (a string, or chat messages `[{"role", "content"}]`).

        Args:
            model: the `lm`.
            prompt: text to continue, or messages rendered through the chat template.
            max_new_tokens: tokens to generate at most.
            temperature: 0 is greedy; above 0 samples from logits / temperature.
            top_k, top_p: restrict sampling to the k most likely tokens / the nucleus of mass p.
            stop: strings that end the text (not included in it).
            stream: return an iterator of text pieces instead of the whole text.
            chat: treat a string prompt as one user message of a chat.
            system: a system message to put first in a chat.
            seed: seed for reproducible sampling.
            num_beams: above 1, beam search (`models.decoding.beam_search`) instead of greedy/sampling;
                its best text is streamed once the search ends.
            length_penalty: beam scores are log-probabilities divided by length ** length_penalty.
            no_repeat_ngram_size: no n-gram of this many tokens repeats in the new text (0: off).

        Returns:
            The generated text (without the prompt), or with `stream=True` a `Generation`: an
            iterator over its pieces whose `finish_reason` ("stop" or "length") is set at the end.
        """
        ids, budget = self._prompt_and_budget(prompt, max_new_tokens, chat, system, self.max_length)
        search = {"num_beams": num_beams, "length_penalty": length_penalty, "no_repeat_ngram_size": no_repeat_ngram_size}
        pieces = self._pieces(model, ids, budget, temperature, top_k, top_p, tuple(stop), seed, search)
        return pieces if stream else "".join(pieces)

    def _prompt_and_budget(
        self, prompt: str | Messages, max_new_tokens: int | None, chat: bool, system: str | None, context: int
    ) -> tuple[list[int], int]:
        """The prompt's token ids and how many tokens may follow them (`max_new_tokens`, or the rest of the context)."""
        if max_new_tokens is not None and max_new_tokens < 1:
            raise DataError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        ids = self.prompt_ids(self.prompt_text(prompt, chat or not isinstance(prompt, str), system))
        room = context - len(ids)
        if room < 1:
            raise DataError(f"the prompt has {len(ids)} tokens, the model's context is {context}", "shorten the prompt")
        return ids, room if max_new_tokens is None else min(max_new_tokens, room)

    def decoding(
        self,
        prompt: str | Messages,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logprobs: int | None = None,
        chat: bool = False,
        system: str | None = None,
        context: int | None = None,
        device: torch.device | str = "cpu",
    ) -> Decoding:
        """One sequence's decoding state, for a scheduler that batches many (see `Decoding`).

        Args:
            prompt: text to continue, or chat messages rendered through the chat template.
            max_new_tokens: tokens to generate at most; None: the rest of the context.
            temperature, top_k, top_p, stop, seed, chat, system: as for `generate`.
            presence_penalty: subtracted from the logit of every token generated so far (OpenAI's).
            frequency_penalty: subtracted once per time each token was generated so far.
            logprobs: also report each token's log-probability and this many most likely
                alternatives (0: the token's own only); None: none.
            context: most positions prompt + new tokens may take (default `max_length`).
            device: where the logits will be (the random generator lives there).
        """
        ids, budget = self._prompt_and_budget(
            prompt, max_new_tokens, chat, system, min(context or self.max_length, self.max_length)
        )
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        sampler = _Sampler(temperature, top_k, top_p, presence_penalty, frequency_penalty, generator)
        return Decoding(self.tokenizer, ids, budget, sampler, set(self.stop_ids or ()), tuple(stop), logprobs)

    def _pieces(
        self,
        model: nn.Module,
        ids: list[int],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        stop: tuple[str, ...],
        seed: int | None,
        search: dict[str, Any],
    ) -> Generation:
        if search["num_beams"] < 1:
            raise DataError(f"num_beams must be at least 1, got {search['num_beams']}")
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        prompt = torch.tensor([ids], device=device)
        common = {"max_new_tokens": max_new_tokens, "stop_ids": self.stop_ids or (),
                  "no_repeat_ngram_size": search["no_repeat_ngram_size"]}
        if search["num_beams"] > 1:  # the whole search runs first: only its winner is known at the end
            best = model.generate(prompt, num_beams=search["num_beams"], length_penalty=search["length_penalty"],
                                  **common)
            tokens: Iterator[int] = iter(best[0, len(ids):].tolist())
        else:
            tokens = model.generate(prompt, temperature=temperature, top_k=top_k, top_p=top_p, stream=True,
                                    generator=generator, **common)
        return Generation(self.tokenizer, tokens, set(self.stop_ids or ()), stop)


class Generation(Iterator[str]):
    """The text pieces of one generation; once they are all read, `finish_reason` says why it ended.

    "stop": a stop token or stop string ended it; "length": the token budget (max_new_tokens or
    the model's context) ran out. None while pieces remain (OpenAI's `finish_reason`).
    """

    def __init__(self, tokenizer: Any, tokens: Iterator[int], stop_ids: set[int], stop: tuple[str, ...]) -> None:
        self.finish_reason: str | None = None
        self._pieces = _detokenize(tokenizer, tokens, stop_ids, stop)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration as done:  # the generator returns its finish reason
            self.finish_reason = done.value
            raise


def _detokenize(
    tokenizer: Any, tokens: Iterator[int], stop_ids: set[int], stop: tuple[str, ...]
) -> Generator[str, None, str]:
    """Turn a token stream into text pieces: whole UTF-8 characters only, stop ids and stop strings cut.

    Returns (as the generator's value) why the stream ended: "stop" or "length".
    """
    text = _Detokenizer(tokenizer, stop_ids, stop)
    for token in tokens:
        piece = text.push(token)
        if piece:
            yield piece
        if text.finish_reason is not None:
            return text.finish_reason
    piece = text.finish()
    if piece:
        yield piece
    return text.finish_reason or "length"


class _Detokenizer:
    """Tokens in, text pieces out, one token at a time; `finish_reason` is set once the text has ended."""

    def __init__(self, tokenizer: Any, stop_ids: set[int], stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars kept back while a stop string may be forming
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None

    def push(self, token: int) -> str:
        """The text that `token` completes ("" when none yet); a stop id or stop string ends the text."""
        if token in self.stop_ids:
            return self.finish("stop")
        self.tokens.append(token)
        self.text = text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is still incomplete
        cut = _stop_at(text, self.stop, max(0, self.emitted - self.hold))
        if cut >= 0:
            return self._emit(cut, "stop")
        if len(text) - self.hold > self.emitted:
            return self._emit(len(text) - self.hold, None)
        return ""

    def finish(self, reason: str = "length") -> str:
        """The text held back, at the end ("length": the budget ran out; "stop": a stop token)."""
        if self.finish_reason is not None:
            return ""
        cut = _stop_at(self.text, self.stop, max(0, self.emitted - self.hold))
        return self._emit(cut if cut >= 0 else len(self.text), "stop" if cut >= 0 else reason)

    def _emit(self, end: int, reason: str | None) -> str:
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        self.finish_reason = reason
        return piece


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's text and log-probability, and the most likely alternatives at its step."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


class _Sampler:
    """One sequence's sampling: penalties over its own tokens, then greedy or sampled with its own generator."""

    def __init__(
        self,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        presence_penalty: float,
        frequency_penalty: float,
        generator: torch.Generator | None,
    ) -> None:
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.presence = presence_penalty
        self.frequency = frequency_penalty
        self.generator = generator
        self.counts: torch.Tensor | None = None  # (V,) times each token was generated, kept only with penalties

    def __call__(self, logits: torch.Tensor) -> int:
        if self.counts is not None:
            logits = logits.float() - self.frequency * self.counts - self.presence * (self.counts > 0).float()
        return int(select_token(logits[None], self.temperature, self.top_k, self.top_p, self.generator)[0])

    def count(self, token: int, vocab: int, device: torch.device) -> None:
        if not (self.presence or self.frequency):
            return
        if self.counts is None:
            self.counts = torch.zeros(vocab, device=device)
        self.counts[token] += 1


class Decoding:
    """One sequence being generated in a shared batch: it chooses its tokens and turns them into text.

    The scheduler calls `choose(logits)` with this sequence's next-token logits (V,) and feeds
    the token back to the model until `finish_reason` is set ("stop": a stop token or stop
    string; "length": the token budget ran out). Each `choose` returns the text that token
    completes ("" while a character or a possible stop string is incomplete); with
    `logprobs` asked for, `take_logprobs()` hands over the entries of the tokens so far.

    Args:
        tokenizer: the task's tokenizer.
        prompt_ids: the prompt's token ids.
        budget: most tokens to generate.
        sampler: how the next token is picked.
        stop_ids: tokens that end the text (not part of it).
        stop: strings that end the text (not part of it).
        logprobs: alternatives to report per token (None: no log-probabilities).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        budget: int,
        sampler: _Sampler,
        stop_ids: set[int],
        stop: tuple[str, ...],
        logprobs: int | None = None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.budget = budget
        self.tokens: list[int] = []
        self._sampler = sampler
        self._text = _Detokenizer(tokenizer, stop_ids, stop)
        self._tokenizer = tokenizer
        self.logprobs = logprobs
        self._entries: list[TokenLogprob] = []

    @property
    def finish_reason(self) -> str | None:
        return self._text.finish_reason

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return self._text.text[: self._text.emitted]

    def choose(self, logits: torch.Tensor) -> tuple[int, str]:
        """Pick the next token from (V,) logits; return it and the text it completes."""
        token = self._sampler(logits)
        self.tokens.append(token)
        self._sampler.count(token, logits.shape[-1], logits.device)
        if self.logprobs is not None and token not in self._text.stop_ids:
            self._entries.append(self._logprob(logits, token))
        piece = self._text.push(token)
        if self.finish_reason is None and len(self.tokens) >= self.budget:
            piece += self._text.finish("length")
        return token, piece

    def take_logprobs(self) -> list[TokenLogprob]:
        """The log-probability entries recorded since the last call."""
        entries, self._entries = self._entries, []
        return entries

    def _logprob(self, logits: torch.Tensor, token: int) -> TokenLogprob:
        logp = torch.log_softmax(logits.float(), dim=-1)
        top: list[tuple[str, float]] = []
        if self.logprobs:
            values, ids = logp.topk(self.logprobs)
            top = [(self._token_text(int(i)), float(v)) for v, i in zip(values, ids)]
        return TokenLogprob(self._token_text(token), float(logp[token]), top)

    def _token_text(self, token: int) -> str:
        return self._tokenizer.decode([token], skip_special_tokens=False)


def _stop_at(text: str, stop: tuple[str, ...], start: int) -> int:
    """Index of the first stop string in `text` at or after `start`, or -1."""
    found = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(found, default=-1)
