"""Extractive question answering: the span of a context that answers a question (SQuAD v1/v2).

Records are `{"question", "context", "answers": [{"text", "answer_start"}, ...]}` (SQuAD's
layout, `dapeng.data.readers.read_squad`; no answers at predict time, or an empty list for a
v2 question the context can't answer).

Encoding: the question and the context are tokenized apart (the context with its character
offsets) and put together the way BERT reads a pair, `[CLS] question [SEP] context [SEP]`,
token types 0 then 1. A context longer than `max_length` leaves is cut into windows that
overlap by `stride` tokens, each window paired with the whole question (cut to
`max_question_length`, and to half a window), in training as at inference. A window trains on the answer's first
and last tokens when it holds the whole answer, else on [CLS] ("not in this window").

The model is any encoder that gives two scores per token, (R, T, 2): `transformer` with
`pooling: none` (from scratch, or `model.init: minilm-l6`), `num_labels` 2. Only context
tokens and [CLS] can be picked.

Decoding (SQuAD's usual post-processing): over every window of a question, the best span
`start <= end < start + max_answer_length` of context tokens by start + end score; its
characters are cut from the original context through the tokens' offsets, so the answer is
the text as written (case, accents, spacing). With `no_answer` (SQuAD v2; default: when some
training question has no answers), the null score is [CLS]'s start + end score in the window
where it is lowest, and the answer is "" when null - best span > `null_threshold`.

Metrics: the official SQuAD v2.0 evaluation's `exact_match` and `f1` (0-100, each the max over
a question's gold answers, after its answer normalisation: lower case, no punctuation, no
articles, single spaces); a question without gold answers counts as right only when "" is
predicted.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn

from dapeng.errors import DataError, ModelError
from dapeng.models import forward_inputs
from dapeng.records import Record
from dapeng.tasks._classification import parse_options, where
from dapeng.tasks._words import WordOptions
from dapeng.tasks.base import Capabilities

__all__ = ["QAMetric", "QuestionAnswering", "exact_match", "f1_score", "normalize_answer"]

SPAN_OUTPUT = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "score": {"type": "number"},
                   "start": {"type": ["integer", "null"]}, "end": {"type": ["integer", "null"]}},
    "required": ["answer", "score", "start", "end"],
}
_NEG = -1e4  # the score of a token that can't start or end an answer (finite: bf16 and softmax stay sane)


# ---------------------------------------------------------------- SQuAD's evaluation

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation and articles removed, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when both normalise to the same string."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings (an empty one scores 1 only against another empty one)."""
    predicted, true = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not true:
        return float(predicted == true)
    same = sum((collections.Counter(predicted) & collections.Counter(true)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(true)
    return 2 * precision * recall / (precision + recall)


def score_answers(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction, each the max over the gold answers ([""]: no answer)."""
    golds = [g for g in golds if normalize_answer(g)] or [""]
    return max(exact_match(prediction, g) for g in golds), max(f1_score(prediction, g) for g in golds)


class QAMetric:
    """SQuAD's exact match and F1 (0-100) over the decoded answers of an evaluation pass.

    Args:
        decode: the task's `decode` (model outputs → answers), so evaluation scores what predict returns.
    """

    def __init__(self, decode: Any) -> None:
        self.decode = decode
        self.em = self.f1 = 0.0
        self.total = 0

    def update(self, outputs: dict[str, Any], batch: dict[str, Any]) -> None:
        for answer, golds in zip(self.decode(outputs), batch["gold"]):
            self.add(answer["answer"], golds)

    def add(self, prediction: str, golds: Sequence[str]) -> None:
        em, f1 = score_answers(prediction, golds)
        self.em += em
        self.f1 += f1
        self.total += 1

    def compute(self) -> dict[str, float]:
        n = max(self.total, 1)
        return {"exact_match": 100.0 * self.em / n, "f1": 100.0 * self.f1 / n}


# ---------------------------------------------------------------- options


class QAOptions(WordOptions):
    """`task_options` of question-answering (tokenizer options shared with the other text tasks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_length: int = Field(256, ge=8, description="positions per window: [CLS] question [SEP] context [SEP]")
    stride: int = Field(64, ge=0, description="context tokens two neighbouring windows share")
    max_question_length: int = Field(64, ge=1, description="question tokens kept (the rest is cut; at most "
                                     "half of max_length)")
    max_answer_length: int = Field(30, ge=1, description="longest answer, in tokens")
    no_answer: bool | None = Field(None, description="SQuAD v2: may answer \"\"; default: when some training "
                                   "question has no answers")
    null_threshold: float = Field(0.0, description="answer \"\" when null score - best span score exceeds this")


# ---------------------------------------------------------------- records


def _text_field(record: Record, i: int, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        found = ", ".join(k for k in record if not k.startswith("_"))
        raise DataError(f"{where(record, i)}: {key!r} must be a string (keys: {found})",
                        'records are {"question": ..., "context": ..., "answers": [{"text", "answer_start"}]}')
    return value


def _answers(record: Record, i: int, context: str) -> list[tuple[str, int]] | None:
    """The record's gold answers as (text, start); None when it has no "answers" key (predict)."""
    raw = record.get("answers")
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise DataError(f"{where(record, i)}: 'answers' must be a list", "give [{\"text\", \"answer_start\"}, ...]")
    out = []
    for k, answer in enumerate(raw):
        text = answer.get("text") if isinstance(answer, dict) else None
        start = answer.get("answer_start") if isinstance(answer, dict) else None
        if not isinstance(text, str) or not isinstance(start, int) or context[start : start + len(text)] != text:
            raise DataError(f"{where(record, i)}: answer {k} is not the context's text at its answer_start",
                            "answer_start is the answer's character offset in the context")
        out.append((text, start))
    return out


# ---------------------------------------------------------------- the task


class QuestionAnswering:
    """A question and a context in, the context's answering span out. Options: see `QAOptions`."""

    name = "question-answering"
    capabilities = Capabilities(input="question", output="span", verbs=frozenset({"predict"}),
                                output_schema=SPAN_OUTPUT)

    def __init__(self, **options: Any) -> None:
        self.options: QAOptions = parse_options(QAOptions, self.name, options)
        self.no_answer = bool(self.options.no_answer)
        self.tokenizer: Any = None
        self.pad_id = 0
        self.cls_id = self.sep_id = 0

    # -- setup ----------------------------------------------------------------------------

    def setup(self, train: Sequence[Record]) -> None:
        """Learn a tokenizer on the questions and contexts, and whether questions may go unanswered."""
        from dapeng.data.tokenizers import load_tokenizer, train_tokenizer

        if not train:
            raise DataError("question-answering has no training records", "check data.train")
        texts, unanswered = [], False
        for i, record in enumerate(train):
            context = _text_field(record, i, "context")
            answers = _answers(record, i, context)
            if answers is None:
                raise DataError(f"{where(record, i)}: training record has no 'answers'",
                                "give each training question its answers ([] for one the context can't answer)")
            unanswered |= not answers
            texts += [_text_field(record, i, "question"), context]
        self.no_answer = unanswered if self.options.no_answer is None else self.options.no_answer
        opts = self.options
        if opts.tokenizer_path:
            self.tokenizer = load_tokenizer(opts.tokenizer_path)
        else:
            self.tokenizer = train_tokenizer(dict.fromkeys(texts), opts.tokenizer, opts.vocab_size, opts.lowercase,
                                             opts.min_frequency)
        self._finish_tokenizer()

    def use_tokenizer(self, tokenizer_json: str) -> None:
        """Encode with a pretrained model's own tokenizer (`model.init`; `hub.init` calls this)."""
        from dapeng.data.tokenizers import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_json)
        self._finish_tokenizer()

    def _finish_tokenizer(self) -> None:
        from dapeng.data.tokenizers import CLS, PAD, SEP, special_id

        # windows and padding are this task's own: a tokenizer.json that truncated would drop context
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        cls, sep = self.tokenizer.token_to_id(CLS), self.tokenizer.token_to_id(SEP)
        if cls is None or sep is None:
            raise DataError("question-answering needs a tokenizer with [CLS] and [SEP]",
                            "use tokenizer: wordpiece/bpe/word, or a BERT-style tokenizer.json")
        self.cls_id, self.sep_id = cls, sep
        self.pad_id = special_id(self.tokenizer, PAD, fallback=0)

    def model_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": self.tokenizer.get_vocab_size(), "num_labels": 2, "pad_id": self.pad_id,
                "pooling": "none"}

    # -- records → tensors ----------------------------------------------------------------

    def encode(self, records: Sequence[Record]) -> list[dict[str, Any]]:
        """One item per record: its windows `input_ids`, `token_type_ids`, `context_index` (N, T) (the
        context token at each position, -1 elsewhere), `lengths` (N,), training targets `start`/`end`
        (N,) when it has answers, and the context, its token offsets and the gold answer texts."""
        if self.tokenizer is None:
            raise DataError("question-answering: encode before setup", "call setup(train) or from_state(state)")
        questions, contexts, golds = [], [], []
        for i, record in enumerate(records):
            questions.append(_text_field(record, i, "question"))
            contexts.append(_text_field(record, i, "context"))
            golds.append(_answers(record, i, contexts[-1]))
        q_encodings = self.tokenizer.encode_batch(questions, add_special_tokens=False)
        c_encodings = self.tokenizer.encode_batch(contexts, add_special_tokens=False)
        # at most half a window for the question, so every window holds some context
        keep = min(self.options.max_question_length, self.options.max_length // 2)
        return [self._item(q.ids[:keep], c.ids, c.offsets, context, answers)
                for q, c, context, answers in zip(q_encodings, c_encodings, contexts, golds)]

    def windows(self, n_context: int, n_question: int) -> list[tuple[int, int]]:
        """The context token runs `[start, end)` of each window: `stride` tokens shared between neighbours."""
        budget = self.options.max_length - n_question - 3  # [CLS] and two [SEP]
        if budget < 1:
            raise DataError(f"task_options.max_length {self.options.max_length} leaves no room for the context "
                            f"after a {n_question}-token question", "raise max_length or lower max_question_length")
        step = budget - min(self.options.stride, budget - 1)
        out, start = [], 0
        while True:
            end = min(start + budget, n_context)
            out.append((start, end))
            if end >= n_context:
                return out
            start += step

    def _item(self, question: list[int], context: list[int], offsets: list[tuple[int, int]], text: str,
              answers: list[tuple[str, int]] | None) -> dict[str, Any]:
        prefix = [self.cls_id, *question, self.sep_id]
        first, last = (None, None) if not answers else _token_span(offsets, *answers[0])
        rows, types, index, starts, ends = [], [], [], [], []
        for start, end in self.windows(len(context), len(question)):
            rows.append([*prefix, *context[start:end], self.sep_id])
            types.append([0] * len(prefix) + [1] * (end - start + 1))
            index.append([-1] * len(prefix) + list(range(start, end)) + [-1])
            inside = first is not None and start <= first and last < end
            starts.append(len(prefix) + first - start if inside else 0)  # 0: [CLS], not in this window
            ends.append(len(prefix) + last - start if inside else 0)
        width = max(map(len, rows))
        item: dict[str, Any] = {
            "input_ids": _pad(rows, width, self.pad_id), "token_type_ids": _pad(types, width, 0),
            "context_index": _pad(index, width, -1), "lengths": torch.tensor([len(r) for r in rows]),
            "context": text, "offsets": offsets,
        }
        if answers is not None:
            item.update(start=torch.tensor(starts), end=torch.tensor(ends), gold=[a for a, _ in answers])
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Every item's windows as rows (R, T), `rows` (R,) the item of each, and per item its context,
        offsets[, gold answers]."""
        from dapeng.tasks.token_classification import _stack

        lengths = torch.cat([it["lengths"] for it in items])
        longest = int(lengths.max())
        batch: dict[str, Any] = {
            "input_ids": _stack([it["input_ids"] for it in items], longest, self.pad_id),
            "token_type_ids": _stack([it["token_type_ids"] for it in items], longest, 0),
            "context_index": _stack([it["context_index"] for it in items], longest, -1),
            "attention_mask": torch.arange(longest)[None, :] < lengths[:, None],
            "rows": torch.cat([torch.full((it["lengths"].numel(),), j) for j, it in enumerate(items)]),
            "context": [it["context"] for it in items],
            "offsets": [it["offsets"] for it in items],
        }
        if all("start" in it for it in items):
            batch["start"] = torch.cat([it["start"] for it in items])
            batch["end"] = torch.cat([it["end"] for it in items])
            batch["gold"] = [it["gold"] for it in items]
        return batch

    # -- the model side -------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """`start_logits` / `end_logits` (R, T), [CLS] and context tokens only, and what `decode` needs."""
        logits = model(**forward_inputs(model, batch, ("input_ids", "attention_mask", "token_type_ids")))
        if logits.dim() != 3 or logits.shape[-1] != 2:
            raise ModelError(f"question-answering needs a start and an end score per token (R, T, 2), the model "
                             f"gives {tuple(logits.shape)}", "set model.kwargs.pooling: none and num_labels: 2")
        pickable = batch["context_index"] >= 0
        pickable[:, 0] = True  # [CLS]: "no answer here"
        logits = logits.float().masked_fill(~pickable[..., None], _NEG)
        outputs: dict[str, Any] = {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}
        for key in ("context_index", "rows", "context", "offsets"):
            outputs[key] = batch[key]
        return outputs

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        return self.forward(model, batch)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Mean cross-entropy of the answer's first and last token (or [CLS]) in each window."""
        outputs = self.forward(model, batch)
        loss = (F.cross_entropy(outputs["start_logits"], batch["start"])
                + F.cross_entropy(outputs["end_logits"], batch["end"])) / 2
        return loss, outputs

    def metric(self) -> QAMetric:
        return QAMetric(self.decode)

    def decode(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """Per question `{"answer", "score", "start", "end"}`: the best span over its windows, with its
        character offsets in the context and the probability its window gives it; for no answer
        (`no_answer` and the null score ahead by more than `null_threshold`) "" and null offsets."""
        start_logits = outputs["start_logits"].detach().float().cpu()  # (R, T)
        end_logits = outputs["end_logits"].detach().float().cpu()
        start_logp, end_logp = start_logits.log_softmax(-1), end_logits.log_softmax(-1)
        span_ok = self._span_mask(outputs["context_index"].cpu())  # (R, T, T)
        scores = (start_logits[:, :, None] + end_logits[:, None, :]).masked_fill(~span_ok, -float("inf"))
        best, flat = scores.flatten(1).max(-1)  # (R,)
        width = scores.shape[-1]
        rows = outputs["rows"].cpu()
        results = []
        for j, (context, offsets) in enumerate(zip(outputs["context"], outputs["offsets"])):
            mine = torch.nonzero(rows == j)[:, 0]
            null = start_logits[mine, 0] + end_logits[mine, 0]
            r = mine[int(best[mine].argmax())]
            n = mine[int(null.argmin())]
            null_p = float((start_logp[n, 0] + end_logp[n, 0]).exp())
            unanswered = self.no_answer and float(null.min() - best[r]) > self.options.null_threshold
            if unanswered or not torch.isfinite(best[r]):
                results.append({"answer": "", "score": null_p, "start": None, "end": None})
                continue
            s, e = divmod(int(flat[r]), width)
            index = outputs["context_index"][r]
            begin, finish = offsets[int(index[s])][0], offsets[int(index[e])][1]
            score = float((start_logp[r, s] + end_logp[r, e]).exp())
            results.append({"answer": context[begin:finish], "score": score, "start": begin, "end": finish})
        return results

    def _span_mask(self, context_index: torch.Tensor) -> torch.Tensor:
        """(R, T, T): start s, end e both context tokens, s <= e < s + max_answer_length."""
        context = context_index >= 0
        t = torch.arange(context_index.shape[1])
        gap = t[None, :] - t[:, None]  # (T, T): e - s
        band = (gap >= 0) & (gap < self.options.max_answer_length)
        return band[None] & context[:, :, None] & context[:, None, :]

    # -- save / load ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        from dapeng.data.tokenizers import tokenizer_json

        return {"labels": None, "no_answer": self.no_answer, "options": self.options.model_dump(mode="json"),
                "tokenizer": tokenizer_json(self.tokenizer)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> QuestionAnswering:
        """Rebuild for inference from `state()` (dapeng.json "preprocess" + tokenizer.json)."""
        from dapeng.data.tokenizers import load_tokenizer

        options = dict(state.get("options") or {})
        options.pop("tokenizer_path", None)
        task = cls(**options)
        if not state.get("tokenizer"):
            raise DataError("question-answering state lacks its tokenizer",
                            "the Artifact's folder must hold the tokenizer.json it was trained with")
        task.no_answer = bool(state.get("no_answer", task.no_answer))
        task.tokenizer = load_tokenizer(state["tokenizer"])
        task._finish_tokenizer()
        return task


def _token_span(offsets: Sequence[tuple[int, int]], text: str, start: int) -> tuple[int | None, int | None]:
    """The first and last context token of the answer `text` at character `start` (None: no token covers it)."""
    end = start + len(text)
    covering = [k for k, (a, b) in enumerate(offsets) if a < end and b > start]
    if not covering:
        return None, None
    return covering[0], covering[-1]


def _pad(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
