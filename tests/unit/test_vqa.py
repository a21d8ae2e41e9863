"""Visual question answering: the easy-VQA records, the model's fusions, the per-type metric, and
the path from records to a served answer (Pipeline, `dapeng predict --image`, the V1 server)."""

from __future__ import annotations

import base64
import io
import json
import zipfile

import numpy as np
import pytest
import torch

from dapeng.data.datasets import easy_vqa, easy_vqa_type
from dapeng.data.readers import read_jsonl
from dapeng.errors import DapengError, DataError
from dapeng.models import MODELS
from dapeng.models.vqa import FUSIONS
from dapeng.tasks import TASKS
from dapeng.tasks.vqa import VQAMetric

pytestmark = pytest.mark.usefixtures("one_thread")

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
TINY = {"embed_dim": 8, "hidden": 8, "widths": (4, 8), "fusion_dim": 16, "heads": 2, "dropout": 0.0}


def _picture(color: str, side: str) -> np.ndarray:
    """An 8x8 grey image with a coloured square on the left or the right."""
    image = np.full((8, 8, 3), 120, dtype=np.uint8)
    image[2:6, (0 if side == "left" else 4):(4 if side == "left" else 8)] = COLORS[color]
    return image


def _records(n: int = 32) -> list[dict]:
    """Questions whose answer needs both the image and the question."""
    out = []
    for i in range(n):
        color, side = ("red", "blue")[i % 2], ("left", "right")[(i // 2) % 2]
        question, answer, kind = [("what color is the square?", color, "color"),
                                  ("where is the square?", side, "side")][(i // 4) % 2]
        out.append({"image": _picture(color, side), "text": question, "label": answer, "type": kind})
    return out


def _task_and_model(fusion: str = "product", records: list[dict] | None = None):
    task = TASKS.create("visual-question-answering", max_length=8)
    task.setup(records or _records())
    torch.manual_seed(0)
    model = MODELS.create("vqa", **task.model_kwargs(), fusion=fusion, **TINY)
    return task, model


def _train(task, model, steps: int = 60) -> None:
    items = task.encode(_records())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(steps):
        loss, _ = task.loss(model, task.collate(items))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_easy_vqa_types_come_from_the_answer():
    assert [easy_vqa_type(a) for a in ("yes", "no", "circle", "triangle", "teal")] == \
        ["yes/no", "yes/no", "shape", "shape", "color"]


def test_easy_vqa_loader_checks_the_wheel_it_reads(tmp_path):
    from PIL import Image

    def png(color: tuple[int, int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), color).save(buf, format="PNG")
        return buf.getvalue()

    with zipfile.ZipFile(tmp_path / "easy_vqa-1.0-py3-none-any.whl", "w") as zf:
        for split, questions in (("train", [["is there a red shape?", "yes", 0], ["what color is the shape?", "red", 0]]),
                                 ("test", [["what shape is in the image?", "circle", 3]])):
            zf.writestr(f"easy_vqa/data/{split}/questions.json", json.dumps(questions))
            for image_id in {q[2] for q in questions}:
                zf.writestr(f"easy_vqa/data/{split}/images/{image_id}.png", png((200, 10, 10)))
    with pytest.raises(DataError, match="expected 38,575 \\+ 9,673 questions, found 2 \\+ 1"):
        easy_vqa(tmp_path)  # a damaged or different file is caught by its counts


@pytest.mark.data
def test_easy_vqa_canonical_split_keeps_each_image_in_one_part():
    from dapeng.data.catalog import load_dataset

    splits = load_dataset("easy-vqa")
    assert {k: len(v) for k, v in splits.items()} == {"train": 34779, "eval": 3796, "test": 9673}
    first = splits["train"][0]
    assert first["image"].shape == (64, 64, 3) and first["type"] == easy_vqa_type(first["label"])
    images = {k: {r["image_id"] for r in v} for k, v in splits.items()}
    assert len(images["eval"]) == 400 and not images["train"] & images["eval"]


def test_jsonl_image_paths_are_relative_to_the_file(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.fromarray(_picture("red", "left")).save(tmp_path / "img" / "a.png")
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"picture": "img/a.png", "question": "what color?", "answer": "red"}) + "\n")
    (record,) = read_jsonl(data, text_column="question", label_column="answer", image_column="picture")
    assert record["text"] == "what color?" and record["label"] == "red"
    np.testing.assert_array_equal(record["image"], _picture("red", "left"))
    data.write_text(json.dumps({"image": "img/missing.png", "text": "q", "label": "a"}) + "\n")
    with pytest.raises(DataError, match="relative to the JSONL file"):
        read_jsonl(data)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_gives_answer_logits_and_gradients(fusion):
    task, model = _task_and_model(fusion)
    batch = task.collate(task.encode(_records(6)))
    loss, outputs = task.loss(model, batch)
    assert outputs["logits"].shape == (6, len(task.labels))
    loss.backward()
    assert model.embedding.weight.grad is not None or fusion == "image-only"


def test_the_baselines_see_only_their_input():
    records = _records(4)
    swapped = [{**r, "image": records[(i + 1) % 4]["image"]} for i, r in enumerate(records)]
    asked = [{**r, "text": "where is the square?"} for r in records]
    for fusion, changed, same in (("question-only", asked, swapped), ("image-only", swapped, asked)):
        task, model = _task_and_model(fusion)
        model.eval()

        def logits(recs, task=task, model=model):
            with torch.no_grad():
                return task.forward(model, task.collate(task.encode(recs)))["logits"]

        torch.testing.assert_close(logits(same), logits(records))  # the input it ignores changes nothing
        assert not torch.allclose(logits(changed), logits(records))


def test_metric_reports_accuracy_per_question_type():
    metric = VQAMetric(["no", "red", "yes"])
    logits = torch.eye(3)[[2, 0, 1, 1]]  # predicts yes, no, red, red
    batch = {"labels": torch.tensor([2, 2, 1, 0]), "types": ["yes/no", "yes/no", "color", "yes/no"]}
    metric.update({"logits": logits}, batch)
    out = metric.compute()
    assert out["accuracy"] == 0.5
    assert out["accuracy_color"] == 1.0 and out["accuracy_yes_no"] == pytest.approx(1 / 3)


def test_trained_model_answers_through_the_pipeline_predict_cli_and_server(tmp_path, capsys):
    from fastapi.testclient import TestClient
    from PIL import Image

    from dapeng.cli.main import main
    from dapeng.hub.artifact import save_artifact
    from dapeng.pipeline import load
    from dapeng.serve.app import create_app

    task, model = _task_and_model("cross-attention")
    _train(task, model)
    path = save_artifact(tmp_path / "model", model=model, model_name="vqa", model_kwargs={**task.model_kwargs(), **TINY,
                         "fusion": "cross-attention"}, task_name=task.name, task_state=task.state(), precision="fp32")
    pipe = load(path)
    image = _picture("blue", "right")
    answers = pipe.predict([{"image": image, "text": "what color is the square?"},
                            {"image": image, "text": "where is the square?"}])
    assert [a["label"] for a in answers] == ["blue", "right"]
    with pytest.raises(DapengError, match="'image' and 'text'"):
        pipe.predict({"image": image})

    Image.fromarray(image).save(tmp_path / "q.png")
    assert main(["predict", str(path), "--image", str(tmp_path / "q.png"), "where is the square?", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prediction"]["label"] == "right"
    assert main(["predict", str(path), "where is the square?"]) == 2  # an image+text model needs --image
    assert "--image is missing" in capsys.readouterr().err

    explained = pipe.explain({"image": image, "text": "what color is the square?"}, method="gradcam")[0]
    assert explained.label == "blue" and explained.scores.shape == (8, 8)  # Grad-CAM over the pixels
    assert explained.words == ["what", "color", "is", "the", "square", "?"]
    assert len(explained.extra["word_scores"]) == 6 and np.isfinite(explained.extra["word_scores"]).all()
    page = tmp_path / "why.html"
    assert main(["explain", str(path), "--image", str(tmp_path / "q.png"), "what color is the square?",
                 "--method", "gradcam", "--out", str(page)]) == 0
    capsys.readouterr()
    html = page.read_text()
    assert "data:image/png;base64," in html and "Question, word attributions" in html and ">color<" in html

    b64 = base64.b64encode((tmp_path / "q.png").read_bytes()).decode()
    with TestClient(create_app({"vqa": pipe})) as client:
        reply = client.post("/v1/models/vqa:predict",
                            json={"instances": [{"image": {"b64": b64}, "text": "what color is the square?"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["predictions"][0]["label"] == "blue"
        bad = client.post("/v1/models/vqa:predict", json={"instances": ["what color is the square?"]})
        assert bad.status_code == 422 and "'image' and 'text'" in bad.text
        schema = client.get("/openapi.json").json()["components"]["schemas"]["PredictRequest"]
        assert schema["properties"]["instances"]["items"]["required"] == ["image", "text"]
        v2 = client.post("/v2/models/vqa/infer", json={"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]},
            {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["where is the square?"]}]})
        assert v2.status_code == 200, v2.text
        assert v2.json()["outputs"][0]["data"] == ["right"]


def test_bf16_train_step_and_predict():
    from dapeng.train.precision import autocast

    task, model = _task_and_model("cross-attention")
    batch = task.collate(task.encode(_records(4)))
    with autocast("bf16", torch.device("cpu")):
        loss, _ = task.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad(), autocast("bf16", torch.device("cpu")):
        logits = task.forward(model, batch)["logits"]
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert len(task.decode({"logits": logits.float()})) == 4
