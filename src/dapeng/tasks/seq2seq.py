"""Tasks `translation` and `summarization`: a source text in, a target text out, with an encoder-decoder.

Training: records `{"text": source, "target": target}` are tokenized with one BPE vocabulary
shared by both sides, learned on the training split (`train_subword_tokenizer`: cased and
reversible, so outputs detokenize exactly). The decoder reads the target shifted right behind a
begin id (teacher forcing); the loss is label-smoothed cross-entropy over the target tokens only,
padding ignored.

Inference: the model's own `generate` (greedy, or beam search with a length penalty) turns a
batch of sources into ids; `decode` turns them into text. Evaluation decodes the eval/test
sources the same way and scores them against the reference texts: sacreBLEU's BLEU and chrF for
translation, ROUGE-1/2/L (`rouge-score`) for summarization. `dapeng predict RUN "text"` answers
the translation or the summary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dapeng.data.tokenizers import CLS, PAD, SEP, UNK, load_tokenizer, pad_batch, special_id
from dapeng.errors import DataError
from dapeng.tasks.base import Capabilities

__all__ = ["Rouge", "SacreBleu", "Seq2SeqTask", "Summarization", "Translation", "unicode_words"]

IGNORE = -100  # target positions that carry no loss (padding)
_WORDS = re.compile(r"\w+")


def unicode_words(text: str) -> list[str]:
    """Lower-cased words of any script, for ROUGE.

    rouge-score's default tokenizer keeps only [a-z0-9]: every word of a text in Greek, Russian
    or Chinese vanishes and the score is 0 whatever the output (huggingface/evaluate#256).
    """
    return _WORDS.findall(text.lower())


class _UnicodeTokenizer:
    """The `tokenize(text)` object `rouge_score.RougeScorer` takes."""

    def tokenize(self, text: str) -> list[str]:
        return unicode_words(text)


class _Texts:
    """Accumulates (hypothesis, reference) text pairs from evaluation batches."""

    def __init__(self, task: Seq2SeqTask) -> None:
        self.task = task
        self.hypotheses: list[str] = []
        self.references: list[str] = []
        self.nll = 0.0
        self.tokens = 0

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        self.nll += float(outputs["nll_sum"])
        self.tokens += int(outputs["tokens"])
        if "generated" in outputs:
            self.hypotheses += self.task.decode(outputs)
            self.references += list(batch["target_text"])

    def token_nll(self) -> dict[str, float]:
        return {"token_nll": self.nll / max(self.tokens, 1)}


class SacreBleu(_Texts):
    """Corpus BLEU and chrF from sacreBLEU (defaults: 13a tokenization, chrF n=6 β=2); `signatures` names them."""

    def compute(self) -> dict[str, float]:
        out = self.token_nll()
        if self.hypotheses:
            scores, self.signatures = sacrebleu_scores(self.hypotheses, self.references)
            out.update(scores)
        return out

    def write_report(self, folder: str | Path, prefix: str = "") -> None:
        """`{prefix}translations.json`: the scores, sacreBLEU's signatures and every output beside its reference."""
        if not self.hypotheses:
            return
        scores, signatures = sacrebleu_scores(self.hypotheses, self.references)
        pairs = [{"output": h, "reference": r} for h, r in zip(self.hypotheses, self.references)]
        _write_json(Path(folder) / f"{prefix}translations.json",
                    {"scores": scores, "signatures": signatures, "outputs": pairs})


def sacrebleu_scores(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    """{"bleu", "chrf"} over a corpus (one reference each) and their sacreBLEU signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    refs = [list(references)]
    b, c = bleu.corpus_score(list(hypotheses), refs), chrf.corpus_score(list(hypotheses), refs)
    return {"bleu": b.score, "chrf": c.score}, {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}


def rouge_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (×100) with Unicode-aware words (`unicode_words`)."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_UnicodeTokenizer())
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hypotheses, references):
        for name, score in scorer.score(ref, hyp).items():
            totals[name] += score.fmeasure
    n = max(len(hypotheses), 1)
    return {name: 100.0 * total / n for name, total in totals.items()}


class Rouge(_Texts):
    """Mean ROUGE-1/2/L F1 over the pairs."""

    def compute(self) -> dict[str, float]:
        out = self.token_nll()
        if self.hypotheses:
            out.update(rouge_scores(self.hypotheses, self.references))
        return out


def _write_json(path: Path, obj: Any) -> None:
    from dapeng._files import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(obj, ensure_ascii=False, indent=1).encode()))


class Seq2SeqTask:
    """Source text → target text with an encoder-decoder (`model.name: seq2seq`).

    Args:
        tokenizer: a `tokenizers` JSON string (None: learn a shared BPE in `setup`).
        vocab_size: vocabulary size when learning it.
        max_source_length: source tokens kept (with the end id), longer sources are cut.
        max_target_length: target tokens kept in training (with the begin and end ids).
        label_smoothing: mass spread over the vocabulary in the loss (Vaswani et al.: 0.1).
        num_beams: beam width at inference (1: greedy).
        length_penalty: beam scores are divided by length ** length_penalty.
        max_new_tokens: longest output (default: `max_target_length`).
        eval_generate: decode the eval/test sources during evaluation to score them (off: loss only).
    """

    name = "seq2seq"
    capabilities = Capabilities(input="text", output="text", verbs=frozenset({"predict"}), batching=True,
                                output_schema={"type": "string"})
    metric_class: type[_Texts] = SacreBleu

    def __init__(
        self,
        tokenizer: str | None = None,
        vocab_size: int = 16000,
        max_source_length: int = 128,
        max_target_length: int = 128,
        label_smoothing: float = 0.1,
        num_beams: int = 4,
        length_penalty: float = 1.0,
        max_new_tokens: int | None = None,
        eval_generate: bool = True,
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise DataError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if num_beams < 1 or max_source_length < 2 or max_target_length < 3:
            raise DataError(f"{self.name}: num_beams ≥ 1, max_source_length ≥ 2 and max_target_length ≥ 3, got "
                            f"{num_beams}, {max_source_length}, {max_target_length}")
        self.tokenizer_json = tokenizer
        self.vocab_size = vocab_size
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.label_smoothing = label_smoothing
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.max_new_tokens = max_new_tokens or max_target_length
        self.eval_generate = eval_generate
        self._tokenizer: Any = None

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Seq2SeqTask:
        known = ("tokenizer", "vocab_size", "max_source_length", "max_target_length", "label_smoothing",
                 "num_beams", "length_penalty", "max_new_tokens", "eval_generate")
        return cls(**{k: state[k] for k in known if k in state})

    def state(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer_json, "vocab_size": self.vocab_size,
                "max_source_length": self.max_source_length, "max_target_length": self.max_target_length,
                "label_smoothing": self.label_smoothing, "num_beams": self.num_beams,
                "length_penalty": self.length_penalty, "max_new_tokens": self.max_new_tokens,
                "eval_generate": self.eval_generate}

    # -- vocabulary -----------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.tokenizer_json is None:
                raise DataError(f"{self.name} has no tokenizer yet", "call setup(train) first")
            self._tokenizer = load_tokenizer(self.tokenizer_json)
            self.pad_id = special_id(self._tokenizer, PAD)
            self.bos_id = special_id(self._tokenizer, CLS)
            self.eos_id = special_id(self._tokenizer, SEP)
        return self._tokenizer

    def setup(self, train: Sequence[dict[str, Any]]) -> None:
        """Learn one BPE over both sides of the training pairs, unless a tokenizer was given."""
        if self.tokenizer_json is None:
            from dapeng.data.tokenizers import train_subword_tokenizer

            for i, record in enumerate(train):
                self._pair(record, i, need_target=True)
            texts = (text for r in train for text in (r["text"], r["target"]))
            self.tokenizer_json = train_subword_tokenizer(texts, self.vocab_size).to_str()
            self._tokenizer = None
        self.tokenizer  # noqa: B018 - parse now, so a bad tokenizer fails before training

    def model_kwargs(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {"vocab_size": tok.get_vocab_size(), "pad_id": self.pad_id, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "max_positions": max(self.max_source_length, self.max_new_tokens + 1,
                                                            self.max_target_length)}

    # -- records → items → batches ----------------------------------------------------------

    def _pair(self, record: dict[str, Any], i: int, need_target: bool) -> tuple[str, str | None]:
        where = record.get("_source", f"record {i}")
        source, target = record.get("text"), record.get("target")
        if not isinstance(source, str):
            raise DataError(f"{where}: no source 'text'", "set data.source_column (or data.text_column)")
        if need_target and not isinstance(target, str):
            raise DataError(f"{where}: no 'target' text", "set data.target_column")
        return source, target if isinstance(target, str) else None

    def encode(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Items `{"input_ids": source + end}` and, with a target, `{"labels": begin + target + end, "target_text"}`."""
        tok = self.tokenizer
        pairs = [self._pair(r, i, need_target=False) for i, r in enumerate(records)]
        sources = tok.encode_batch([s for s, _ in pairs], add_special_tokens=False)
        unk = special_id(tok, UNK)
        items: list[dict[str, Any]] = []
        for (_, target), enc in zip(pairs, sources):
            ids = (enc.ids or [unk])[: self.max_source_length - 1] + [self.eos_id]
            item: dict[str, Any] = {"input_ids": torch.tensor(ids)}
            if target is not None:
                tgt = tok.encode(target, add_special_tokens=False).ids[: self.max_target_length - 2]
                item["labels"] = torch.tensor([self.bos_id, *tgt, self.eos_id])
                item["target_text"] = target
            items.append(item)
        return items

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = pad_batch([it["input_ids"] for it in items], self.pad_id)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if all("labels" in it for it in items):
            full, mask = pad_batch([it["labels"] for it in items], self.pad_id)
            # the decoder reads begin + target and learns to say target + end
            batch["decoder_input_ids"] = full[:, :-1]
            batch["decoder_attention_mask"] = mask[:, :-1]
            batch["target_ids"] = full[:, 1:].masked_fill(~mask[:, 1:], IGNORE)
            batch["target_text"] = [it["target_text"] for it in items]
        return batch

    # -- training and inference -------------------------------------------------------------

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Label-smoothed cross-entropy over the target tokens; in eval mode also the decoded outputs."""
        logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                       batch["decoder_attention_mask"])  # (B, T, V)
        flat, target = logits.float().flatten(0, 1), batch["target_ids"].flatten()
        loss = F.cross_entropy(flat, target, ignore_index=IGNORE, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            nll = F.cross_entropy(flat, target, ignore_index=IGNORE, reduction="sum")
        outputs = {"nll_sum": nll, "tokens": (target != IGNORE).sum()}
        if not model.training and self.eval_generate:
            outputs.update(self.forward(model, batch))
        return loss, outputs

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Decode the batch's sources with the model's `generate` and the task's decoding options."""
        generated = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=self.max_new_tokens,
                                   num_beams=self.num_beams, length_penalty=self.length_penalty)
        return {"generated": generated}

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.forward(model, batch)

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[str]:
        """Text of each generated row: after the begin id, up to the end id, special tokens dropped."""
        tok = self.tokenizer
        texts = []
        for row in outputs["generated"].tolist():
            ids = row[1:] if row and row[0] == self.bos_id else row
            if self.eos_id in ids:
                ids = ids[: ids.index(self.eos_id)]
            texts.append(tok.decode([i for i in ids if i != self.pad_id], skip_special_tokens=True))
        return texts

    def metric(self) -> _Texts:
        return self.metric_class(self)


class Translation(Seq2SeqTask):
    """Translate a text (BLEU, chrF)."""

    name = "translation"
    metric_class = SacreBleu


class Summarization(Seq2SeqTask):
    """Summarize a text (ROUGE-1/2/L)."""

    name = "summarization"
    metric_class = Rouge
