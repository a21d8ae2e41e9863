"""Topic models: NPMI coherence and diversity against hand computations, ProdLDA learning two clear
topics, the saved model's topic mixes, `dapeng topics`, bf16, and SOTU's passages."""

import json
import math

import numpy as np
import pytest
import torch
import yaml

from dapeng.cli.main import main
from dapeng.errors import DataError
from dapeng.explain.topics import prevalence
from dapeng.hub.artifact import attach_encoder, save_artifact
from dapeng.models import MODELS
from dapeng.pipeline import load
from dapeng.tasks import TASKS
from dapeng.tasks.topic_model import npmi_coherence, top_words, topic_diversity
from dapeng.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

FRUIT = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum"]
TRAFFIC = ["car", "bus", "train", "truck", "plane", "boat", "bike", "tram", "ship", "taxi"]
OPTIONS = {"min_df": 1, "max_df": 1.0, "stop_words": None, "max_features": None}
TINY = {"num_topics": 2, "hidden": 16, "layers": 1, "dropout": 0.0}


def _corpus(n: int = 160, seed: int = 0) -> list[dict]:
    """Documents of 20 words, each drawn from one of two disjoint word groups."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        group = FRUIT if i % 2 else TRAFFIC
        docs.append({"text": " ".join(rng.choice(group, 20)), "group": "fruit" if i % 2 else "traffic"})
    return docs


def _task_and_model(docs, **kwargs):
    torch.manual_seed(0)
    task = TASKS.create("topic-model", **OPTIONS)
    task.setup(docs)
    model = MODELS.create("prodlda", **{**task.model_kwargs(), **TINY, **kwargs})
    return task, model


# ------------------------------------------------------------------ coherence and diversity


def test_npmi_equals_a_hand_computation():
    # documents × words (a, b, c): d1 = {a, b}, d2 = {a, b, c}, d3 = {a}, d4 = {c}
    presence = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 1]])
    ab = math.log((2 / 4) / ((3 / 4) * (2 / 4))) / -math.log(2 / 4)
    ac = math.log((1 / 4) / ((3 / 4) * (2 / 4))) / -math.log(1 / 4)
    bc = math.log((1 / 4) / ((2 / 4) * (2 / 4))) / -math.log(1 / 4)  # independent: 0
    got = npmi_coherence([[0, 1], [0, 1, 2]], presence)
    assert got == pytest.approx([ab, (ab + ac + bc) / 3])
    assert ab == pytest.approx(math.log(4 / 3) / math.log(2))


def test_npmi_of_words_that_never_meet_is_minus_one_not_nan():
    # words 0 and 1 never share a document; word 3 is in no reference document at all
    presence = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 1, 0]])
    disjoint, absent, everywhere = npmi_coherence([[0, 1], [0, 3], [2, 2]], presence)
    assert disjoint == -1.0 and absent == -1.0
    assert everywhere == 1.0  # a pair in every document: the 0/0 limit is perfect association
    assert not any(np.isnan(npmi_coherence([[0, 1, 2, 3]], presence)))


def test_npmi_refuses_an_empty_reference():
    with pytest.raises(DataError, match="reference documents"):
        npmi_coherence([[0, 1]], np.zeros((0, 3)))


def test_topic_diversity_counts_unique_top_words():
    assert topic_diversity([[0, 1, 2], [2, 3, 4]]) == pytest.approx(5 / 6)
    assert topic_diversity([[0, 1], [0, 1]]) == 0.5
    weights = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]])
    assert top_words(weights, 2) == [[1, 2], [0, 1]]


# ------------------------------------------------------------------ the task and the model


def test_vocabulary_is_learned_on_train_with_document_frequency_limits():
    docs = [{"text": "the senate and the house"}, {"text": "the senate votes"}, {"text": "the house votes 42"}]
    task = TASKS.create("topic-model", min_df=2, max_df=0.9, stop_words=["and"], max_features=None)
    task.setup(docs)
    # "the" is in every document (> max_df), "and" a stop word, "42" no word, the rest in fewer than 2
    assert task.vocabulary == ["house", "senate", "votes"]
    with pytest.raises(DataError, match="no vocabulary"):
        TASKS.create("topic-model", min_df=5).setup(docs)


def test_kl_annealing_weight_rises_with_the_saved_batch_count():
    docs = _corpus(8)
    task = TASKS.create("topic-model", **OPTIONS, kl_warmup_steps=4)
    task.setup(docs)
    model = MODELS.create("prodlda", **{**task.model_kwargs(), **TINY})
    assert [task.kl_weight(b) for b in (0, 2, 4, 10)] == [0.0, 0.5, 1.0, 1.0]
    batch = task.collate(task.encode(docs))
    model.train()
    for _ in range(3):
        task.loss(model, batch)
    assert int(model.state_dict()["train_batches"]) == 3  # in the weights: a resumed run anneals on
    model.eval()
    task.loss(model, batch)
    assert int(model.train_batches) == 3


def test_prodlda_elbo_decreases_and_recovers_two_clear_topics():
    docs = _corpus()
    task, model = _task_and_model(docs, dropout=0.2)  # θ dropout keeps both topics alive (the paper's)
    items = task.encode(docs)
    trainer = Trainer(model, task, epochs=30, batch_size=32, optimizer="adam", lr=0.005, precision="fp32",
                      device="cpu", log_every=1000)
    before = trainer.evaluate(items)["eval/loss"]
    trainer.fit(items)
    after = trainer.evaluate(items)
    # 20 words from 10 of 20: 46.1 nats at best, 59.9 for uniform words; the decoder's affine-free
    # batchnorm bounds how peaked a topic gets, so the ELBO stops short of the ideal
    assert after["eval/loss"] < before - 5, (before, after)
    groups = [{task.vocabulary[w] for w in words} for words in top_words(model.topic_words(), 5)]
    fruit_topic = 0 if groups[0] <= set(FRUIT) else 1
    assert groups[fruit_topic] <= set(FRUIT) and groups[1 - fruit_topic] <= set(TRAFFIC), groups
    assert after["eval/npmi"] > 0.3
    mixes = task.embed(model, [d["text"] for d in docs])  # (n, 2)
    is_fruit = np.array([d["group"] == "fruit" for d in docs])
    assert ((mixes[:, fruit_topic] > 0.5) == is_fruit).mean() >= 0.95


def test_save_load_gives_the_same_topic_mix(tmp_path):
    docs = _corpus(40)
    task, model = _task_and_model(docs)
    trainer = Trainer(model, task, epochs=2, batch_size=8, precision="fp32", device="cpu", log_every=1000)
    trainer.fit(task.encode(docs))
    texts = [d["text"] for d in docs[:5]] + ["apple car unknownword"]
    expected = task.embed(model, texts)
    path = save_artifact(tmp_path / "model", model=model, model_name="prodlda",
                         model_kwargs={**task.model_kwargs(), **TINY}, task_name="topic-model",
                         task_state=task.state(), precision="fp32")
    pipe = load(path)
    got = np.array(pipe.predict(texts))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    assert pipe.task.vocabulary == task.vocabulary

    years, share = prevalence(pipe, [{**d, "year": 1990 + i % 3} for i, d in enumerate(docs)])
    assert years == [1990, 1991, 1992] and share.shape == (3, 2)
    np.testing.assert_allclose(share[1], np.array(pipe.predict([d["text"] for d in docs[1::3]])).mean(axis=0),
                               rtol=1e-5)


def test_bf16_training_and_prediction_stay_finite():
    docs = _corpus(16)
    task, model = _task_and_model(docs)
    trainer = Trainer(model, task, epochs=1, batch_size=8, precision="bf16", device="cpu", log_every=1000)
    summary = trainer.fit(task.encode(docs))
    assert math.isfinite(summary["loss"])
    from dapeng.pipeline import Pipeline

    pipe = Pipeline(model, task, precision="bf16", device="cpu")
    mixes = np.array(pipe.predict([d["text"] for d in docs[:4]]))
    assert np.isfinite(mixes).all() and np.allclose(mixes.sum(axis=1), 1.0, atol=1e-3)


# ------------------------------------------------------------------ the command line


def test_cli_topics_prints_words_mixes_and_draws(tmp_path, capsys):
    (tmp_path / "docs.txt").write_text("".join(d["text"] + "\n" for d in _corpus(48)))  # one document a line
    config = tmp_path / "topics.yaml"
    config.write_text(yaml.safe_dump({
        "task": "topic-model", "task_options": OPTIONS,
        "data": {"train": str(tmp_path / "docs.txt"), "format": "text"},
        "model": {"name": "prodlda", "kwargs": TINY},
        "train": {"epochs": 3, "batch_size": 8, "precision": "fp32", "optimizer": {"name": "adam", "lr": 0.02}},
    }))
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    capsys.readouterr()

    assert main(["topics", str(run), "--top", "4", "--json", "--doc", "apple pear plum", "--plot",
                 str(tmp_path / "t.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [t["topic"] for t in out["topics"]] == [0, 1] and all(len(t["words"]) == 4 for t in out["topics"])
    [doc] = out["documents"]
    assert doc["text"] == "apple pear plum" and sum(doc["mix"]) == pytest.approx(1.0, abs=1e-3)
    assert (tmp_path / "t.png").stat().st_size > 0 and out["plot"] == str(tmp_path / "t.png")

    assert main(["topics", str(run), "--doc", "bus taxi"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("topic   0  ") and "'bus taxi'" in text


def test_cli_topics_refuses_a_model_without_topics(tmp_path, capsys):
    from dapeng.tasks.text_classification import TextClassificationTask

    task = TextClassificationTask(tokenizer="word")
    task.setup([{"text": "a good film", "label": "pos"}, {"text": "a bad film", "label": "neg"}])
    model = MODELS.create("textcnn", **task.model_kwargs(), embed_dim=4, filters=2)
    save_artifact(tmp_path / "m", model=model, model_name="textcnn", model_kwargs={**task.model_kwargs(),
                  "embed_dim": 4, "filters": 2}, task_name="text-classification", task_state=task.state())
    assert main(["topics", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no topics" in err and "\n" not in err


# ------------------------------------------------------------------ SOTU passages


def test_sotu_passages_are_whole_sentences_of_about_a_paragraph():
    from dapeng.data.datasets import passages

    sentence = "The union is strong and the budget is balanced today."  # 10 words
    text = " ".join([sentence] * 33)  # 330 words
    parts = passages(text, words=100)
    assert [len(p.split()) for p in parts] == [100, 100, 130]  # the 30-word tail joins the last passage
    assert all(p.endswith(".") for p in parts) and " ".join(parts) == text
    assert passages("Short. Address.", words=100) == ["Short. Address."]


def _tiny_sentence_encoder(path, words):
    """A sentence-embedding Artifact small enough for a unit test (what `context_model` points at)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    task = TASKS.create("sentence-embedding", tokenizer=tok.to_str(), max_length=32)
    kwargs = {**task.model_kwargs(), "hidden": 8, "layers": 1, "heads": 2, "intermediate": 16, "max_positions": 32,
              "pooling": "mean", "num_labels": 2}
    torch.manual_seed(0)
    model = MODELS.create("transformer", **kwargs)
    return save_artifact(path, model=model, model_name="transformer", model_kwargs=kwargs,
                         task_name="sentence-embedding", task_state=task.state(), precision="fp32")


def test_contextual_topic_model_reads_sentence_embeddings(tmp_path):
    encoder = _tiny_sentence_encoder(tmp_path / "encoder", FRUIT + TRAFFIC)
    docs = _corpus(24)
    task = TASKS.create("topic-model", **OPTIONS, contextual=True, context_model=str(encoder))
    with pytest.raises(DataError, match="no sentence encoder"):
        task.setup(docs)
    attach_encoder(task)  # what the runner's build_task and the Artifact loader do
    task.setup(docs)
    assert task.model_kwargs()["context_dim"] == 8
    torch.manual_seed(0)
    model = MODELS.create("prodlda", **{**task.model_kwargs(), **TINY})
    items = task.encode(docs)
    batch = task.collate(items[:6])
    assert batch["context"].shape == (6, 8)
    np.testing.assert_allclose(batch["context"].numpy(), load(encoder).embed([d["text"] for d in docs[:6]]), rtol=1e-5)
    Trainer(model, task, epochs=1, batch_size=8, precision="fp32", device="cpu", log_every=1000).fit(items)
    model.eval()
    with torch.no_grad():  # the context reaches the encoder: without it the mix changes
        with_context = model.forward_features(batch["bow"], batch["context"])
        zeroed = model.forward_features(batch["bow"], torch.zeros_like(batch["context"]))
    assert not torch.allclose(with_context, zeroed)
    path = save_artifact(tmp_path / "model", model=model, model_name="prodlda",
                         model_kwargs={**task.model_kwargs(), **TINY}, task_name="topic-model",
                         task_state=task.state(), precision="fp32")
    np.testing.assert_allclose(np.array(load(path).predict([d["text"] for d in docs[:3]])),
                               with_context[:3].numpy(), rtol=1e-5, atol=1e-6)
