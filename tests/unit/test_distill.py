"""Knowledge distillation: the soft-target loss, the task wrapper, and a teacher → student run."""

import json

import pytest
import torch
import yaml

from dapeng.compress.distill import DistillTask, distillation_loss
from dapeng.config import RunConfig, load_config
from dapeng.errors import ConfigError, NotFoundError
from dapeng.runner import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    """Teacher logits are cached under $DAPENG_HOME: keep the tests' out of the user's cache."""
    monkeypatch.setenv("DAPENG_HOME", str(tmp_path / "home"))

POSITIVE = ["a joy", "great fun", "wonderful cast", "a delight", "sharp and funny", "moving and smart"]
NEGATIVE = ["a mess", "dull and long", "boring plot", "a chore", "flat and lifeless", "tedious and silly"]


def test_kl_loss_is_zero_at_the_teacher_and_pulls_the_student_towards_it():
    teacher = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    assert distillation_loss(teacher.clone(), teacher, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.zeros(2, 3, requires_grad=True)
    loss = distillation_loss(student, teacher, temperature=2.0)
    loss.backward()
    assert loss.item() > 0
    # a gradient step raises the student's logit where the teacher's is highest
    assert (student.grad.argmin(-1) == teacher.argmax(-1)).all()
    # T² scaling: the soft loss keeps its size as T grows (for small logits, ≈ constant)
    small = teacher / 10
    ratio = distillation_loss(torch.zeros(2, 3), small, 4.0) / distillation_loss(torch.zeros(2, 3), small, 2.0)
    assert ratio.item() == pytest.approx(1.0, rel=0.1)
    assert distillation_loss(student, teacher, kind="mse").item() == pytest.approx((teacher**2).mean().item())
    with pytest.raises(ValueError, match="kl or mse"):
        distillation_loss(student, teacher, kind="ce")


class _Task:
    labels = ["a", "b"]

    def collate(self, items):
        return {"x": torch.stack([it["x"] for it in items]), "labels": torch.stack([it["label"] for it in items])}

    def loss(self, model, batch):
        logits = model(batch["x"])
        return torch.nn.functional.cross_entropy(logits, batch["labels"]), {"logits": logits}

    def state(self):
        return {"labels": self.labels}


def test_distill_task_mixes_the_losses_while_training_only():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    items = [{"x": torch.randn(4), "label": torch.tensor(i % 2), "teacher_logits": torch.tensor([3.0, -3.0])}
             for i in range(6)]
    task = DistillTask(_Task(), alpha=0.25, temperature=2.0)
    batch = task.collate(items)
    assert batch["teacher_logits"].shape == (6, 2)
    hard, outputs = _Task().loss(model, batch)
    mixed, _ = task.loss(model, batch)
    soft = distillation_loss(outputs["logits"], batch["teacher_logits"], 2.0)
    assert mixed.item() == pytest.approx(0.75 * hard.item() + 0.25 * soft.item(), rel=1e-5)
    model.eval()  # evaluation: the plain task loss, comparable with an undistilled run
    assert task.loss(model, batch)[0].item() == pytest.approx(hard.item(), rel=1e-5)
    # items without teacher logits (eval, test) batch as the task's own
    assert "teacher_logits" not in task.collate([{k: v for k, v in it.items() if k != "teacher_logits"} for it in items])
    assert task.state() == {"labels": ["a", "b"]} and task.labels == ["a", "b"]


def _config(tmp_path, model, kwargs, **extra):
    rows = [(f"{t} {i}", "up") for i in range(5) for t in POSITIVE] + [
        (f"{t} {i}", "down") for i in range(5) for t in NEGATIVE]
    data = tmp_path / "reviews.csv"
    data.write_text("review,verdict\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return RunConfig.model_validate({
        "task": "text-classification",
        "task_options": {"tokenizer": "word", "max_length": 16},
        "data": {"train": str(data), "text_column": "review", "label_column": "verdict", "eval_fraction": 0.2,
                 "test_fraction": 0.2},
        "model": {"name": model, "kwargs": kwargs},
        "train": {"epochs": 6, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 0.01}, "monitor": "eval/accuracy",
                  "precision": "fp32"},
        **extra,
    })


def test_a_student_learns_from_a_teacher_run_with_its_own_tokenizer(tmp_path):
    teacher_cfg = _config(tmp_path, "textcnn", {"embed_dim": 16, "filters": 8, "kernel_sizes": [2, 3], "dropout": 0.0})
    teacher = train(teacher_cfg.model_copy(update={"task_options": {"tokenizer": "wordpiece", "vocab_size": 60,
                                                                    "max_length": 16}}),
                    tmp_path / "teacher", progress=False)
    student_cfg = _config(tmp_path, "lstm", {"embed_dim": 16, "hidden": 16},
                          distill={"teacher": str(tmp_path / "teacher"), "alpha": 0.7, "temperature": 2.0,
                                   "transfer": {"copies": 2, "drop": 0.2, "synonym": 0.0}})
    out = train(student_cfg, tmp_path / "student", progress=False)
    facts = out["metrics"]["train"]
    assert facts["transfer_records"] == 2 * 36  # 60 reviews, 12 of them eval and 12 test
    assert 0.0 <= facts["teacher_transfer_agreement"] <= 1.0
    assert facts["teacher"] == str(tmp_path / "teacher")
    assert facts["teacher_eval_accuracy"] == pytest.approx(teacher["metrics"]["eval"]["accuracy"])
    assert out["metrics"]["test"]["accuracy"] >= 0.75
    card = (tmp_path / "student" / "model" / "card.md").read_text()
    assert "Distilled from the teacher" in card
    # the student's Artifact is a plain model: no teacher needed to run it
    meta = json.loads((tmp_path / "student" / "model" / "dapeng.json").read_text())
    assert meta["model"]["name"] == "lstm"


def test_a_teacher_with_other_labels_or_no_teacher_is_one_config_error(tmp_path):
    with pytest.raises(NotFoundError, match="not found"):
        train(_config(tmp_path, "lstm", {"embed_dim": 8, "hidden": 8}, distill={"teacher": str(tmp_path / "nope")}),
              tmp_path / "s1", progress=False)
    # a teacher trained on other labels
    cfg = _config(tmp_path, "textcnn", {"embed_dim": 8, "filters": 4, "kernel_sizes": [2], "dropout": 0.0})
    rows = "review,verdict\n" + "".join(f"{t} {i},{'pos' if t in POSITIVE else 'neg'}\n"
                                        for i in range(3) for t in POSITIVE + NEGATIVE)
    other = tmp_path / "other.csv"
    other.write_text(rows)
    train(cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": other}),
                                 "train": cfg.train.model_copy(update={"epochs": 1})}),
          tmp_path / "other-teacher", progress=False)
    with pytest.raises(ConfigError, match="does not know the labels"):
        train(_config(tmp_path, "lstm", {"embed_dim": 8, "hidden": 8},
                      distill={"teacher": str(tmp_path / "other-teacher")}), tmp_path / "s2", progress=False)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**_config(tmp_path, "lstm", {}).model_dump(mode="json"), "distill": {"alpha": 0.5}}))
    with pytest.raises(ConfigError, match="distill.teacher"):
        load_config(path)


def test_teacher_logits_are_cached_keyed_by_teacher_and_records(tmp_path):
    from dapeng.compress.distill import cached_logits
    from dapeng.hub.artifact import load_artifact

    cfg = _config(tmp_path, "textcnn", {"embed_dim": 8, "filters": 4, "kernel_sizes": [2], "dropout": 0.0})
    train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})}), tmp_path / "t", progress=False)
    teacher = load_artifact(tmp_path / "t" / "model")
    records = [{"text": "a joy 1"}, {"text": "boring plot 2"}, {"text": "a chore"}]
    first = cached_logits(teacher, records)
    files = list((tmp_path / "home" / "cache" / "distill").glob("*.safetensors"))
    assert len(files) == 1 and first.shape == (3, 2)
    assert torch.equal(cached_logits(teacher, records), first)
    files[0].write_bytes(b"not safetensors")  # a damaged cache is recomputed, not trusted
    assert torch.equal(cached_logits(teacher, records), first)
    cached_logits(teacher, records[:2])  # other records: another entry
    assert len(list((tmp_path / "home" / "cache" / "distill").glob("*.safetensors"))) == 2


def test_distill_verb_takes_the_teacher_and_weights_from_the_command_line(tmp_path, capsys):
    from dapeng.cli.main import main

    cfg = _config(tmp_path, "textcnn", {"embed_dim": 8, "filters": 4, "kernel_sizes": [2], "dropout": 0.0})
    train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2})}), tmp_path / "t", progress=False)
    student = tmp_path / "student.yaml"
    raw = _config(tmp_path, "lstm", {"embed_dim": 8, "hidden": 8}).model_dump(mode="json")
    raw["train"]["epochs"] = 1
    student.write_text(yaml.safe_dump(raw))
    assert main(["distill", str(student), "--out", str(tmp_path / "nothing")]) == 2  # no teacher anywhere
    assert "no teacher" in capsys.readouterr().err
    args = ["distill", str(student), "--teacher", str(tmp_path / "t"), "--alpha", "0.9", "--loss", "mse",
            "--out", str(tmp_path / "s"), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["train"]["teacher"] == str(tmp_path / "t")
    saved = yaml.safe_load((tmp_path / "s" / "config.yaml").read_text())
    assert {k: saved["distill"][k] for k in ("teacher", "alpha", "temperature", "loss")} == {
        "teacher": str(tmp_path / "t"), "alpha": 0.9, "temperature": 2.0, "loss": "mse"}


def test_transfer_set_perturbs_each_text_deterministically_and_keeps_labels():
    from dapeng.compress.distill import transfer_set

    records = [{"text": "a good movie with a great cast", "label": "up", "_source": "r.csv:2"},
               {"text": "a bad film and a terrible plot", "label": "down"}]
    copies = transfer_set(records, copies=3, drop=0.2, synonym=0.3, seed=1)
    assert len(copies) == 6
    assert [c["label"] for c in copies] == ["up", "down"] * 3
    assert copies[0]["_source"] == "r.csv:2 (copy 1)" and "_source" not in copies[1]
    assert transfer_set(records, copies=3, drop=0.2, synonym=0.3, seed=1) == copies
    assert any(c["text"] != r["text"] for c, r in zip(copies, records * 3))
    words = {w for r in records for w in r["text"].split()}
    assert all(set(c["text"].split()) <= words for c in copies)  # synonyms come from the records' own words
    assert transfer_set(records, copies=1, drop=0.0, synonym=0.0) == [
        {**records[0], "_source": "r.csv:2 (copy 1)"}, records[1]]
    # n-gram sampling: every copy a run of 1-5 consecutive words of its text
    phrases = transfer_set(records, copies=4, drop=0.0, synonym=0.0, ngram=1.0)
    for c, r in zip(phrases, records * 4):
        assert 1 <= len(c["text"].split()) <= 5 and c["text"] in r["text"]
    assert len({c["text"] for c in phrases}) > 2
    with pytest.raises(ConfigError, match="text records"):
        transfer_set([{"image": 1, "label": "a"}], copies=1)
