"""`dapeng models list | show | graph` through the command line entry point."""

import json

import pytest

from dapeng.cli.main import main


def test_models_list(capsys):
    assert main(["models", "list", "--json"]) == 0
    names = json.loads(capsys.readouterr().out)
    assert {"mlp", "lenet", "resnet", "textcnn", "rnn", "gru", "lstm", "transformer", "lm", "seq2seq"} <= set(names)


def test_models_show_counts_parameters_and_flops(capsys):
    assert main(["models", "show", "mlp", "--set", "hidden=8", "--set", "layers=1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # 784·8 + 8 weights and biases, then 8·10 + 10
    assert summary["total_params"] == 784 * 8 + 8 + 8 * 10 + 10
    # two matmuls, 2 FLOPs per multiply-add
    assert summary["flops_per_image"] == 2 * (784 * 8 + 8 * 10)
    assert [row["output_shape"] for row in summary["layers"] if row["name"] == "head"] == [[1, 10]]


def test_models_show_text_model_table(capsys):
    args = ["models", "show", "transformer", "--set", "hidden=16", "--set", "heads=2", "--set", "layers=1",
            "--set", "intermediate=32", "--set", "vocab_size=100", "--seq-len", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert 'Model: "transformer"' in out and "FLOPs per token" in out
    assert "EncoderBlock" in out and "(1, 8, 16)" in out


def test_models_show_rejects_an_unknown_argument(capsys):
    assert main(["models", "show", "lstm", "--set", "hiden=3"]) == 2
    assert "no argument 'hiden'" in capsys.readouterr().err
    assert main(["models", "show", "transformer", "--set", "heads=0"]) == 2  # was a ZeroDivisionError traceback
    err = capsys.readouterr().err.strip()
    assert "--set heads: 0 doesn't build model 'transformer'" in err and "\n" not in err


@pytest.mark.parametrize("suffix", ["svg", "png"])
def test_models_graph_renders_an_image(tmp_path, suffix, capsys):
    out = tmp_path / f"graph.{suffix}"
    args = ["models", "graph", "lm", "--set", "layers=1", "--set", "hidden=16", "--set", "heads=2",
            "--set", "kv_heads=1", "--set", "intermediate=32", "--set", "vocab_size=50", "--out", str(out)]
    assert main(args) == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") if suffix == "png" else b"<svg" in data
    assert "nodes" in capsys.readouterr().out


def test_models_graph_tensorboard_and_bad_suffix(tmp_path, capsys):
    tb = tmp_path / "tb"
    assert main(["models", "graph", "lenet", "--set", "channels=[2,4]", "--tensorboard", str(tb)]) == 0
    assert list(tb.glob("events.out.tfevents.*"))
    assert main(["models", "graph", "lenet", "--out", str(tmp_path / "g.pdf")]) == 2
    assert "use --out graph.svg or graph.png" in capsys.readouterr().err
