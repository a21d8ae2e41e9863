"""`dapeng --help/--version`, `dapeng train` and `dapeng eval`: light imports, one-line errors, exit codes."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from _trainer_toy import make_records, register

from dapeng.cli.main import main
from dapeng.data.splits import Splits

torch.set_num_threads(1)
register()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dapeng", *args], capture_output=True, text=True, timeout=120)


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from dapeng.cli.main import main\n"
        "for argv in (['--help'], ['train', '--help'], ['eval', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'numpy', 'safetensors', 'tensorboard') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "HEAVY []" in out
    assert "dapeng train examples/" in out  # the help shows an example


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("dapeng ")


def toy_config(tmp_path, **train):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({
        "task": "toy-classification", "data": {}, "model": {"name": "toy-mlp", "kwargs": {"hidden": 8}},
        "train": {"epochs": 2, "batch_size": 8, "precision": "fp32", "optimizer": {"lr": 0.05}, **train},
    }))
    return path


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    path = toy_config(tmp_path, optimizer={"name": "adamx"})
    result = run_cli("train", str(path), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "dapeng train: error: config key train.optimizer.name: 'adamx' is not one of sgd, adam, adamw"
    )
    assert "Traceback" not in result.stderr
    debug = run_cli("--debug", "train", str(path), "--out", str(tmp_path / "run"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_unknown_model_name_names_the_choices(tmp_path, capsys):
    assert main(["train", str(toy_config(tmp_path)), "--set", "model.name=toy-mpl", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dapeng train: error: config key model.name: 'toy-mpl' is not one of ")
    assert "toy-mlp" in err and "did you mean toy-mlp?" in err and "\n" not in err


def test_bad_override_and_missing_run(tmp_path):
    result = run_cli("train", str(toy_config(tmp_path)), "--set", "train.epochs=zero")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "train.epochs" in result.stderr
    result = run_cli("eval", str(tmp_path / "no-run"))
    assert result.returncode == 2 and "not a run directory" in result.stderr


@pytest.fixture
def toy_splits(monkeypatch):
    records = make_records(120)
    monkeypatch.setattr("dapeng.runner.load_splits", lambda cfg: Splits(records[:80], records[80:100], records[100:]))


def test_train_then_eval_in_process(tmp_path, capsys, toy_splits):
    run = tmp_path / "run"
    assert main(["train", str(toy_config(tmp_path)), "--out", str(run), "--json", "--set", "train.log_every=2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 20 and result["metrics"]["test"]["accuracy"] > 0.8
    for name in ("config.yaml", "model/dapeng.json", "model/model.safetensors", "model/card.md",
                 "checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl", "metrics.json", "curves.png"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["log_every"] == 2 and saved["train"]["schedule"]["name"] == "constant"
    assert set(json.loads((run / "metrics.json").read_text())) == {"train", "eval", "test"}

    assert main(["eval", str(run), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    # eval defaults to the run's own precision (fp32 here), whatever `auto` means on this machine
    assert evaluated["precision"] == result["metrics"]["train"]["precision"] == "fp32"
    assert evaluated["metrics"] == pytest.approx(result["metrics"]["test"], rel=1e-5)

    # the same --out again is refused; --resume of a finished run is a no-op that rewrites the report
    assert main(["train", str(toy_config(tmp_path)), "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", str(toy_config(tmp_path)), "--out", str(run), "--resume", "--set", "train.log_every=2"]) == 0
    assert "20 steps" in capsys.readouterr().out
    assert main(["train", str(toy_config(tmp_path, epochs=3)), "--out", str(run), "--resume"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def text_run_config(tmp_path, model="transformer", **kwargs):
    rows = ["text,label"] + [f"{w} film,{lab}" for w, lab in (("good", "pos"), ("bad", "neg"))] * 4
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump({
        "task": "text-classification", "task_options": {"tokenizer": "word"},
        "data": {"train": str(tmp_path / "train.csv")},
        "model": {"name": model, "kwargs": {"hidden": 16, "heads": 2, "layers": 1, **kwargs} if model == "transformer"
                  else kwargs},
        "train": {"epochs": 1, "batch_size": 4, "precision": "fp32"},
    }))
    return path


@pytest.mark.parametrize(("model", "kwargs", "fragments"), [
    ("transformer", {"pooling": "foo"}, ("model.kwargs.pooling: 'foo'", "choose cls, mean, max or none")),
    ("transformer", {"activation": "foo"}, ("model.kwargs.activation: 'foo'", "gelu")),
    ("transformer", {"dropout": 1.5}, ("model.kwargs.dropout: 1.5", "between 0 and 1")),
    ("transformer", {"heads": 0}, ("model.kwargs.heads: 0", "a zero where a size is needed")),
    ("transformer", {"intermediate": -2}, ("model.kwargs.intermediate: -2", "negative dimension")),
    ("lstm", {"layers": 0}, ("model.kwargs.layers: 0", "num_layers")),
    ("lstm", {"pooling": "foo"}, ("model.kwargs.pooling: 'foo'", "choose last, mean, max or none")),
    ("textcnn", {"pooling": "avg"}, ("model.kwargs.pooling: 'avg'", "choose max, mean or none")),
])
def test_bad_model_kwarg_value_is_one_line_naming_the_key(tmp_path, capsys, model, kwargs, fragments):
    run = tmp_path / "run"
    assert main(["train", str(text_run_config(tmp_path, model, **kwargs)), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dapeng train: error: config key model.kwargs") and "\n" not in err
    for fragment in fragments:
        assert fragment in err, err


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("failure", ["unreadable data", "bad model kwarg"])
def test_a_failed_start_leaves_the_run_directory_as_it_was(tmp_path, capsys, failure):
    cfg = text_run_config(tmp_path, pooling="foo") if failure == "bad model kwarg" else text_run_config(tmp_path)
    if failure == "unreadable data":  # the file exists (the config checks that), its rows don't parse
        (tmp_path / "train.csv").write_text("text,label\ngood film,pos,extra,columns\n")
    fresh = tmp_path / "fresh"
    assert main(["train", str(cfg), "--out", str(fresh)]) == 2
    assert not fresh.exists()
    used = tmp_path / "used"  # a folder with the user's files, and an earlier run's TensorBoard events
    (used / "tb").mkdir(parents=True)
    (used / "tb" / "events.out").write_bytes(b"earlier")
    (used / "notes.txt").write_text("mine")
    before = tree(used)
    assert main(["train", str(cfg), "--out", str(used)]) == 2
    assert tree(used) == before
    capsys.readouterr()
