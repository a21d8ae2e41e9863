"""Export: ONNX (checked by ONNX Runtime) and torch.export programs match PyTorch on real inputs, per family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dapeng.compress.export import UnpackedRecurrent, export, exportable
from dapeng.layers.recurrent import RecurrentEncoder
from dapeng.models import MODELS
from dapeng.tasks import TASKS

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "the", "a", "very", "not"]
TEXT_MODELS = {
    "textcnn": {"embed_dim": 16, "filters": 8},
    "lstm": {"embed_dim": 12, "hidden": 8, "layers": 2, "bidirectional": True},
    "gru": {"embed_dim": 12, "hidden": 8, "layers": 1, "bidirectional": False},
    "rnn": {"embed_dim": 12, "hidden": 8, "layers": 2, "bidirectional": True, "pooling": "max"},
    "transformer": {"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32, "max_positions": 64},
}
IMAGE_MODELS = {"mlp": {"hidden": 16, "layers": 1}, "lenet": {}, "resnet": {"widths": [4, 8], "blocks": [1, 1]}}


@pytest.fixture(scope="module")
def text_task():
    rng = np.random.default_rng(0)
    # lengths 1-9 words: every check batch mixes padded and unpadded rows
    records = [{"text": " ".join(rng.choice(WORDS, 1 + i % 9)), "label": ["neg", "pos"][i % 2]} for i in range(48)]
    task = TASKS.create("text-classification", tokenizer="word", vocab_size=64, max_length=32)
    task.setup(records)
    return task, task.encode(records)


@pytest.fixture(scope="module")
def image_task():
    rng = np.random.default_rng(0)
    records = [{"image": rng.integers(0, 256, (12, 12), dtype=np.uint8), "label": str(i % 3)} for i in range(40)]
    task = TASKS.create("image-classification")
    task.setup(records)
    return task, task.encode(records)


def _model(name, kwargs, task):
    torch.manual_seed(0)
    return MODELS.create(name, **{**task.model_kwargs(), **kwargs}).eval()


def test_unpacked_recurrent_matches_packed_sequences():
    torch.manual_seed(0)
    for kind in ("lstm", "gru", "rnn"):
        encoder = RecurrentEncoder(kind, 6, 5, layers=2, bidirectional=True).eval()
        x = torch.randn(4, 7, 6)
        mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] + [0] * 6, [0] * 7], dtype=torch.bool)  # a row of none too
        with torch.no_grad():
            want_out, want_last = encoder(x, mask)
            got_out, got_last = UnpackedRecurrent(encoder)(x, mask)
        torch.testing.assert_close(got_out, want_out, atol=1e-6, rtol=0)
        torch.testing.assert_close(got_last, want_last, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", [*TEXT_MODELS, *IMAGE_MODELS])
def test_onnx_export_matches_pytorch_through_onnxruntime(name, text_task, image_task, tmp_path):
    import onnxruntime as ort

    task, items = text_task if name in TEXT_MODELS else image_task
    model = _model(name, {**TEXT_MODELS, **IMAGE_MODELS}[name], task)
    report = export(model, task, items, tmp_path / "out", "onnx")
    assert report["checked"]["max_abs_diff"] <= 1e-4 and report["opset"] >= 17
    assert report["checked"]["batches"] != [4, 4]  # checked on other batch sizes than the traced one
    assert json.loads((tmp_path / "out" / "export.json").read_text())["format"] == "onnx"
    # batch and sequence axes are dynamic: a batch of 3 of the longest texts runs
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = task.collate(sorted(items, key=lambda it: -next(iter(it.values())).numel())[:3])
    inputs = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
    with torch.no_grad():
        want = model(*(batch[k] for k in inputs)).numpy()
    np.testing.assert_allclose(session.run(None, inputs)[0], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["textcnn", "transformer", "resnet"])
def test_torch_export_program_matches_pytorch(name, text_task, image_task, tmp_path):
    task, items = text_task if name in TEXT_MODELS else image_task
    model = _model(name, {**TEXT_MODELS, **IMAGE_MODELS}[name], task)
    report = export(model, task, items, tmp_path / "out", "torch")
    assert report["checked"]["max_abs_diff"] <= 1e-4
    program = torch.export.load(str(tmp_path / "out" / "model.pt2")).module()
    batch = task.collate(items[5:8])
    args = [batch[k] for k in report["inputs"]]
    with torch.no_grad():
        torch.testing.assert_close(program(*args), model(*args), atol=1e-4, rtol=0)


def test_torch_export_of_a_recurrent_model_has_a_static_padded_sequence(text_task, tmp_path):
    task, items = text_task
    model = _model("gru", TEXT_MODELS["gru"], task)
    report = export(model, task, items, tmp_path / "out", "torch")
    assert report["sequence_length"] == 32 and report["dynamic_axes"]["input_ids"] == {0: "batch"}
    assert report["checked"]["max_abs_diff"] <= 1e-4  # padded inputs against the unpadded PyTorch outputs


def test_exportable_leaves_the_model_alone(text_task):
    task, _ = text_task
    model = _model("lstm", TEXT_MODELS["lstm"], task)
    copy = exportable(model)
    assert isinstance(copy.encoder, UnpackedRecurrent) and isinstance(model.encoder, RecurrentEncoder)
