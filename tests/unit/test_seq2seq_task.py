"""translation / summarization: teacher forcing, loss masking, label smoothing, metrics, save → load → same outputs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import dapeng
from dapeng.config import load_config
from dapeng.models import MODELS
from dapeng.runner import train
from dapeng.tasks import TASKS
from dapeng.tasks.seq2seq import IGNORE, rouge_scores, sacrebleu_scores, unicode_words

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [("the red house", "la maison rouge"), ("a small cat", "un petit chat"), ("the cat", "le chat"),
         ("a red cat", "un chat rouge"), ("the small house", "la petite maison"), ("a house", "une maison")]
RECORDS = [{"text": s, "target": t} for s, t in PAIRS]
TINY = {"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32, "dropout": 0.0}


def _task(**options):
    task = TASKS.create("translation", vocab_size=80, max_source_length=12, max_target_length=12,
                        max_new_tokens=6, **options)
    task.setup(RECORDS)
    return task


def test_teacher_forcing_shifts_the_target_and_masks_padding():
    task = _task()
    batch = task.collate(task.encode(RECORDS[:3]))
    dec, target, mask = batch["decoder_input_ids"], batch["target_ids"], batch["decoder_attention_mask"]
    assert (dec[:, 0] == task.bos_id).all()
    assert dec.shape == target.shape == mask.shape
    for row, item in enumerate(task.encode(RECORDS[:3])):
        labels = item["labels"].tolist()
        n = len(labels) - 1
        assert dec[row, :n].tolist() == labels[:-1]
        assert target[row, :n].tolist() == labels[1:] and labels[-1] == task.eos_id
        assert (target[row, n:] == IGNORE).all() and not mask[row, n:].any()
    assert (batch["input_ids"][:, 0] != task.pad_id).all() and batch["target_text"] == [t for _, t in PAIRS[:3]]


def test_the_loss_ignores_padded_positions_and_smooths_labels():
    torch.manual_seed(0)
    task = _task(label_smoothing=0.0)
    model = MODELS.create("seq2seq", **{**task.model_kwargs(), **TINY}).train()
    batch = task.collate(task.encode(RECORDS))
    loss, outputs = task.loss(model, batch)
    logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                   batch["decoder_attention_mask"])
    real = batch["target_ids"] != IGNORE
    expected = F.cross_entropy(logits[real], batch["target_ids"][real])
    torch.testing.assert_close(loss, expected)
    assert int(outputs["tokens"]) == int(real.sum())
    task.label_smoothing = 0.1
    smoothed, _ = task.loss(model, batch)
    logp = logits[real].log_softmax(-1)
    nll = -logp.gather(1, batch["target_ids"][real][:, None]).squeeze(1)
    torch.testing.assert_close(smoothed, (0.9 * nll - 0.1 * logp.mean(-1)).mean())


def test_sacrebleu_scores_and_signatures():
    scores, signatures = sacrebleu_scores(["le chat est là"], ["le chat est là"])
    assert scores == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    assert "nrefs:1" in signatures["bleu"] and "tok:13a" in signatures["bleu"]
    assert signatures["chrf"].startswith("nrefs:1") and "nc:6" in signatures["chrf"]
    low, _ = sacrebleu_scores(["un chien"], ["le chat est là"])
    assert low["bleu"] < 10


def test_rouge_keeps_non_ascii_words():
    # rouge-score's own tokenizer drops every non-[a-z0-9] character: 0 for any Cyrillic text
    from rouge_score.rouge_scorer import RougeScorer

    assert RougeScorer(["rouge1"]).score("быстрая собака", "быстрая лиса")["rouge1"].fmeasure == 0.0
    assert unicode_words("Быстрая лиса, café!") == ["быстрая", "лиса", "café"]
    scores = rouge_scores(["быстрая лиса"], ["быстрая собака"])
    assert scores["rouge1"] == pytest.approx(50.0) and scores["rougeL"] == pytest.approx(50.0)
    assert scores["rouge2"] == 0.0
    assert rouge_scores(["a b c"], ["a b c"])["rouge2"] == pytest.approx(100.0)


def _run(tmp_path, precision: str = "fp32", task: str = "translation"):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("en\tfr\n" + "".join(f"{s}\t{t}\n" for s, t in PAIRS * 4))
    config_path = tmp_path / "config.yaml"
    config_path.write_text(json.dumps({
        "task": task,
        "task_options": {"vocab_size": 80, "max_source_length": 12, "max_target_length": 12, "max_new_tokens": 6,
                         "num_beams": 2},
        "data": {"train": str(tsv), "eval": str(tsv), "source_column": "en", "target_column": "fr"},
        "model": {"name": "seq2seq", "kwargs": TINY},
        "train": {"epochs": 2, "batch_size": 8, "precision": precision, "optimizer": {"lr": 3e-3}},
    }))
    out = tmp_path / "run"
    train(load_config(config_path), out, progress=False)
    return out


def test_train_save_load_predict_gives_the_same_texts(tmp_path):
    out = _run(tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())["eval"]
    assert {"bleu", "chrf", "token_nll"} <= set(metrics)
    pipe = dapeng.load(out)
    assert pipe.capabilities.output == "text"
    texts = pipe.predict([s for s, _ in PAIRS])
    assert len(texts) == len(PAIRS) and all(isinstance(t, str) for t in texts)
    again = dapeng.load(out)
    assert again.predict([s for s, _ in PAIRS], batch_size=2) == texts
    assert again.predict(PAIRS[0][0]) == texts[0]
    report = json.loads((out / "eval_translations.json").read_text())
    assert "nrefs:1" in report["signatures"]["bleu"] and len(report["outputs"]) == len(PAIRS) * 4


def test_bf16_train_and_predict(tmp_path):
    out = _run(tmp_path, precision="bf16", task="summarization")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["precision"] == "bf16" and "rougeL" in metrics["eval"]
    texts = dapeng.load(out).predict(["the red house", "a cat"])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
