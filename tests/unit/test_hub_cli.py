"""`dapeng hub list | show | add | rm` on a temporary store; bad names exit 2 with one line."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from dapeng.cli.main import main


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DAPENG_HOME", str(tmp_path / "home"))
    return tmp_path


def artifact(path):
    (path / "model").mkdir(parents=True)
    save_file({"w": np.zeros(3, np.float32)}, str(path / "model" / "model.safetensors"))
    meta = {"format": 1, "dapeng": "0.1.0", "task": "text-classification", "model": {"name": "mlp", "kwargs": {}},
            "labels": ["a", "b"], "metrics": {"test": {"accuracy": 0.9}}}
    (path / "model" / "dapeng.json").write_text(json.dumps(meta))
    return path


def test_hub_cli_add_list_show_rm(home, capsys):
    run = artifact(home / "run")
    assert main(["hub", "add", str(run), "--name", "clf"]) == 0
    assert main(["hub", "add", str(run / "model"), "--name", "clf"]) == 0
    assert "added clf@2" in capsys.readouterr().out
    assert main(["hub", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["version"]) for m in listed["models"]] == [("clf", 1), ("clf", 2)]
    assert {"minilm-l6", "smollm2-135m"} <= set(listed["builtin"])
    assert main(["hub", "show", "clf@1"]) == 0
    out = capsys.readouterr().out
    assert "## Metrics" in out and "0.9" in out
    assert main(["hub", "rm", "clf"]) == 0
    assert "removed clf@1, clf@2" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["hub", "show", "../etc"], ["hub", "rm", "nope"], ["hub", "show", "a/b@1"]])
def test_hub_cli_errors_are_one_line_exit_2(home, capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dapeng hub: error:") and "\n" not in err
