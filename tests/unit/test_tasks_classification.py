"""Text and image classification tasks with tiny local models: the Task contract end to end."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn

from dapeng.data import glove
from dapeng.errors import ConfigError, DataError
from dapeng.tasks import TASKS
from dapeng.tasks._classification import ClassificationMetric
from dapeng.tasks.base import Task
from dapeng.tasks.image_classification import ImageClassificationTask
from dapeng.tasks.text_classification import TextClassificationTask

TRAIN = [
    {"text": "a great and funny film", "label": "fresh"},
    {"text": "great cast, great fun", "label": "fresh"},
    {"text": "dull, bad and boring", "label": "rotten"},
    {"text": "a boring mess of a film", "label": "rotten", "_source": "train.csv:5"},
]

torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a busy 2-core box


class TinyText(nn.Module):
    def __init__(self, vocab_size, num_labels, pad_id, embed_dim=8):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.head = nn.Linear(embed_dim, num_labels)

    def get_input_embeddings(self):
        return self.embedding

    def forward_features(self, input_ids, attention_mask=None):
        m = attention_mask.unsqueeze(-1).float()
        return (self.embedding(input_ids) * m).sum(1) / m.sum(1)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.forward_features(input_ids, attention_mask))


class TinyImage(nn.Module):
    def __init__(self, in_channels, image_size, num_labels):
        super().__init__()
        self.head = nn.Linear(in_channels * image_size * image_size, num_labels)

    def forward(self, images):
        return self.head(images.flatten(1))


def text_task(**options):
    task = TextClassificationTask(tokenizer="word", vocab_size=100, **options)
    task.setup(TRAIN)
    return task


def test_registered_and_protocol():
    assert {"text-classification", "image-classification"} <= set(TASKS.names())
    assert isinstance(TASKS.create("text-classification"), Task)
    assert isinstance(TASKS.create("image-classification"), Task)


def test_text_task_trains_a_tiny_model():
    task = text_task()
    kwargs = task.model_kwargs()
    assert kwargs["num_labels"] == 2 and kwargs["pad_id"] == 0 and kwargs["vocab_size"] > 10
    model = TinyText(**kwargs)
    batch = task.collate(task.encode(TRAIN))
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["labels"].tolist() == [
        0,
        0,
        1,
        1,
    ]
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    first = None
    for _ in range(20):
        loss, outputs = task.loss(model, batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 4
    decoded = task.decode(outputs)
    assert [d["label"] for d in decoded] == ["fresh", "fresh", "rotten", "rotten"]
    assert abs(sum(decoded[0]["probabilities"].values()) - 1) < 1e-5


def test_predict_records_need_no_label_and_unknown_labels_are_named():
    task = text_task()
    batch = task.collate(task.encode([{"text": "great fun"}]))
    assert "labels" not in batch
    with pytest.raises(DataError, match=r"test\.csv:9: unknown label 'meh'.*fresh, rotten"):
        task.encode([{"text": "ok", "label": "meh", "_source": "test.csv:9"}])
    with pytest.raises(DataError, match="record 0: no 'text'"):
        task.encode([{"review": "ok"}])


def test_state_round_trip_through_json():
    task = text_task(label_smoothing=0.1)
    state = json.loads(json.dumps(task.state()))
    again = TextClassificationTask.from_state(state)
    assert again.labels == task.labels and again.options == task.options
    a, b = task.collate(task.encode(TRAIN)), again.collate(again.encode(TRAIN))
    assert torch.equal(a["input_ids"], b["input_ids"])


def test_unknown_option_is_a_config_error_listing_options():
    with pytest.raises(ConfigError, match=r"task_options\.vocab: extra inputs.*vocab_size"):
        TextClassificationTask(vocab=10)
    with pytest.raises(ConfigError, match="task_options.label_smoothing"):
        ImageClassificationTask(label_smoothing=2)


def test_class_weights_and_label_smoothing_change_the_loss():
    records = TRAIN + [{"text": "fun", "label": "fresh"}] * 4
    plain = TextClassificationTask(tokenizer="word")
    plain.setup(records)
    weighted = TextClassificationTask(tokenizer="word", class_weights="balanced", label_smoothing=0.2)
    weighted.setup(records)
    assert weighted.class_weights == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])
    model = TinyText(**plain.model_kwargs())
    batch = plain.collate(plain.encode(records))
    assert plain.loss(model, batch)[0].item() != pytest.approx(weighted.loss(model, batch)[0].item())
    with pytest.raises(ConfigError, match="2 labels"):
        TextClassificationTask(class_weights=[1.0]).setup(records)


def test_glove_init_copies_vectors(monkeypatch):
    vectors = np.arange(3 * 50, dtype=np.float32).reshape(3, 50)
    monkeypatch.setattr(glove, "load_glove", lambda: ({"great": 0, "film": 1, "boring": 2}, vectors))
    task = text_task(glove=True)
    model = TinyText(**task.model_kwargs(), embed_dim=50)
    task.init_model(model)
    weight = model.get_input_embeddings().weight
    assert torch.equal(weight[task.tokenizer.token_to_id("film")], torch.from_numpy(vectors[1]))
    assert torch.count_nonzero(weight[0]) == 0  # padding row stays zero
    with pytest.raises(ConfigError, match="needs 50-d embeddings"):
        task.init_model(TinyText(**task.model_kwargs(), embed_dim=8))


def test_glove_vocab_gives_unseen_words_their_vectors(monkeypatch):
    vectors = np.arange(4 * 50, dtype=np.float32).reshape(4, 50)
    index = {"the": 0, "film": 1, "superb": 2, "dreary": 3}  # by frequency, as GloVe lists them
    monkeypatch.setattr(glove, "load_glove", lambda: (index, vectors))
    task = text_task(glove=True, glove_vocab=3)  # the 3 most frequent: "superb" gets an id, "dreary" not
    assert task.tokenizer.encode("superb dreary").tokens[1:3] == ["superb", "[UNK]"]
    model = TinyText(**task.model_kwargs(), embed_dim=50)
    task.init_model(model)
    weight = model.get_input_embeddings().weight
    assert torch.equal(weight[task.tokenizer.token_to_id("superb")], torch.from_numpy(vectors[2]))
    with pytest.raises(ConfigError, match="glove_vocab needs glove: true"):
        text_task(glove_vocab=3)


def test_text_augmentation_only_in_training():
    task = text_task(augment={"token_dropout": 0.9})
    model = TinyText(**task.model_kwargs())
    batch = task.collate(task.encode(TRAIN))
    model.eval()
    a = task.forward(model, batch)["logits"]
    assert torch.equal(a, task.forward(model, batch)["logits"])
    model.train()
    assert not torch.equal(a, task.forward(model, batch)["logits"])


def test_metric_matches_sklearn():
    metric = ClassificationMetric(["a", "b", "c"])
    true = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0, 2])
    metric.update({"logits": nn.functional.one_hot(pred, 3).float()}, {"labels": true})
    out = metric.compute()
    assert out["accuracy"] == pytest.approx(5 / 7)
    assert out["macro_f1"] == pytest.approx(f1_score(true, pred, average="macro"))
    assert metric.per_class()["b"]["precision"] == pytest.approx(2 / 3)


def test_write_report_makes_png_and_json(tmp_path):
    metric = ClassificationMetric(["cat", "dog"])
    metric.update({"logits": torch.tensor([[2.0, 0.0], [0.0, 1.0]])}, {"labels": torch.tensor([0, 0])})
    json_path, png_path = metric.write_report(tmp_path)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(json_path.read_text())["confusion_matrix"] == [[1, 1], [0, 0]]


def image_records():
    rng = np.random.default_rng(0)
    grey = [{"image": rng.integers(0, 50, (8, 8), dtype=np.uint8), "label": "dark"} for _ in range(4)]
    light = [{"image": rng.integers(200, 255, (8, 8, 3), dtype=np.uint8), "label": "light"} for _ in range(4)]
    return grey + light


def test_image_task_learns_stats_and_normalises():
    task = ImageClassificationTask(augment={"crop_padding": 1, "hflip": True})
    task.setup(image_records())
    assert task.model_kwargs() == {"in_channels": 3, "image_size": 8, "num_labels": 2}
    batch = task.collate(task.encode(image_records()))
    images = batch["images"]
    assert images.shape == (8, 3, 8, 8) and images.is_contiguous(memory_format=torch.channels_last)
    assert images.mean().abs() < 0.1 and (images.std() - 1).abs() < 0.1
    model = TinyImage(**task.model_kwargs())
    model.train()
    loss, _ = task.loss(model, batch)
    loss.backward()
    assert model.head.weight.grad is not None


def test_image_task_resizes_and_round_trips():
    task = ImageClassificationTask(image_size=4)
    task.setup(image_records())
    (item,) = task.encode([{"image": np.full((16, 16), 255, dtype=np.uint8)}])
    assert item["image"].shape == (3, 4, 4) and "label" not in item
    again = ImageClassificationTask.from_state(json.loads(json.dumps(task.state())))
    assert again.mean == pytest.approx(task.mean) and again.labels == ["dark", "light"]
    assert torch.equal(
        again.collate(again.encode(image_records()))["images"],
        task.collate(task.encode(image_records()))["images"],
    )
    with pytest.raises(DataError, match="unknown label 'grey'"):
        task.encode([{"image": np.zeros((4, 4), dtype=np.uint8), "label": "grey"}])
