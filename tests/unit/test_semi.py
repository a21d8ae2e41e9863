"""Semi-supervised learning: few-label splits, the FixMatch / pseudo-label losses, the μ·B draws, the views."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from dapeng.config import DataConfig, SemiConfig
from dapeng.data.augment import RA_OPS, cutout, rand_augment
from dapeng.data.splits import Splits, few_label_split, load_splits
from dapeng.errors import ConfigError, DataError
from dapeng.tasks.semi import (
    LABELLED_KEY,
    STRONG,
    WEAK,
    ImageViews,
    SemiSupervisedTask,
    TextViews,
    attach_semi,
    confident_targets,
    unlabeled_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def labelled(n_per_class=(30, 20, 10)):
    """Records with an `id`, classes a, b, c in the given sizes, interleaved."""
    out = []
    for label, n in zip("abc", n_per_class):
        out += [{"id": f"{label}{i}", "text": f"{label} text {i}", "label": label} for i in range(n)]
    return out[::2] + out[1::2]


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % 2
        pixels = rng.integers(0, 60, (8, 8)).astype(np.uint8)
        pixels[:, :4] += np.uint8(150 * (1 - label))  # class 0: bright left half; class 1: bright right half
        pixels[:, 4:] += np.uint8(150 * label)
        out.append({"image": pixels, "label": str(label)})
    return out


# ----------------------------------------------------------------------------- few-label splits


def test_labels_per_class_keeps_exactly_k_per_class_reproducibly_and_drops_the_rest_labels():
    records = labelled()
    kept, pool = few_label_split(records, per_class=5, seed=3)
    assert Counter(r["label"] for r in kept) == {"a": 5, "b": 5, "c": 5}
    assert all("label" not in r for r in pool) and len(pool) == len(records) - 15
    assert {r["id"] for r in kept} | {r["id"] for r in pool} == {r["id"] for r in records}
    assert not {r["id"] for r in kept} & {r["id"] for r in pool}
    assert few_label_split(records, per_class=5, seed=3) == (kept, pool)
    assert {r["id"] for r in few_label_split(records, per_class=5, seed=4)[0]} != {r["id"] for r in kept}
    assert all("label" in r for r in records)  # the caller's records are not changed


def test_labelled_fraction_is_stratified_and_bad_sizes_are_one_line_errors():
    kept, pool = few_label_split(labelled(), fraction=0.2, seed=0)
    assert Counter(r["label"] for r in kept) == {"a": 6, "b": 4, "c": 2} and len(pool) == 48
    with pytest.raises(DataError, match="class 'c' has only 10 training records, not 11"):
        few_label_split(labelled(), per_class=11)


def test_load_splits_makes_the_pool_from_train_only(tmp_path):
    path = tmp_path / "train.csv"
    rows = labelled((40, 40, 40))
    path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    cfg = DataConfig(train=path, labels_per_class=4, seed=1)
    splits = load_splits(cfg)
    assert Counter(r["label"] for r in splits.train) == {"a": 4, "b": 4, "c": 4}
    assert len(splits.unlabeled) == 120 - 12 - 12 - 12 and all("label" not in r for r in splits.unlabeled)
    assert {r["text"] for r in splits.eval + splits.test}.isdisjoint(r["text"] for r in splits.unlabeled)
    assert load_splits(cfg) == splits
    assert load_splits(DataConfig(train=path)).unlabeled == ()
    with pytest.raises(ConfigError, match="both set"):
        load_splits(DataConfig(train=path, labels_per_class=4, labelled_fraction=0.1))


# ----------------------------------------------------------------------------- the losses


def test_confident_targets_apply_the_threshold():
    probs = torch.tensor([[0.96, 0.02, 0.02], [0.5, 0.3, 0.2], [0.02, 0.95, 0.03], [0.1, 0.1, 0.8]])
    targets, mask = confident_targets(probs.log(), 0.95)
    assert targets.tolist() == [0, 0, 1, 2]
    assert mask.tolist() == [True, False, True, False]
    assert confident_targets(probs.log(), 0.5)[1].tolist() == [True, True, True, True]


def test_fixmatch_loss_is_zero_without_confident_items_and_the_strong_views_ce_with_them():
    weak = torch.tensor([[0.0, 0.0], [0.1, 0.0], [9.0, 0.0], [0.0, 8.0]])  # rows 2 and 3 are confident
    strong = torch.randn(4, 2, requires_grad=True)
    loss, mask = unlabeled_loss(weak[:2], strong[:2], 0.95)
    assert loss.item() == 0.0 and not mask.any()
    loss, mask = unlabeled_loss(weak, strong, 0.95)
    assert mask.tolist() == [False, False, True, True]
    expected = F.cross_entropy(strong[2:], torch.tensor([0, 1]), reduction="sum") / 4  # 1/(μB): over every row
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert strong.grad[:2].abs().sum() == 0 and strong.grad[2:].abs().sum() > 0
    # pseudo-labelling: one view is its own target, with no gradient through the target
    logits = weak.clone().requires_grad_(True)
    own, _ = unlabeled_loss(logits, logits, 0.95)
    assert own.item() == pytest.approx(F.cross_entropy(weak[2:], torch.tensor([0, 1]), reduction="sum").item() / 4)


# ----------------------------------------------------------------------------- the wrapper


def image_task(records):
    from dapeng.tasks.image_classification import ImageClassificationTask

    task = ImageClassificationTask(channels_last=False)
    task.setup(records)
    return task


def wrapped(method="fixmatch", ratio=3, n_pool=20, threshold=0.95, weight=1.0):
    records = images(8 + n_pool)
    task = image_task(records[:8])
    pool = [{"image": r["image"]} for r in records[8:]]
    items = task.encode(records[:8])
    spec = SemiConfig(method=method, ratio=ratio, threshold=threshold, weight=weight)
    semi, facts = attach_semi(spec, task, items, pool)
    return semi, task, items, facts


def test_a_training_batch_draws_ratio_times_b_unlabeled_items_in_two_views():
    semi, task, items, facts = wrapped(ratio=3)
    assert isinstance(semi, SemiSupervisedTask) and semi.labels == task.labels  # the rest is the task's
    assert facts == {"semi_method": "fixmatch"} and all(LABELLED_KEY in it for it in items)
    batch = semi.collate(items[:4])
    assert batch["images"].shape[0] == 4 and batch["labels"].shape == (4,)
    assert batch[WEAK]["images"].shape == (12, 1, 8, 8) and batch[STRONG]["images"].shape == (12, 1, 8, 8)
    assert "labels" not in batch[WEAK] and not torch.equal(batch[WEAK]["images"], batch[STRONG]["images"])
    torch.manual_seed(0)
    first = semi.collate(items[:4])
    torch.manual_seed(0)
    assert torch.equal(semi.collate(items[:4])[STRONG]["images"], first[STRONG]["images"])  # seeded draws
    eval_items = task.encode(images(4, seed=1))
    assert set(semi.collate(eval_items)) == {"images", "labels"}  # evaluation batches draw nothing
    pseudo, *_ = wrapped(method="pseudo_label", ratio=2)
    drawn = pseudo.collate(items[:4])
    assert drawn[WEAK]["images"].shape[0] == 8 and STRONG not in drawn


def test_loss_adds_the_weighted_unlabeled_loss_in_training_only():
    from dapeng.models import create_model

    semi, task, items, _ = wrapped(ratio=2, threshold=0.01, weight=0.5)  # every unlabeled item counts
    model = create_model("mlp", {**task.model_kwargs(), "hidden": 16, "layers": 1})
    batch = semi.collate(items[:4])
    torch.manual_seed(1)
    total, outputs = semi.loss(model.train(), batch)
    torch.manual_seed(1)
    labelled, _ = task.loss(model, batch)
    with torch.no_grad():
        weak = model(batch[WEAK]["images"])
    strong = model(batch[STRONG]["images"])
    assert total.item() == pytest.approx(labelled.item() + 0.5 * unlabeled_loss(weak, strong, 0.01)[0].item(), rel=1e-5)
    assert semi.fit_facts() == {"unlabeled_confident_fraction": 1.0, "unlabeled_confident_fraction_end": 1.0}
    assert outputs["logits"].shape == (4, 2)
    model.eval()
    assert semi.loss(model, batch)[0].item() == pytest.approx(task.loss(model, batch)[0].item())


def test_views_of_images_and_texts():
    pool = [{"image": torch.full((1, 8, 8), float(i), dtype=torch.uint8)} for i in range(1, 4)]
    weak, strong = ImageViews(pool, hflip=False, crop_padding=0, ops=0, cutout=0.0).views([2, 0], with_strong=True)
    assert [float(v["image"].mean()) for v in weak] == [3.0, 1.0] and torch.equal(strong[0]["image"], weak[0]["image"])
    texts = [{"input_ids": torch.tensor([i])} for i in range(3)]
    copies = [[{"input_ids": torch.tensor([10 * c + i])} for i in range(3)] for c in (1, 2)]
    weak, strong = TextViews(texts, copies).views([2, 1], with_strong=True)
    assert [int(v["input_ids"]) for v in weak] == [2, 1]
    assert [int(v["input_ids"]) % 10 for v in strong] == [2, 1] and all(int(v["input_ids"]) >= 10 for v in strong)
    with pytest.raises(ConfigError, match="semi.text.copies"):
        TextViews(texts, []).views([0], with_strong=True)


def test_attach_refuses_no_pool_a_non_classifier_and_many_processes():
    semi, task, items, _ = wrapped()
    with pytest.raises(ConfigError, match="no unlabeled pool"):
        attach_semi(SemiConfig(), task, items, [])
    with pytest.raises(ConfigError, match="one process"):
        attach_semi(SemiConfig(), task, items, [{"image": images(1)[0]["image"]}], world_size=2)

    class Tagger:
        name = "token-classification"
        from dapeng.tasks.token_classification import TokenClassificationTask

        capabilities = TokenClassificationTask.capabilities

    with pytest.raises(ConfigError, match="no text or image classifier"):
        attach_semi(SemiConfig(), Tagger(), [], [{"tokens": ["a"]}])


def test_text_fixmatch_encodes_perturbed_copies_of_the_pool():
    from dapeng.tasks.text_classification import TextClassificationTask

    records = labelled((10, 10, 10))
    task = TextClassificationTask(tokenizer="word")
    task.setup(records[:9])
    pool = [{"text": f"text {i} of the pool"} for i in range(5)]
    spec = SemiConfig(text={"copies": 3, "drop": 0.5, "synonym": 0.0, "seed": 0})
    items = task.encode(records[:9])
    semi, _ = attach_semi(spec, task, items, pool)
    assert len(semi.views.copies) == 3 and all(len(copy) == 5 for copy in semi.views.copies)
    batch = semi.collate(items[:2])
    assert batch[WEAK]["input_ids"].shape[0] == 14 and batch[STRONG]["input_ids"].shape[0] == 14


# ----------------------------------------------------------------------------- RandAugment and Cutout


def test_rand_augment_keeps_shapes_and_pixel_range_and_every_op_runs():
    x = torch.rand(16, 3, 12, 12)
    gen = torch.Generator().manual_seed(0)
    y = rand_augment(x, ops=3, generator=gen)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.allclose(x, y)
    assert torch.equal(rand_augment(x, ops=0), x)
    ones, zero, sign = torch.ones(4), torch.zeros(4), torch.ones(4)
    for name, op in RA_OPS.items():
        out = op(x[:4], ones, sign, 0.0)
        assert out.shape == (4, 3, 12, 12) and out.min() >= -1e-6 and out.max() <= 1 + 1e-6, name
        if name in ("identity", "brightness", "contrast", "color", "sharpness", "solarize", "rotate"):
            assert torch.allclose(op(x[:4], zero, sign, 0.0), x[:4], atol=1e-5), name  # magnitude 0: no change


def test_cutout_blanks_one_square_per_image():
    x = torch.ones(6, 1, 10, 10)
    y = cutout(x, 0.4, fill=0.0, generator=torch.Generator().manual_seed(0))
    blanked = (y == 0).sum((1, 2, 3))
    assert blanked.max() == 16 and (blanked > 0).all()  # 4 x 4, less where it falls off the border


# ----------------------------------------------------------------------------- end to end


def _write_image_folder(root, records):
    from PIL import Image

    for i, r in enumerate(records):
        folder = root / r["label"]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(r["image"]).save(folder / f"{i}.png")


def _config(tmp_path, precision, method="fixmatch"):
    data = tmp_path / "images"
    if not data.exists():
        _write_image_folder(data, images(80))
    config = {
        "task": "image-classification", "task_options": {"channels_last": False},
        "data": {"train": str(data), "format": "imagefolder", "labels_per_class": 5},
        "model": {"name": "mlp", "kwargs": {"hidden": 16, "layers": 1}},
        "semi": {"method": method, "ratio": 2, "threshold": 0.6},
        "train": {"epochs": 2, "batch_size": 4, "precision": precision, "log_every": 1},
    }
    path = tmp_path / f"{method}-{precision}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_train_records_the_few_label_split_in_metrics_and_card(tmp_path, capsys):
    from dapeng.cli.main import main

    run = tmp_path / "run"
    assert main(["train", str(_config(tmp_path, "fp32")), "--out", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train = result["metrics"]["train"]
    assert train["train_records"] == 10 and train["labels_per_class"] == 5 and train["semi_method"] == "fixmatch"
    assert train["unlabeled_records"] == 64 - 10  # 80 images, 8 eval and 8 test held out first
    assert 0.0 <= train["unlabeled_confident_fraction"] <= 1.0 and "unlabeled_confident_fraction_end" in train
    assert result["steps"] == 6  # 2 epochs of the 10 labelled items in batches of 4
    card = (run / "model" / "card.md").read_text()
    assert "5 per class (10 records; 54 more without their labels)" in card and "FixMatch" in card
    assert yaml.safe_load((run / "config.yaml").read_text())["semi"]["ratio"] == 2


def test_bf16_pseudo_label_trains_and_predicts(tmp_path):
    import dapeng
    from dapeng.config import load_config
    from dapeng.runner import train

    result = train(load_config(_config(tmp_path, "bf16", "pseudo_label")), tmp_path / "run", progress=False)
    assert result["metrics"]["train"]["precision"] == "bf16" and np.isfinite(result["metrics"]["test"]["loss"])
    predicted = dapeng.load(tmp_path / "run").predict([images(1)[0]["image"]])
    assert predicted[0]["label"] in ("0", "1")


def test_semi_section_is_strict():
    from dapeng.config import validate_config

    base = {"task": "image-classification", "data": {"dataset": "digits"}, "model": {"name": "mlp"}}
    assert validate_config({**base, "semi": {}}).semi == SemiConfig()
    with pytest.raises(ConfigError, match="semi.method"):
        validate_config({**base, "semi": {"method": "mixmatch"}})
    with pytest.raises(ConfigError, match="semi.ratio"):
        validate_config({**base, "semi": {"ratio": 0}})
    assert Splits([], [], []).unlabeled == ()
