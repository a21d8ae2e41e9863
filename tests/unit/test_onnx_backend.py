"""ONNX Runtime as the Pipeline's backend: exported classifiers and CRF taggers predict what PyTorch predicts,
and ONNX Runtime's int8 quantization sits behind the same accuracy gate as `dapeng quantize`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import dapeng
from dapeng.compress.export import export
from dapeng.compress.runtime import OnnxRuntimeModel, quantize_export
from dapeng.errors import CheckpointError, ConfigError, DapengError
from dapeng.hub.artifact import save_artifact
from dapeng.models import MODELS
from dapeng.tasks import TASKS
from dapeng.tasks.base import UnsupportedError

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "the", "a", "very", "not"]
TAGGED = [
    {"tokens": ["John", "Smith", "lives", "in", "New", "York", "."],
     "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"]},
    {"tokens": ["Mary", "visited", "Paris", "with", "Acme", "Corp"],
     "tags": ["B-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG"]},
    {"tokens": ["Bob", "likes", "Paris"], "tags": ["B-PER", "O", "B-LOC"]},
    {"tokens": ["Acme", "hired", "John", "in", "York"], "tags": ["B-ORG", "O", "B-PER", "O", "B-LOC"]},
]


def _artifact(tmp_path, task_name, model_name, model_kwargs, records, **task_options):
    torch.manual_seed(0)
    task = TASKS.create(task_name, **task_options)
    task.setup(records)
    kwargs = {**task.model_kwargs(), **model_kwargs}
    model = MODELS.create(model_name, **kwargs).eval()
    if hasattr(task, "init_model"):
        task.init_model(model)
    path = save_artifact(tmp_path / "run" / "model", model=model, model_name=model_name, model_kwargs=kwargs,
                         task_name=task_name, task_state=task.state(), precision="fp32")
    export(model, task, task.encode(records), tmp_path / "run" / "export-onnx", "onnx", artifact_dir=path)
    return tmp_path / "run", task


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    rng = np.random.default_rng(0)
    records = [{"text": " ".join(rng.choice(WORDS, 1 + i % 9)), "label": ["neg", "pos"][i % 2]} for i in range(48)]
    run, task = _artifact(tmp_path_factory.mktemp("cls"), "text-classification", "textcnn",
                          {"embed_dim": 16, "filters": 8}, records, tokenizer="word", vocab_size=64, max_length=32)
    return run, task, records


def test_an_onnx_export_predicts_what_the_pytorch_model_predicts(classifier):
    run, _, records = classifier
    texts = [r["text"] for r in records[:10]]
    torch_pipe = dapeng.load(run)
    ort_pipe = dapeng.load(run / "export-onnx")  # an export folder: ONNX Runtime without asking
    assert torch_pipe.backend == "torch" and ort_pipe.backend == "onnxruntime"
    assert isinstance(ort_pipe.model, OnnxRuntimeModel)
    want, got = torch_pipe.predict(texts), ort_pipe.predict(texts, batch_size=4)
    assert [w["label"] for w in want] == [g["label"] for g in got]
    for w, g in zip(want, got):
        assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)
    assert dapeng.load(run, backend="onnxruntime").predict(texts[0])["label"] == want[0]["label"]


def test_the_onnx_backend_declares_no_explanations(classifier):
    run, _, _ = classifier
    pipe = dapeng.load(run, backend="onnxruntime")
    assert not pipe.capabilities.supports("explain") and dapeng.load(run).capabilities.supports("explain")
    with pytest.raises(UnsupportedError, match="can't explain"):
        pipe.explain("a good film")


def test_a_crf_tagger_with_a_character_cnn_runs_on_onnxruntime(tmp_path):
    run, _ = _artifact(tmp_path, "token-classification", "bilstm-crf",
                       {"embed_dim": 8, "hidden": 8, "dropout": 0.0, "char_embed_dim": 4, "char_filters": 4},
                       TAGGED, tokenizer="word", chars=True)
    report = json.loads((run / "export-onnx" / "export.json").read_text())
    assert "char_ids" in report["inputs"] and report["crf"]["num_tags"] > 0
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero transitions, so Viterbi's choice depends on the saved CRF scores
        for p in dapeng.load(run).model.crf.parameters():
            p.normal_()
    sentences = ["Mary likes New York", "Bob visited Acme Corp in Paris", "unknown words here"]
    want = dapeng.load(run).predict(sentences)
    got = dapeng.load(run, backend="onnxruntime").predict(sentences)
    assert [g["tags"] for g in got] == [w["tags"] for w in want]


def test_a_run_without_an_export_says_how_to_make_one(tmp_path, classifier):
    run, _, _ = classifier
    lone = tmp_path / "lone"  # an Artifact outside its run: no export-onnx/ beside it
    shutil.copytree(run / "model", lone)
    with pytest.raises(CheckpointError, match="dapeng export .* --format onnx"):
        dapeng.load(lone, backend="onnxruntime")
    assert dapeng.load(run / "model", backend="onnxruntime").backend == "onnxruntime"  # its run's export
    with pytest.raises(ConfigError, match="unknown backend 'tensorrt'"):
        dapeng.load(run, backend="tensorrt")


def test_onnxruntime_int8_passes_or_refuses_the_accuracy_gate(tmp_path, classifier):
    run, task, records = classifier
    items = task.encode(records)
    out = tmp_path / "int8"
    result = quantize_export(run, "int8-dynamic", items, out, max_drop=100.0)
    assert result["backend"] == "onnxruntime" and result["size_mb"]["after"] < result["size_mb"]["before"]
    meta = json.loads((out / "export.json").read_text())
    assert meta["quantization"]["method"] == "int8-dynamic"
    pipe = dapeng.load(out)
    assert pipe.backend == "onnxruntime" and {p["label"] for p in pipe.predict([r["text"] for r in records])} <= {"neg", "pos"}
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_export(out, "int8-dynamic", items, tmp_path / "again")
    # a gate no model can pass: refused, nothing written
    with pytest.raises(DapengError, match="more than --max-drop -100.0; nothing written"):
        quantize_export(run, "int8-static", items, tmp_path / "refused", calibration=items[:16], max_drop=-100.0)
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused*"))
