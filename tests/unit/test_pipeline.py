"""Pipeline: raw inputs → task records → model → typed outputs, as a real Artifact loads."""

from __future__ import annotations

import base64
import dataclasses
import io
import math

import numpy as np
import pytest
import torch

import dapeng
from dapeng.errors import CheckpointError, DapengError
from dapeng.pipeline import InputError, Pipeline, to_json
from dapeng.tasks.image_classification import ImageClassificationTask
from dapeng.train.precision import autocast

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "the", "a"]


def tiny_text_artifact(path):
    """A trained-from-nothing 1-layer Transformer text classifier, saved as an Artifact."""
    from dapeng.hub.artifact import save_artifact
    from dapeng.models import MODELS
    from dapeng.tasks import TASKS

    rng = np.random.default_rng(0)
    records = [{"text": " ".join(rng.choice(WORDS, 5)), "label": ["neg", "pos"][i % 2]} for i in range(40)]
    task = TASKS.create("text-classification", tokenizer="word", vocab_size=64, max_length=32)
    task.setup(records)
    torch.manual_seed(0)
    kwargs = {**task.model_kwargs(), "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32, "max_positions": 64}
    model = MODELS.create("transformer", **kwargs)
    return save_artifact(path, model=model, model_name="transformer", model_kwargs=kwargs,
                         task_name="text-classification", task_state=task.state())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    tiny_text_artifact(run / "model")
    return run


@pytest.fixture(scope="module")
def pipe(run_dir):
    torch.set_num_threads(1)
    return dapeng.load(run_dir, precision="fp32")


def test_load_reads_run_dirs_and_artifact_folders(run_dir, pipe):
    direct = dapeng.load(run_dir / "model", precision="fp32")
    assert pipe.labels == direct.labels == ["neg", "pos"]
    assert pipe.task_name == "text-classification" and pipe.name == run_dir.name
    assert pipe.predict("good film") == direct.predict("good film")


def test_load_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(CheckpointError, match="holds no model"):
        dapeng.load(tmp_path)


def test_load_refuses_a_hub_name_that_escapes_the_store():
    with pytest.raises(DapengError):
        dapeng.load("../../etc")


def test_predict_matches_the_model_run_by_hand(pipe):
    texts = ["good film", "the plot was awful and poor", "a"]
    outputs = pipe.predict(texts)
    batch = pipe.task.collate(pipe.task.encode([{"text": t} for t in texts]))
    batch = {k: v.to(pipe.device) for k, v in batch.items()}
    with torch.no_grad(), autocast(pipe.precision, pipe.device):
        probs = pipe.model(batch["input_ids"], batch["attention_mask"]).float().softmax(-1).cpu()
    for out, row in zip(outputs, probs):
        assert out["label"] == pipe.labels[int(row.argmax())]
        assert [out["probabilities"][k] for k in pipe.labels] == pytest.approx(row.tolist(), abs=1e-5)


def test_one_input_gives_one_output_and_batching_keeps_order(pipe):
    texts = [" ".join(WORDS[: 1 + i % 9]) for i in range(11)]
    one_by_one = [pipe.predict(t) for t in texts]
    assert isinstance(one_by_one[0], dict)
    batched = pipe.predict(texts, batch_size=3)  # sorted by length inside, answered in input order
    for a, b in zip(one_by_one, batched):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_predict_runs_in_eval_mode_without_autograd(pipe):
    pipe.model.train()
    seen = {}

    def hook(module, args, output):
        seen["training"] = module.training
        seen["grad"] = torch.is_grad_enabled() or output.requires_grad

    handle = pipe.model.register_forward_hook(hook)
    try:
        first, second = pipe.predict(["good film"] * 2)
    finally:
        handle.remove()
    assert seen == {"training": False, "grad": False}
    assert first == second


def test_bf16_precision_stays_close_to_fp32(run_dir, pipe):
    bf16 = Pipeline(pipe.model, pipe.task, precision="bf16")
    assert bf16.precision == "bf16"
    a, b = pipe.predict("good film"), bf16.predict("good film")
    assert a["score"] == pytest.approx(b["score"], abs=0.05)


def test_records_accept_texts_and_text_records(pipe):
    assert pipe.to_records(["x", {"text": "y", "id": 3}]) == [{"text": "x"}, {"text": "y", "id": 3}]


@pytest.mark.parametrize(
    ("raw", "loc", "message"),
    [
        ([5], (0,), "must be a string"),
        (["ok", None], (1,), "not null"),
        ([{"txt": "x"}], (0,), "no 'text' field"),
        (["ok", {"text": 3}], (1, "text"), "must be a string"),
        (["x" * 11], (0,), "11 characters"),
    ],
)
def test_bad_inputs_name_the_input(pipe, raw, loc, message):
    with pytest.raises(InputError, match=message) as info:
        pipe.to_records(raw, max_chars=10)
    assert info.value.loc == loc


def test_embed_delegates_to_the_task_and_generate_is_refused(pipe):
    vectors = pipe.embed(["good film", "bad plot"])
    assert vectors.shape == (2, 16)
    with pytest.raises(DapengError, match="can't generate"):
        pipe.generate("hello")
    assert not pipe.can_generate and pipe.can_embed


class ImageTask:
    name = "image-classification"
    capabilities = ImageClassificationTask.capabilities


def image_pipeline() -> Pipeline:
    return Pipeline(torch.nn.Identity(), ImageTask(), precision="fp32")


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_come_as_files_bytes_base64_arrays_and_lists(tmp_path):
    pipe = image_pipeline()
    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    (tmp_path / "x.png").write_bytes(png_bytes(pixels))
    inputs = [
        str(tmp_path / "x.png"),
        png_bytes(pixels),
        {"b64": base64.b64encode(png_bytes(pixels)).decode()},
        pixels,
        pixels.tolist(),
        {"image": pixels, "id": 1},
    ]
    for record in pipe.to_records(inputs):
        assert np.array_equal(record["image"], pixels)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([[1, 2], [3]], "rectangular"),
        ([[300]], "0..255"),
        ([[[1, 2]]], "shape"),
        ({"b64": "%%%"}, "base64"),
        (b"not an image", "not an image"),
        ("/etc/passwd", "must be a base64 image"),
    ],
)
def test_bad_images_are_refused(raw, message):
    with pytest.raises(InputError, match=message):
        image_pipeline().to_records([raw], allow_paths=False)


def test_to_json_makes_outputs_plain():
    @dataclasses.dataclass
    class Out:
        scores: np.ndarray
        label: str

    value = {"t": torch.tensor([1.5, math.nan]), "n": np.float32(2.0), "d": Out(np.array([1, 2]), "x"), "s": (1,)}
    assert to_json(value) == {"t": [1.5, None], "n": 2.0, "d": {"scores": [1, 2], "label": "x"}, "s": [1]}


def test_plan_batches_splits_by_length_when_padding_costs_more_than_a_forward():
    from dapeng.pipeline import plan_batches

    lengths = [100, 10, 100, 10, 10, 100, 10, 100]
    groups = plan_batches(lengths, max_size=8, overhead_tokens=64)
    assert sorted(sorted(lengths[i] for i in g) for g in groups) == [[10] * 4, [100] * 4]
    assert plan_batches(lengths, max_size=8, overhead_tokens=10_000) == [sorted(range(8), key=lengths.__getitem__)]
    ragged = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5]
    groups = plan_batches(ragged, max_size=3)
    assert sorted(i for g in groups for i in g) == list(range(10)) and all(len(g) <= 3 for g in groups)
    assert [len(g) for g in plan_batches([0] * 5, max_size=2)] in ([1, 2, 2], [2, 2, 1])


def test_an_image_over_pils_pixel_limit_is_an_input_error(monkeypatch):
    from PIL import Image

    png = io.BytesIO()
    Image.new("L", (64, 64)).save(png, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is over twice the limit: PIL refuses it
    with pytest.raises(InputError, match="more than 1000 pixels"):
        image_pipeline().predict(png.getvalue())
