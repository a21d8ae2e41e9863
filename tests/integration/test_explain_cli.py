"""`dapeng explain` end to end: Artifacts of small models set up on slices of real data, then the CLI."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
from PIL import Image

from dapeng.cli.main import main

pytestmark = [pytest.mark.data, pytest.mark.slow]


def _artifact(out, task_name, dataset, model_name, kwargs, limit):
    """An Artifact of a model set up on a slice of real data (untrained: the CLI path is under test)."""
    import torch

    from dapeng.data import load_dataset
    from dapeng.hub.artifact import save_artifact
    from dapeng.models import MODELS
    from dapeng.tasks import TASKS

    torch.manual_seed(0)
    task = TASKS.create(task_name)
    task.setup(load_dataset(dataset)["train"][:limit])
    model_kwargs = {**task.model_kwargs(), **kwargs}
    model = MODELS.create(model_name, **model_kwargs)
    return save_artifact(out, model=model, model_name=model_name, model_kwargs=model_kwargs,
                         task_name=task_name, task_state=task.state())


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    kwargs = {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "pooling": "cls"}
    return _artifact(tmp_path_factory.mktemp("rt") / "model", "text-classification", "rotten-tomatoes",
                     "transformer", kwargs, 500)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    kwargs = {"channels": [4, 8], "hidden": 16}
    return _artifact(tmp_path_factory.mktemp("fm") / "model", "image-classification", "fashion-mnist", "lenet",
                     kwargs, 1000)


def test_text_ig_report_and_json(text_run, tmp_path, capsys):
    review = "A gorgeous, witty, seductive movie."
    out = tmp_path / "report.html"
    assert main(["explain", str(text_run), review, "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "text" and result["out"] == str(out)
    assert result["words"][:2] == ["A", "gorgeous"]
    assert result["completeness"]["relative_error"] <= 0.05
    page = out.read_text(encoding="utf-8")
    parser = HTMLParser()
    parser.feed(page)
    parser.close()
    assert f"Prediction: {result['predicted']}" in page and "gorgeous" in page
    assert "http://" not in page and "https://" not in page  # self-contained


@pytest.mark.parametrize("method", ["attention", "rollout"])
def test_text_attention_png(text_run, tmp_path, capsys, method):
    out = tmp_path / f"{method}.png"
    assert main(["explain", str(text_run), "flat, dull and long", "--method", method, "--out", str(out)]) == 0
    assert "predicted" in capsys.readouterr().out
    with Image.open(out) as img:
        img.load()
        assert "predicted" in img.info["Description"]


def test_image_gradcam_png_and_target(image_run, tmp_path, capsys):
    from dapeng.data import load_dataset

    shoe = tmp_path / "item.png"
    Image.fromarray(load_dataset("fashion-mnist")["test"][0]["image"]).save(shoe)
    out = tmp_path / "cam.png"
    code = main(["explain", str(image_run), str(shoe), "--method", "gradcam", "--target", "Bag", "--out", str(out),
                 "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["label"] == "Bag" and len(result["scores"]) == 28 and len(result["scores"][0]) == 28
    with Image.open(out) as img:
        img.load()
        assert json.loads(img.info["Description"])["predicted"] == result["predicted"]


def test_bad_requests_are_one_line_errors(image_run, text_run, tmp_path, capsys):
    assert main(["explain", str(text_run), "fine", "--target", "sideways"]) == 2
    assert "unknown label 'sideways'" in capsys.readouterr().err
    assert main(["explain", str(text_run), "fine", "--method", "gradcam"]) == 2
    assert "no 'gradcam' explanations" in capsys.readouterr().err
    assert main(["explain", str(text_run), "fine", "--out", str(tmp_path / "x.pdf")]) == 2
    assert not (tmp_path / "x.pdf").exists()
