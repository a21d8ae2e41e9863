"""token-classification: alignment, schemes, metrics against conlleval, the model path, Pipeline."""

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from seqeval.metrics import f1_score
from seqeval.scheme import IOB2
from torch import nn

from dapeng.errors import ConfigError, DataError, ModelError
from dapeng.models import MODELS, create_model
from dapeng.pipeline import Pipeline
from dapeng.tasks import TASKS
from dapeng.tasks.base import Task
from dapeng.tasks.token_classification import (
    IGNORE,
    TaggingMetric,
    TokenClassificationTask,
    convert,
    detect_scheme,
    spans,
)

torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a busy 2-core box

FIXTURES = Path(__file__).parent.parent / "fixtures" / "conlleval"
TRAIN = [
    {"tokens": ["John", "Smith", "lives", "in", "New", "York", "."],
     "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"]},
    {"tokens": ["Mary", "visited", "Paris", "with", "Acme", "Corp"],
     "tags": ["B-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG"]},
    {"tokens": ["Bob", "likes", "Paris"], "tags": ["B-PER", "O", "B-LOC"]},
]
POS = [
    {"tokens": ["the", "dog", "runs"], "tags": ["AT", "NN", "VBZ"]},
    {"tokens": ["a", "cat", "sleeps", "."], "tags": ["AT", "NN", "VBZ", "."]},
]
# A BERT-style WordPiece tokenizer (what `model.init: minilm-l6` hands over): its normaliser drops
# control and zero-width characters, so such a word yields no sub-word at all.
PIECES = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "john", "##son", "live", "##s", "in", "pa", "##ris",
          "new", "york", "."]
SENTENCE = ["Johnson", "lives", "in", "New", "York", "\x00", "Paris"]
SENTENCE_TAGS = ["B-PER", "O", "O", "B-LOC", "I-LOC", "O", "B-LOC"]


def bert_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(PIECES)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok.to_str()


def subword_task(**options) -> TokenClassificationTask:
    task = TokenClassificationTask(tokenizer="wordpiece", vocab_size=60, **options)
    task.setup(TRAIN + [{"tokens": SENTENCE, "tags": SENTENCE_TAGS}])
    task.use_tokenizer(bert_tokenizer_json())
    return task


def tiny_transformer(task: TokenClassificationTask) -> nn.Module:
    kwargs = {k: v for k, v in task.model_kwargs().items() if k != "char_vocab_size"}
    return create_model("transformer", {**kwargs, "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32,
                                        "pooling": "none", "dropout": 0.0})


def names(task: TokenClassificationTask, ids) -> list:
    return [None if i == IGNORE else task.labels[i] for i in ids]


class ToyCRF(nn.Module):
    """A linear-chain CRF with the interface the task relies on (nll, decode, constrain_bio)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.transitions = nn.Parameter(torch.zeros(k, k))
        self.register_buffer("allowed", torch.ones(k, k, dtype=torch.bool))
        self.register_buffer("start", torch.ones(k, dtype=torch.bool))

    def constrain_bio(self, labels, scheme):
        for j, b in enumerate(labels):
            if b.startswith("I-"):
                self.start[j] = False
                for i, a in enumerate(labels):
                    self.allowed[i, j] = a[:1] in ("B", "I") and a[2:] == b[2:]

    def _trans(self):
        return self.transitions.masked_fill(~self.allowed, -1e4)

    def nll(self, emissions, tags, mask):
        emissions = emissions + torch.where(self.start, 0.0, -1e4)[None, None, :] * (
            torch.arange(emissions.shape[1]) == 0)[None, :, None]
        trans = self._trans()
        alpha = emissions[:, 0]
        gold = emissions[:, 0].gather(1, tags[:, :1])[:, 0]
        for t in range(1, emissions.shape[1]):
            step = torch.logsumexp(alpha[:, :, None] + trans[None] + emissions[:, t, None, :], 1)
            alpha = torch.where(mask[:, t, None], step, alpha)
            score = trans[tags[:, t - 1], tags[:, t]] + emissions[:, t].gather(1, tags[:, t : t + 1])[:, 0]
            gold = gold + torch.where(mask[:, t], score, 0.0)
        return (torch.logsumexp(alpha, 1) - gold).mean()

    def decode(self, emissions, mask):
        trans, paths = self._trans(), []
        for em, m in zip(emissions, mask):
            em = em[: int(m.sum())]
            score, back = em[0] + torch.where(self.start, 0.0, -1e4), []
            for t in range(1, len(em)):
                total = score[:, None] + trans
                back.append(total.argmax(0))
                score = total.max(0).values + em[t]
            path = [int(score.argmax())]
            for pointers in reversed(back):
                path.append(int(pointers[path[-1]]))
            paths.append(path[::-1])
        return paths


class CRFTagger(nn.Module):
    def __init__(self, vocab_size, num_labels, pad_id=0, char_vocab_size=0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, 8, padding_idx=pad_id)
        self.chars = nn.Embedding(max(char_vocab_size, 1), 8, padding_idx=0)
        self.head = nn.Linear(16, num_labels)
        self.crf = ToyCRF(num_labels)
        self.seen_chars = None

    def forward(self, input_ids, attention_mask, char_ids=None):
        self.seen_chars = char_ids
        chars = self.chars(char_ids).mean(2) if char_ids is not None else torch.zeros(*input_ids.shape, 8)
        return self.head(torch.cat([self.embedding(input_ids), chars], -1))


# ---------------------------------------------------------------- schemes


def test_registered_with_its_capabilities():
    task = TASKS.create("token-classification")
    assert isinstance(task, Task)
    caps = task.capabilities
    assert (caps.input, caps.output, set(caps.explain)) == ("tokens", "tags", {"ig", "saliency"})
    assert caps.verbs == {"predict", "explain"} and "entities" in caps.output_schema["properties"]


def test_schemes_are_detected_from_the_tags():
    assert detect_scheme(["O", "B-PER", "I-PER"]) == "BIO"
    assert detect_scheme(["O", "I-PER"]) == "BIO"  # IOB1 data: read as BIO, chunks by conlleval's rules
    assert detect_scheme(["O", "S-PER", "B-LOC", "E-LOC"]) == "BIOES"
    assert detect_scheme(["AT", "NN", "NN-TL", "BEZ", "."]) == "none"
    assert subword_task().scheme == "BIO"
    pos = TokenClassificationTask(tokenizer="word")
    pos.setup(POS)
    assert pos.scheme == "none" and pos.labels == [".", "AT", "NN", "VBZ"]
    with pytest.raises(DataError, match="scheme BIO but the training tags"):
        TokenClassificationTask(tokenizer="word", scheme="BIO").setup(POS)


def test_bio_and_bioes_convert_both_ways():
    bio = ["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG", "I-ORG", "B-ORG"]
    bioes = ["B-PER", "E-PER", "O", "S-LOC", "O", "B-ORG", "I-ORG", "E-ORG", "S-ORG"]
    assert convert(bio, "BIOES") == bioes and convert(bioes, "BIO") == bio
    assert spans(bio) == spans(bioes) == [("PER", 0, 2), ("LOC", 3, 4), ("ORG", 5, 8), ("ORG", 8, 9)]
    assert convert(["NN", "VB"], "none") == ["NN", "VB"]
    task = TokenClassificationTask(tokenizer="word", scheme="BIOES")
    task.setup(TRAIN)
    assert task.labels[:5] == ["O", "B-LOC", "I-LOC", "E-LOC", "S-LOC"]
    item = task.encode(TRAIN[:1])[0]
    assert names(task, item["word_tags"].tolist()) == ["B-PER", "E-PER", "O", "O", "B-LOC", "E-LOC", "O"]


def test_span_repair_follows_conlleval():
    # I- after O, and I- after a chunk of another type, start a new chunk
    assert convert(["O", "I-PER", "I-PER", "B-LOC", "I-ORG", "O", "I-LOC"], "BIO") == [
        "O", "B-PER", "I-PER", "B-LOC", "B-ORG", "O", "B-LOC"]
    assert convert(["I-PER", "E-PER", "I-LOC", "S-LOC", "E-LOC"], "BIOES") == [
        "B-PER", "E-PER", "S-LOC", "S-LOC", "S-LOC"]
    task = TokenClassificationTask(tokenizer="word", vocab_size=100)
    task.setup(TRAIN)
    k = len(task.labels)
    logits = torch.full((1, 3, k), -5.0)
    for t, tag in enumerate(["O", "I-PER", "I-LOC"]):  # what an argmax without a CRF may give
        logits[0, t, task.index[tag]] = 5.0
    outputs = {"logits": logits, "word_ids": torch.tensor([[0, 1, 2]]), "rows": torch.tensor([0]),
               "words": [["a", "Bob", "Rome"]], "offsets": [[(0, 1), (2, 5), (6, 10)]], "sentence": ["a Bob Rome"]}
    [out] = task.decode(outputs)
    assert out["tags"] == ["O", "B-PER", "B-LOC"]
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in out["entities"]] == [
        ("PER", "Bob", 2, 5), ("LOC", "Rome", 6, 10)]


# ---------------------------------------------------------------- metrics


def read_conlleval(path: Path) -> list[tuple[list[str], list[str]]]:
    sentences, gold, guess = [], [], []
    for line in [*path.read_text().splitlines(), ""]:
        if not line.strip():
            if gold:
                sentences.append((gold, guess))
            gold, guess = [], []
            continue
        _, g, p = line.split()
        gold.append(g)
        guess.append(p)
    return sentences


def test_entity_scores_are_conllevals_on_the_fixture():
    sentences = read_conlleval(FIXTURES / "ner.txt")
    expected = (FIXTURES / "ner.expected").read_text().splitlines()
    metric = TaggingMetric(["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"], "BIO")
    for gold, guess in sentences:
        metric.add(gold, guess)
    scores = metric.compute()
    overall = [float(x) for x in re.findall(r"(\d+\.\d+)", expected[1])]
    got = [100 * scores[k] for k in ("accuracy", "entity_precision", "entity_recall", "entity_f1")]
    assert [round(x, 2) for x in got] == overall
    entities = metric.report()["entities"]
    for line in expected[2:]:
        kind, rest = line.split(":", 1)
        p, r, f = (float(x) for x in re.findall(r"(\d+\.\d+)", rest))
        row = entities[kind.strip()]
        assert [round(100 * row[k], 2) for k in ("precision", "recall", "f1")] == [p, r, f], kind
    # seqeval strict on the unrepaired guesses would drop the I- chunks conlleval counts
    raw = f1_score([g for g, _ in sentences], [p for _, p in sentences], mode="strict", scheme=IOB2)
    assert round(100 * raw, 2) != overall[3]


def test_pos_accuracy_per_tag_report_and_universal_mapping(monkeypatch, tmp_path):
    fake = types.ModuleType("dapeng.data.tagsets")
    fake.to_universal = lambda tag: {"NN": "NOUN", "NNS": "NOUN", "VB": "VERB"}.get(tag, "X")
    monkeypatch.setitem(sys.modules, "dapeng.data.tagsets", fake)
    task = TokenClassificationTask(tokenizer="word", tag_map="universal")
    task.setup([{"tokens": ["dogs", "run", "fast"], "tags": ["NNS", "VB", "RB"]},
                {"tokens": ["dog"], "tags": ["NN"]}])
    metric = task.metric()
    metric.add(["NN", "VB", "RB", "NNS"], ["NNS", "VB", "RB", "NNS"])
    scores = metric.compute()
    assert scores == {"accuracy": 0.75, "universal_accuracy": 1.0}
    report = metric.report()["tags"]
    assert report["NN"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["NNS"]["precision"] == 0.5 and report["NNS"]["recall"] == 1.0
    [path] = metric.write_report(tmp_path, prefix="eval_")
    assert json.loads(path.read_text())["metrics"]["accuracy"] == 0.75


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize("policy, expected", [
    ("first", [None, "B-PER", None, "O", None, "O", "B-LOC", "I-LOC", "O", "B-LOC", None, None]),
    ("all", [None, "B-PER", "I-PER", "O", "O", "O", "B-LOC", "I-LOC", "O", "B-LOC", "I-LOC", None]),
    ("last", [None, None, "B-PER", None, "O", "O", "B-LOC", "I-LOC", "O", None, "B-LOC", None]),
])
def test_word_tags_align_to_subwords(policy, expected):
    task = subword_task(subword_labels=policy)
    [item] = task.encode([{"tokens": SENTENCE, "tags": SENTENCE_TAGS}])
    ids = item["input_ids"][0].tolist()
    assert [PIECES[i] for i in ids] == ["[CLS]", "john", "##son", "live", "##s", "in", "new", "york", "[UNK]",
                                        "pa", "##ris", "[SEP]"]
    assert item["word_ids"][0].tolist() == [-1, 0, 0, 1, 1, 2, 3, 4, 5, 6, 6, -1]
    assert names(task, item["labels"][0].tolist()) == expected


def test_all_subwords_in_bioes_stretch_each_chunk():
    task = subword_task(subword_labels="all", scheme="BIOES")
    [item] = task.encode([{"tokens": SENTENCE, "tags": SENTENCE_TAGS}])
    assert names(task, item["labels"][0].tolist()) == [
        None, "B-PER", "E-PER", "O", "O", "O", "B-LOC", "E-LOC", "O", "B-LOC", "E-LOC", None]


def test_a_word_without_subwords_keeps_its_own_prediction():
    """transformers#10263: a word the normaliser erases must not shift later tags onto other words."""
    task = subword_task()
    words = ["Johnson", "\u200b", "lives", "\x00", "", "in", "\ufeff", "Paris"]
    [item] = task.encode([{"tokens": words}])
    word_ids = item["word_ids"][0].tolist()
    assert [w for w in word_ids if w >= 0] == [0, 0, 1, 2, 2, 3, 4, 5, 6, 7, 7]
    unk = task.tokenizer.token_to_id("[UNK]")
    assert [item["input_ids"][0, word_ids.index(w)].item() for w in (1, 3, 4, 6)] == [unk] * 4
    model = tiny_transformer(task).eval()
    with torch.no_grad():
        [out] = task.decode(task.forward(model, task.collate([item])))
    assert out["tokens"] == words and len(out["tags"]) == len(out["scores"]) == len(words)
    assert all(0.0 < s <= 1.0 for s in out["scores"])


@pytest.mark.parametrize("tokenizer", ["word", "wordpiece"])
def test_an_empty_sentence_decodes_to_nothing(tokenizer):
    task = TokenClassificationTask(tokenizer=tokenizer, vocab_size=60)
    task.setup(TRAIN)
    model = CRFTagger(**task.model_kwargs()).eval()
    task.init_model(model)
    items = task.encode([{"tokens": []}, {"tokens": ["Bob"]}, {"tokens": "  "}])
    with torch.no_grad():
        out = task.decode(task.forward(model, task.collate(items)))
    assert [o["tags"] for o in out][::2] == [[], []] and out[0]["entities"] == [] and len(out[1]["tags"]) == 1


def test_long_sentences_become_windows_that_tag_every_word_once():
    task = subword_task(max_length=6)  # 4 sub-words per window besides [CLS] and [SEP]
    words = ["Johnson", "lives", "in", "New", "York", "Paris", "in", "Johnson"]
    tags = ["B-PER", "O", "O", "B-LOC", "I-LOC", "B-LOC", "O", "B-PER"]
    [item] = task.encode([{"tokens": words, "tags": tags}])
    assert item["input_ids"].shape[0] == 4 and int(item["lengths"].max()) <= 6
    labelled = item["labels"] != IGNORE
    assert sorted(item["word_ids"][labelled].tolist()) == list(range(len(words)))
    assert names(task, item["labels"][labelled].tolist()) == tags
    # a chunk cut by a window's edge restarts with B- in the next window
    [cut] = task.encode([{"tokens": ["in", "New", "York", "York", "York"], "tags": ["O", "B-LOC", "I-LOC", "I-LOC", "I-LOC"]}])
    assert [names(task, row[row != IGNORE].tolist()) for row in cut["labels"]] == [
        ["O", "B-LOC", "I-LOC", "I-LOC"], ["B-LOC"]]
    assert names(task, cut["word_tags"].tolist())[-1] == "I-LOC"  # the gold the metric scores is the sentence's
    model = tiny_transformer(task).eval()
    with torch.no_grad():
        [out] = task.decode(task.forward(model, task.collate([item])))
    assert len(out["tags"]) == len(words)
    # a word longer than a window keeps its first sub-words, and its tag
    narrow = subword_task(max_length=3)
    [item] = narrow.encode([{"tokens": ["Johnson", "in"], "tags": ["B-PER", "O"]}])
    assert item["input_ids"].tolist() == [[2, 5, 3], [2, 9, 3]]


def test_word_tokenizer_gives_one_position_per_word_and_character_ids():
    plain = TokenClassificationTask(tokenizer="word", vocab_size=100)
    plain.setup(TRAIN)
    assert set(plain.model_kwargs()) == {"vocab_size", "num_labels", "pad_id"}  # any model takes these
    assert "char_ids" not in plain.collate(plain.encode(TRAIN))
    task = TokenClassificationTask(tokenizer="word", vocab_size=100, chars=True)
    task.setup(TRAIN)
    assert task.model_kwargs()["char_vocab_size"] == len(task.chars) + 2
    [item] = task.encode([{"tokens": ["John", "doesn't", "Zürich"]}])
    assert item["input_ids"].shape == (1, 3) and item["word_ids"].tolist() == [[0, 1, 2]]
    unk = task.tokenizer.token_to_id("[UNK]")
    assert item["input_ids"][0, 0] != unk and item["input_ids"][0, 1:].tolist() == [unk, unk]
    batch = task.collate([item, *task.encode(TRAIN[:1])])
    assert batch["char_ids"].shape == (2, 7, 7)  # rows, longest sentence, longest word
    assert batch["char_ids"][0, 0, :4].tolist() == [task.char_index[c] for c in "John"]
    assert batch["char_ids"][0, 2, 1].item() == 1  # "ü" never seen in training
    with pytest.raises(ConfigError, match="chars"):
        TokenClassificationTask(tokenizer="wordpiece", chars=True)


def test_glove_vectors_and_vocabulary_for_the_word_tokenizer(monkeypatch):
    from dapeng.data import glove

    vectors = np.arange(3 * 50, dtype=np.float32).reshape(3, 50)
    monkeypatch.setattr(glove, "load_glove", lambda: ({"paris": 0, "oslo": 1, "lima": 2}, vectors))
    task = TokenClassificationTask(tokenizer="word", glove=True, glove_vocab=2)  # "oslo" gets an id, "lima" not
    task.setup(TRAIN)
    [item] = task.encode([{"tokens": ["Oslo", "Lima", "Paris"]}])
    ids = item["input_ids"][0].tolist()
    assert ids[0] == task.tokenizer.token_to_id("oslo") and ids[1] == task.tokenizer.token_to_id("[UNK]")
    model = nn.Embedding(task.model_kwargs()["vocab_size"], 50, padding_idx=0)
    model.get_input_embeddings = lambda: model
    task.init_model(model)
    assert torch.equal(model.weight[ids[2]], torch.from_numpy(vectors[0]))
    assert torch.equal(model.weight[ids[0]], torch.from_numpy(vectors[1]))


# ---------------------------------------------------------------- model side


def test_cross_entropy_over_tagged_positions_trains_a_transformer():
    task = subword_task()
    model = tiny_transformer(task)
    batch = task.collate(task.encode(TRAIN + [{"tokens": SENTENCE, "tags": SENTENCE_TAGS}]))
    loss, outputs = task.loss(model, batch)
    logits = outputs["logits"]
    assert logits.shape == (*batch["input_ids"].shape, len(task.labels))
    keep = batch["labels"] != IGNORE
    manual = nn.functional.cross_entropy(logits[keep], batch["labels"][keep])
    assert torch.allclose(loss, manual)
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(15):
        optimizer.zero_grad()
        step, _ = task.loss(model, batch)
        step.backward()
        optimizer.step()
    assert step.item() < loss.item() / 2


def test_a_crf_model_is_trained_on_its_nll_and_decoded_by_viterbi():
    task = TokenClassificationTask(tokenizer="word", vocab_size=100, chars=True)
    task.setup(TRAIN)
    model = CRFTagger(**task.model_kwargs())
    task.init_model(model)  # the CRF learns which transitions BIO forbids
    assert not model.crf.allowed[task.index["O"], task.index["I-PER"]]
    batch = task.collate(task.encode(TRAIN))
    model.train()
    loss, outputs = task.loss(model, batch)
    assert model.seen_chars is batch["char_ids"] and "predictions" not in outputs
    loss.backward()
    assert model.crf.transitions.grad is not None and torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        _, outputs = task.loss(model, batch)
        predictions = outputs["predictions"]
        assert predictions.shape == batch["input_ids"].shape
        assert (predictions[~batch["label_mask"]] == -1).all()
        decoded = task.decode(outputs)
    for out, record in zip(decoded, TRAIN):
        assert len(out["tags"]) == len(record["tokens"])
        assert convert(out["tags"], "BIO") == out["tags"]  # a constrained path needs no repair
    metric = task.metric()
    metric.update(outputs, batch)
    assert set(metric.compute()) == {"accuracy", "entity_precision", "entity_recall", "entity_f1"}
    fine_tuned = CRFTagger(**task.model_kwargs())  # built without init_model, as `model.init` builds it
    task.loss(fine_tuned, batch)
    assert not fine_tuned.crf.allowed[task.index["O"], task.index["I-PER"]]


def test_only_arguments_the_model_takes_are_passed():
    task = TokenClassificationTask(tokenizer="word", vocab_size=100, chars=True)
    task.setup(TRAIN)
    model = tiny_transformer(task)  # forward(input_ids, attention_mask, token_type_ids): no char_ids
    batch = task.collate(task.encode(TRAIN))
    assert "char_ids" in batch
    loss, _ = task.loss(model, batch)
    assert torch.isfinite(loss)


def test_a_pooled_model_is_refused_with_the_fix():
    task = subword_task()
    kwargs = {**task.model_kwargs(), "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32, "pooling": "mean"}
    with pytest.raises(ModelError, match="pooling: none"):
        task.loss(create_model("transformer", kwargs), task.collate(task.encode(TRAIN)))


def test_trainer_evaluates_with_the_tagging_metric_and_explain_gives_a_row_per_word(tmp_path):
    from dapeng.train.trainer import Trainer

    task = subword_task()
    model = tiny_transformer(task)
    items = task.encode(TRAIN * 2)
    trainer = Trainer(model, task, epochs=2, batch_size=4, lr=0.01, precision="fp32")
    trainer.fit(items)
    scores = trainer.evaluate(items, report_dir=tmp_path)
    assert {"eval/accuracy", "eval/entity_f1", "eval/entity_precision", "eval/entity_recall"} <= set(scores)
    report = json.loads((tmp_path / "eval_tagging_report.json").read_text())
    assert set(report["entities"]) == {"LOC", "ORG", "PER"} and "B-LOC" in report["tags"]
    [predicted] = trainer.predict(items[:1])
    assert predicted["tokens"] == TRAIN[0]["tokens"] and len(predicted["tags"]) == 7
    [e] = Pipeline(model, task).explain("Johnson lives in Paris .", method="ig")
    assert e.kind == "tokens" and e.words == ["Johnson", "lives", "in", "Paris", "."] and e.scores.shape == (5, 5)


# ---------------------------------------------------------------- save, load, Pipeline


def test_state_round_trips_through_json():
    task = TokenClassificationTask(tokenizer="word", vocab_size=100, scheme="BIOES", chars=True)
    task.setup(TRAIN)
    again = TokenClassificationTask.from_state(json.loads(json.dumps(task.state())))
    assert (again.labels, again.scheme, again.chars) == (task.labels, task.scheme, task.chars)
    records = TRAIN + [{"tokens": ["Zoë", "visited", "Oslo"]}]
    a, b = task.collate(task.encode(records)), again.collate(again.encode(records))
    for key in ("input_ids", "word_ids", "char_ids", "attention_mask"):
        assert torch.equal(a[key], b[key]), key
    sub = subword_task(subword_labels="last")
    restored = TokenClassificationTask.from_state(json.loads(json.dumps(sub.state())))
    assert restored.cls_id == sub.cls_id and restored.options.subword_labels == "last"
    assert torch.equal(restored.encode(TRAIN)[0]["input_ids"], sub.encode(TRAIN)[0]["input_ids"])


def test_pipeline_tags_word_lists_and_raw_text_with_character_offsets(tmp_path):
    from dapeng.hub.artifact import save_artifact
    from dapeng.pipeline import load

    task = subword_task()
    model = tiny_transformer(task)
    model.head.bias.data[task.index["B-LOC"]] = 100.0  # every word a location: entities on every word
    kwargs = {k: v for k, v in task.model_kwargs().items() if k != "char_vocab_size"}
    kwargs.update(hidden=16, layers=1, heads=2, intermediate=32, pooling="none", dropout=0.0)
    path = save_artifact(tmp_path / "tagger", model=model, model_name="transformer", model_kwargs=kwargs,
                         task_name="token-classification", task_state=task.state())
    pipe = load(path)
    assert pipe.capabilities.output == "tags"
    [listed] = pipe.predict([["Johnson", "lives", "in", "Paris"]])
    assert listed["tokens"] == ["Johnson", "lives", "in", "Paris"] and listed["tags"] == ["B-LOC"] * 4
    assert [(e["text"], e["start"], e["end"]) for e in listed["entities"]][-1] == ("Paris", 17, 22)
    text = "Johnson  lives in\tParis, (New York)."
    out = pipe.predict(text)
    assert out["tokens"] == ["Johnson", "lives", "in", "Paris", ",", "(", "New", "York", ")", "."]
    for entity in out["entities"]:
        assert text[entity["start"] : entity["end"]] == entity["text"]
    assert [e["text"] for e in out["entities"]][:4] == ["Johnson", "lives", "in", "Paris"]
    assert pipe.predict({"tokens": "New York"})["tokens"] == ["New", "York"]
    direct = Pipeline(model, task).predict([{"tokens": ["Paris"]}])
    assert direct[0]["tags"] == ["B-LOC"]


# ---------------------------------------------------------------- bad records


def test_bad_records_name_the_record():
    task = TokenClassificationTask(tokenizer="word")
    with pytest.raises(DataError, match="train.jsonl:3: training record has no tags"):
        task.setup([*TRAIN[:2], {"tokens": ["x"], "_source": "train.jsonl:3"}])
    with pytest.raises(DataError, match="record 1: 2 tokens but 1 tags"):
        task.setup([TRAIN[0], {"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(DataError, match="'tokens' must be a list of strings"):
        task.setup([{"tokens": [1, 2], "tags": ["O", "O"]}])
    task.setup(TRAIN)
    with pytest.raises(DataError, match="dev.conll:7: tag 'NN' is not B-/I-/E-/S-TYPE or O"):
        task.encode([{"tokens": ["today"], "tags": ["NN"], "_source": "dev.conll:7"}])


def test_a_gold_tag_training_never_saw_counts_as_an_error_and_is_no_loss_target():
    """Brown's rarest tags turn up in a test document only: evaluation must not fail on them (it did)."""
    torch.manual_seed(0)
    task = TokenClassificationTask(tokenizer="word")
    task.setup(TRAIN)
    model = MODELS.create("bilstm-crf", **task.model_kwargs(), embed_dim=8, hidden=8, dropout=0.0)
    task.init_model(model)
    [item] = task.encode([{"tokens": ["today", "in", "Paris"], "tags": ["B-DATE", "O", "B-LOC"]}])
    assert item["word_tags"].tolist()[0] == len(task.labels)  # after every label: never predicted
    assert item["labels"][item["labels"] != -100].tolist() == [task.index["O"], task.index["B-LOC"]]
    batch = task.collate([item, *task.encode(TRAIN[:1])])
    model.eval()
    loss, outputs = task.loss(model, batch)
    assert torch.isfinite(loss)
    metric = task.metric()
    metric.update(outputs, batch)
    assert "B-DATE" in metric.labels and metric.compute()["accuracy"] < 1.0


def _invalid_bio(tags: list[str]) -> int:
    """I-X after O, after another type's tag, or at the start: transitions BIO forbids."""
    bad, before = 0, "O"
    for tag in tags:
        if tag.startswith("I-") and before[2:] != tag[2:]:
            bad += 1
        before = tag
    return bad


@pytest.mark.parametrize("steps", [0, 30])
def test_the_crf_makes_decoded_ner_output_valid_bio(steps):
    """The same BiLSTM tagger decoded per word (softmax) walks invalid BIO paths; with its CRF it walks none."""
    from dapeng.tasks.token_classification import word_predictions

    rng = np.random.default_rng(0)
    vocab = sorted({w for r in TRAIN for w in r["tokens"]}) + [f"w{i}" for i in range(10)]
    held_out = [{"tokens": list(rng.choice(vocab, size=int(rng.integers(4, 12))))} for _ in range(40)]
    invalid = {}
    for crf in (False, True):
        torch.manual_seed(0)
        task = TokenClassificationTask(tokenizer="word", chars=True)
        task.setup(TRAIN)
        model = MODELS.create("bilstm-crf", **task.model_kwargs(), embed_dim=16, hidden=16, dropout=0.0,
                              char_embed_dim=4, char_filters=4, crf=crf)
        task.init_model(model)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        batch = task.collate(task.encode(TRAIN))
        model.train()
        for _ in range(steps):
            loss, _ = task.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            outputs = task.forward(model, task.collate(task.encode(held_out)))
        invalid[crf] = sum(_invalid_bio([task.labels[t] for t in tags])
                           for tags, _ in word_predictions(outputs, task.options.subword_labels))
    assert invalid[False] > 0 and invalid[True] == 0, invalid
