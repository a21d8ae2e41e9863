"""contrastive: NT-Xent against a hand computation, its symmetry, the text views, and the projection head
staying out of the backbone a later run starts from."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dapeng.models import MODELS
from dapeng.tasks.contrastive import Contrastive, in_batch_negatives, nt_xent


def test_nt_xent_equals_a_hand_computed_value_on_two_pairs():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 2.0]])  # normalised: (1,1)/√2 and (0,1)
    t = 0.5
    loss, _ = nt_xent(a, b, t)
    s = 1 / math.sqrt(2)
    # z = [a0, a1, b0, b1]; cosine similarities of each view to the three others, twin first
    rows = [
        (s, [0.0, s, 0.0]),        # a0: twin b0; others a1, b0, b1
        (1.0, [0.0, s, 1.0]),      # a1: twin b1
        (s, [s, s, s]),            # b0: twin a0; others a0, a1, b1
        (1.0, [0.0, 1.0, s]),      # b1: twin a1; others a0, a1, b0
    ]
    by_hand = np.mean([-twin / t + math.log(sum(math.exp(c / t) for c in others)) for twin, others in rows])
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_nt_xent_is_symmetric_in_its_views():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    torch.testing.assert_close(nt_xent(a, b, 0.2)[0], nt_xent(b, a, 0.2)[0])
    # twins that match exactly score lower than strangers
    assert nt_xent(a, a, 0.2)[0] < nt_xent(a, b, 0.2)[0]


def test_in_batch_negatives_is_cross_entropy_over_the_positives():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    loss, logits = in_batch_negatives(a, b, 0.05)
    cos = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1) / 0.05
    torch.testing.assert_close(logits, cos)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(cos, torch.arange(4)))


def _images(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 255, (8, 8), dtype=np.uint8), "label": str(i % 2)} for i in range(n)]


def test_the_projection_head_is_absent_from_the_backbone_a_later_run_starts_from(tmp_path):
    from dapeng.hub.artifact import save_artifact
    from dapeng.hub.init import load_init, skipped_weights
    from dapeng.tasks.image_classification import ImageClassificationTask

    task = Contrastive(projection_dim=16)
    task.setup(_images(24))
    kwargs = {**task.model_kwargs(), "channels": (2, 4), "hidden": 8}
    model = MODELS.create("lenet", **kwargs)
    assert model.head.out_features == 16  # the projection head
    path = save_artifact(tmp_path / "simclr", model=model, model_name="lenet", model_kwargs=kwargs,
                         task_name="contrastive", task_state=task.state(), precision="fp32")
    classifier = ImageClassificationTask()
    classifier.setup(_images(24))
    fine, built = load_init(str(path), "lenet", {}, classifier)
    assert built["num_labels"] == 2 and fine.head.out_features == 2
    assert sorted(skipped_weights(fine)) == ["head.bias", "head.weight"]
    for name, weight in fine.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(weight, model.state_dict()[name])


def test_image_training_batch_learns_and_the_probe_reports():
    torch.manual_seed(0)
    task = Contrastive(projection_dim=8)
    records = _images(32)
    task.setup(records)
    model = MODELS.create("lenet", **task.model_kwargs(), channels=(2, 4), hidden=8, dropout=0.0)
    batch = task.collate(task.encode(records))
    model.train()
    loss, _ = task.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.conv1[0].weight.grad.abs().sum() > 0
    model.eval()
    metric = task.metric()
    loss_a, outputs = task.loss(model, batch)
    loss_b, _ = task.loss(model, batch)
    assert loss_a == loss_b  # evaluation views are fixed
    metric.update(outputs, batch)
    values = metric.compute()
    assert 0 <= values["retrieval_accuracy"] <= 1 and 0 <= values["linear_probe_accuracy"] <= 1


def test_sentence_views_pairs_and_dropout():
    texts = ["a good film", "a dull plot", "witty and fun", "slow and boring"] * 4
    for records, views in (([{"text": t, "positive": t + " indeed"} for t in texts], "pairs"),
                           ([{"text": t} for t in texts], "dropout")):
        task = Contrastive(views=views, text={"max_length": 16, "vocab_size": 60}, projection=False)
        task.setup(records)
        assert task.capabilities.input == "text" and task.capabilities.supports("embed")
        model = MODELS.create("transformer", **task.model_kwargs(), hidden=16, layers=1, heads=2,
                              intermediate=32, max_positions=16, dropout=0.1)
        model.train()
        loss, outputs = task.loss(model, task.collate(task.encode(records)))
        assert torch.isfinite(loss) and outputs["similarities"].shape == (16, 16)
        with torch.no_grad():  # as under Pipeline.embed
            assert task.embed(model.eval(), ["a good film"]).shape == (1, 16)


def test_tiny_bf16_train_and_predict(tmp_path):
    from dapeng.pipeline import Pipeline

    torch.manual_seed(0)
    task = Contrastive(projection_dim=8)
    records = _images(16)
    task.setup(records)
    model = MODELS.create("lenet", **task.model_kwargs(), channels=(2, 4), hidden=8)
    from dapeng.train.trainer import Trainer

    trainer = Trainer(model, task, precision="bf16", epochs=1, batch_size=8)
    summary = trainer.fit(task.encode(records), task.encode(records))
    assert math.isfinite(summary["loss"])
    out = Pipeline(model, Contrastive.from_state(task.state()), precision="bf16").predict(
        [r["image"] for r in records[:2]])
    assert len(out) == 2 and len(out[0]) == 8 and all(math.isfinite(v) for v in out[0])
