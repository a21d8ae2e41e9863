"""The contract every registered task keeps, end to end on a tiny model of its own:

encode → collate → forward → loss → backward → metric → save Artifact → load → the verbs its
`Capabilities` declare, through the Pipeline and through the HTTP server on a real socket; the
verbs it does not declare are refused with a 4xx that names what it can do.

Adding a task to `TASKS` means adding its `CASES` entry here (`test_every_task_has_a_case`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from _tiny_lm import CHAT, serve_in_thread
from tokenizers import Tokenizer, models, pre_tokenizers

from dapeng.hub.artifact import save_artifact
from dapeng.models import MODELS
from dapeng.pipeline import load
from dapeng.tasks import BUILTIN_TASKS, TASKS
from dapeng.tasks.base import VERBS, Capabilities, UnsupportedError, capabilities_of

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["a", "the", "film", "plot", "was", "is", "good", "bad", "dull", "great", "witty", "boring", "movie",
         "story", "fun", "slow"]
TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 4)) for i in range(24)]


def _word_tokenizer() -> str:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def _images(n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 255, (8, 8), dtype=np.uint8), "label": str(i % 3)} for i in range(n)]


def _qa(n: int) -> list[dict[str, Any]]:
    """Image + question records: the answer is the image's brighter half, asked in two ways."""
    rng = np.random.default_rng(1)
    records = []
    for i in range(n):
        image = rng.integers(0, 60, (8, 8, 3), dtype=np.uint8)
        image[: 4 if i % 2 else 8, :4] += 150
        records.append({"image": image, "text": ["which side is bright?", "is the left bright?"][i % 2],
                        "label": ["left", "yes"][i % 2], "type": ["side", "yes/no"][i % 2]})
    return records


@dataclass
class Case:
    """A task's tiny world: its options, training records, model, and raw inputs to serve."""

    options: dict[str, Any]
    records: Callable[[], list[dict[str, Any]]]
    model: str
    kwargs: dict[str, Any]
    inputs: list[Any]
    http_inputs: list[Any] | None = None  # what the server gets, when it differs (images as pixel lists)
    extra: dict[str, Any] = field(default_factory=dict)


TINY_ENCODER = {"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32, "max_positions": 32, "dropout": 0.0}
CASES: dict[str, Case] = {
    "text-classification": Case(
        {"tokenizer": "word", "max_length": 16},
        lambda: [{"text": t, "label": "pos" if i % 2 else "neg"} for i, t in enumerate(TEXTS)],
        "transformer", {**TINY_ENCODER, "pooling": "cls"}, ["a good film", "the plot was dull"],
    ),
    "image-classification": Case(
        {}, lambda: _images(12), "lenet", {"channels": (2, 4), "hidden": 8, "dropout": 0.0},
        [img["image"] for img in _images(2)], [img["image"].tolist() for img in _images(2)],
    ),
    "sentence-embedding": Case(
        {"tokenizer": _word_tokenizer(), "max_length": 16},
        lambda: [{"text": t, "positive": TEXTS[(i + 1) % len(TEXTS)]} for i, t in enumerate(TEXTS)],
        "transformer", {**TINY_ENCODER, "pooling": "mean"}, ["a good film", "a dull plot"],
    ),
    "token-classification": Case(
        {"tokenizer": "word", "chars": True, "max_length": 16},
        lambda: [{"tokens": t.split(), "tags": [("B-X" if j == 0 else "I-X") if w in ("film", "plot", "movie")
                                                else "O" for j, w in enumerate(t.split())]} for t in TEXTS],
        "bilstm-crf", {"embed_dim": 8, "hidden": 8, "dropout": 0.0, "char_embed_dim": 4, "char_filters": 4},
        ["the film was good", ["a", "dull", "plot"]],
    ),
    "masked-lm": Case(
        {"tokenizer": "wordpiece", "vocab_size": 60, "max_length": 16},
        lambda: [{"text": t} for t in TEXTS],
        "transformer", {**TINY_ENCODER, "pooling": "mean"}, ["a good film", "the plot was dull"],
    ),
    "contrastive": Case(
        {"projection_dim": 4}, lambda: _images(12), "lenet", {"channels": (2, 4), "hidden": 8, "dropout": 0.0},
        [img["image"] for img in _images(2)], [img["image"].tolist() for img in _images(2)],
    ),
    "visual-question-answering": Case(
        {"max_length": 8}, lambda: _qa(12), "vqa",
        {"fusion": "cross-attention", "embed_dim": 8, "hidden": 8, "widths": (4, 8), "fusion_dim": 8, "heads": 2,
         "dropout": 0.0},
        [{"image": r["image"], "text": r["text"]} for r in _qa(2)],
        [{"image": r["image"].tolist(), "text": r["text"]} for r in _qa(2)],
    ),
    "image-text-contrastive": Case(
        {"max_length": 8}, lambda: [{"image": r["image"], "text": r["text"] + " " + r["label"]} for r in _qa(12)],
        "clip", {"embed_dim": 8, "widths": (4, 8), "word_dim": 8, "hidden": 8, "dropout": 0.0},
        [{"image": r["image"], "text": r["text"]} for r in _qa(2)],
        [{"image": r["image"].tolist(), "text": r["text"]} for r in _qa(2)],
        {"embed_inputs": ["which side is bright?", "is the left bright?"]},  # embed: the text tower
    ),
    "causal-lm": Case(
        {"vocab_size": 300, "block_size": 8, "chat_template": CHAT, "max_length": 32},
        lambda: [{"text": " ".join(TEXTS)}],
        "lm", {"hidden": 16, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 32, "max_positions": 32},
        ["the film"],
    ),
    "topic-model": Case(
        {"min_df": 1, "max_df": 1.0, "stop_words": None},
        lambda: [{"text": t} for t in TEXTS],
        "prodlda", {"num_topics": 3, "hidden": 8, "layers": 1, "dropout": 0.0}, ["a good film", "the plot was dull"],
    ),
    "question-answering": Case(
        {"tokenizer": "word", "max_length": 16, "stride": 2},
        lambda: [{"question": f"which {t.split()[-1]}", "context": t,
                  "answers": [{"text": t.split()[1], "answer_start": t.index(" ") + 1}]} for t in TEXTS],
        "transformer", {**TINY_ENCODER, "pooling": "none"},
        [{"question": "what was it", "context": "the film was good"},
         {"question": "which story", "context": " ".join(TEXTS[:3])}],  # the second one in several windows
    ),
    **{name: Case(
        {"vocab_size": 120, "max_source_length": 16, "max_target_length": 16, "num_beams": 2, "max_new_tokens": 5},
        lambda: [{"text": t, "target": " ".join(reversed(t.split()))} for t in TEXTS],
        "seq2seq", {**TINY_ENCODER, "dropout": 0.0}, ["a good film", "the plot was dull"],
    ) for name in ("translation", "summarization")},
}


def test_every_task_has_a_case():
    # the built-in table: tests register toy tasks of their own into TASKS
    assert set(BUILTIN_TASKS) == set(CASES), "give each registered task a CASES entry (this file's docstring)"


def test_every_task_declares_its_capabilities():
    for name in BUILTIN_TASKS:
        caps = TASKS.get(name).capabilities
        assert isinstance(caps, Capabilities) and caps.verbs, name
        assert caps.output_schema, f"{name}: an output_schema for the server's OpenAPI document"


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tmp_path_factory):
    """(name, case, in-memory model, the task) after one optimisation step, and its saved Artifact."""
    name, case = request.param, CASES[request.param]
    torch.manual_seed(0)
    task = TASKS.create(name, **case.options)
    records = case.records()
    task.setup(records)
    model = MODELS.create(case.model, **{**task.model_kwargs(), **case.kwargs})
    items = task.encode(records)
    assert items, f"{name}: encode gave no items"
    batch = task.collate(items[:8])
    model.train()
    loss, outputs = task.loss(model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss), f"{name}: loss {loss}"
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name}: no gradient reached the model"
    metric = task.metric()
    metric.update({k: v.detach() if torch.is_tensor(v) else v for k, v in outputs.items()}, batch)
    values = metric.compute()
    assert values and all(isinstance(v, float) for k, v in values.items() if k != "report"), values
    model.zero_grad(set_to_none=True)
    model.eval()
    path = save_artifact(tmp_path_factory.mktemp(name) / "model", model=model, model_name=case.model,
                         model_kwargs={**task.model_kwargs(), **case.kwargs}, task_name=name,
                         task_state=task.state(), precision="fp32")
    return name, case, model, task, path


def test_save_load_gives_the_same_outputs(trained):
    name, case, model, task, path = trained
    pipe = load(path)
    assert capabilities_of(pipe.task) == capabilities_of(task)
    items = pipe.task.encode([dict(r) for r in case.records()[:4]])
    with torch.inference_mode():
        loaded = pipe.model(**_model_inputs(pipe.model, pipe.task.collate(items)))
        fresh = model(**_model_inputs(model, task.collate(task.encode(case.records()[:4]))))
    torch.testing.assert_close(_first(loaded), _first(fresh))


def test_declared_verbs_work_and_the_others_are_refused(trained):
    name, case, _, _, path = trained
    pipe = load(path)
    caps = pipe.capabilities
    for verb in VERBS:
        if verb in caps.verbs:
            _call(pipe, verb, case)
        else:
            with pytest.raises(UnsupportedError, match="it supports: " + ", ".join(v for v in VERBS if v in caps.verbs)):
                _call(pipe, verb, case)


def test_the_server_serves_what_the_task_declares(trained):
    from dapeng.serve.app import create_app

    name, case, _, _, path = trained
    pipe = load(path)
    caps = pipe.capabilities
    inputs = case.http_inputs or case.inputs
    with serve_in_thread(create_app({name: pipe})) as url, httpx.Client(base_url=url, timeout=60) as client:
        info = client.get(f"/v1/models/{name}").json()
        assert info["task"] == name
        predicted = client.post(f"/v1/models/{name}:predict", json={"instances": inputs})
        if "predict" in caps.verbs:
            assert predicted.status_code == 200, predicted.text
            predictions = predicted.json()["predictions"]
            assert len(predictions) == len(inputs)
            assert predictions == _jsonable(pipe.predict(case.inputs))
        else:
            assert 400 <= predicted.status_code < 500, predicted.text
        if "embed" in caps.verbs:
            texts = case.extra.get("embed_inputs", case.inputs)
            embedded = client.post("/v1/embeddings", json={"model": name, "input": texts})
            assert embedded.status_code == 200, embedded.text
            assert len(embedded.json()["data"]) == len(texts)
        if "generate" in caps.verbs:
            done = client.post("/v1/completions", json={"model": name, "prompt": case.inputs[0], "max_tokens": 3})
            assert done.status_code == 200, done.text
            assert done.json()["usage"]["completion_tokens"] >= 1
        if "explain" in caps.verbs:
            explained = client.post(f"/v1/models/{name}:explain",
                                    json={"instances": inputs[:1], "method": caps.explain[0]})
            assert explained.status_code == 200, explained.text
            assert len(explained.json()["explanations"]) == 1
        refused = [m for m in ("ig", "gradcam", "attention") if m not in caps.explain]
        if refused:
            bad = client.post(f"/v1/models/{name}:explain", json={"instances": inputs[:1], "method": refused[0]})
            assert 400 <= bad.status_code < 500, bad.text


def _call(pipe: Any, verb: str, case: Case) -> None:
    if verb == "predict":
        out = pipe.predict(case.inputs)
        assert len(out) == len(case.inputs)
    elif verb == "embed":
        texts = case.extra.get("embed_inputs", case.inputs)
        vectors = pipe.embed(texts)
        assert vectors.shape[0] == len(texts) and np.isfinite(vectors).all()
    elif verb == "generate":
        text = pipe.generate(case.inputs[0], max_new_tokens=3)
        assert isinstance(text, str)
    else:
        methods = pipe.capabilities.explain or ("ig",)
        explanations = pipe.explain(case.inputs[:1], method=methods[0])
        assert len(explanations) == 1


def _model_inputs(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    import inspect

    accepted = inspect.signature(model.forward).parameters
    return {k: v for k, v in batch.items() if k in accepted}


def _first(out: Any) -> torch.Tensor:
    return out if torch.is_tensor(out) else next(v for v in out.values() if torch.is_tensor(v))


def _jsonable(value: Any) -> Any:
    from dapeng.pipeline import to_json

    return to_json(value)
