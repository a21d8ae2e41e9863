"""Image-text contrastive learning: the loss against a hand computation, duplicate captions, recall@k,
captions made from labelled data, and a tiny model trained, served and used zero-shot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dapeng.data.captions import TEMPLATES, ZERO_SHOT_TEMPLATE, caption_from_qa, class_prompts
from dapeng.models import MODELS
from dapeng.tasks import TASKS
from dapeng.tasks.image_text import RetrievalMetric, contrastive_loss, recall_at_k

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"embed_dim": 8, "widths": (4, 8), "word_dim": 8, "hidden": 8, "dropout": 0.0}


def _log_softmax(row: list[float], i: int) -> float:
    return row[i] - math.log(sum(math.exp(x) for x in row))


def test_infonce_is_symmetric_and_equals_a_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3], [0.2, -0.4, 1.5]])
    rows, cols = logits.tolist(), logits.T.tolist()
    by_hand = -(sum(_log_softmax(rows[i], i) for i in range(3)) + sum(_log_softmax(cols[i], i) for i in range(3))) / 6
    assert contrastive_loss(logits).item() == pytest.approx(by_hand, rel=1e-6)
    assert contrastive_loss(logits.T).item() == pytest.approx(by_hand, rel=1e-6)  # images and texts swap roles
    assert contrastive_loss(logits, torch.tensor([7, 8, 9])).item() == pytest.approx(by_hand, rel=1e-6)


def test_duplicate_captions_are_positives_not_negatives():
    # images 0 and 1 have the same caption: a model that scores both its copies alike is not penalised
    logits = torch.tensor([[3.0, 3.0, 0.0], [3.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    same = torch.tensor([5, 5, 6])
    rows = logits.tolist()
    # image 0's target is spread over captions 0 and 1: -(log p01 + log p00) / 2
    image0 = -(_log_softmax(rows[0], 0) + _log_softmax(rows[0], 1)) / 2
    image2 = -_log_softmax(rows[2], 2)
    expected = (image0 * 2 + image2) / 3  # both directions equal here (symmetric logits)
    assert contrastive_loss(logits, same).item() == pytest.approx(expected, rel=1e-6)
    # plain InfoNCE pushes image 0 away from caption 1, the copy of its own caption; the masked loss doesn't
    for groups, pushed_away in ((None, True), (same, False)):
        scores = logits.clone().requires_grad_(True)
        contrastive_loss(scores, groups).backward()
        assert bool(scores.grad[0, 1] > 0) is pushed_away and bool(scores.grad[1, 0] > 0) is pushed_away


def test_recall_at_k_on_a_hand_made_similarity_matrix():
    sims = torch.tensor([[0.9, 0.1, 0.5, 0.0],   # its relevant item (0) first
                         [0.8, 0.2, 0.7, 0.6],   # relevant item 1 ranked last
                         [0.1, 0.9, 0.3, 0.2]])  # relevant item 2 ranked second
    relevant = torch.eye(3, 4, dtype=torch.bool)
    assert recall_at_k(sims, relevant, 1) == pytest.approx(1 / 3)
    assert recall_at_k(sims, relevant, 2) == pytest.approx(2 / 3)
    assert recall_at_k(sims, relevant, 5) == 1.0


def test_retrieval_metric_counts_identical_captions_as_one():
    metric = RetrievalMetric()
    images = torch.eye(3)  # image i matches caption i's direction
    texts = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])  # captions 0 and 1 are the same text
    metric.update({"image_embeds": images, "text_embeds": texts}, {"caption_ids": torch.tensor([4, 4, 9])})
    out = metric.compute()
    # image 1 (0, 1, 0) is equally far from both distinct captions: whichever comes first is its top-1
    assert out["recall_at_5_i2t"] == 1.0 and out["recall_at_5_t2i"] == 1.0
    assert out["recall_at_1_t2i"] == 1.0  # each distinct caption finds one of its images first


def test_captions_from_qa_pairs_and_class_templates():
    pairs = [("what color is the shape?", "red", "color"), ("is there not a circle?", "no", "yes/no")]
    assert caption_from_qa(pairs) == "a red circle"  # "not a circle? no": there is a circle
    assert caption_from_qa([("is no triangle present?", "yes", "yes/no"), ("is there a blue shape?", "yes",
                                                                               "yes/no")]) == "a blue shape"
    prompts = class_prompts()
    assert prompts["Sneaker"] == ZERO_SHOT_TEMPLATE.format("sneaker") and ZERO_SHOT_TEMPLATE not in TEMPLATES


def _records() -> list[dict]:
    """Bright top or bright bottom, each described in two ways."""
    out = []
    rng = np.random.default_rng(0)
    for i in range(24):
        image = rng.integers(0, 40, (8, 8), dtype=np.uint8)
        top = i % 2 == 0
        image[:4 if top else 8, :] += 180 if top else 0
        image[4:, :] += 0 if top else 180
        label = "top" if top else "bottom"
        out.append({"image": image, "text": ["a bright {}", "light at the {}"][(i // 2) % 2].format(label),
                    "label": label})
    return out


def test_tiny_clip_trains_scores_pairs_and_classifies_zero_shot(tmp_path):
    from fastapi.testclient import TestClient

    from dapeng.hub.artifact import save_artifact
    from dapeng.pipeline import load
    from dapeng.serve.app import create_app

    records = _records()
    task = TASKS.create("image-text-contrastive", max_length=8)
    task.setup(records)
    torch.manual_seed(0)
    model = MODELS.create("clip", **task.model_kwargs(), **TINY)
    items = task.encode(records)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(40):
        loss, _ = task.loss(model, task.collate(items))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.logit_scale.grad is not None  # the temperature is learned
    path = save_artifact(tmp_path / "model", model=model, model_name="clip", model_kwargs={**task.model_kwargs(),
                         **TINY}, task_name=task.name, task_state=task.state(), precision="fp32")
    pipe = load(path)
    predicted = pipe.task.zero_shot(pipe.model, records, {"top": "a bright top", "bottom": "a bright bottom"})
    assert predicted == [r["label"] for r in records]
    image = records[0]["image"]  # bright top
    match, mismatch = pipe.predict([{"image": image, "text": "a bright top"}, {"image": image, "text": "a bright bottom"}])
    assert match["score"] > mismatch["score"]
    assert pipe.embed(["a bright top"]).shape == (1, 8)
    with TestClient(create_app({"clip": pipe})) as client:
        reply = client.post("/v1/models/clip:predict", json={"instances": [{"image": image.tolist(),
                                                                           "text": "a bright top"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["predictions"][0]["score"] == pytest.approx(match["score"], abs=1e-5)


def test_bf16_clip_step():
    from dapeng.train.precision import autocast

    records = _records()[:4]
    task = TASKS.create("image-text-contrastive", max_length=8)
    task.setup(records)
    model = MODELS.create("clip", **task.model_kwargs(), **TINY)
    with autocast("bf16", torch.device("cpu")):
        loss, outputs = task.loss(model, task.collate(task.encode(records)))
    loss.backward()
    assert torch.isfinite(loss) and len(task.decode(outputs)) == 4
