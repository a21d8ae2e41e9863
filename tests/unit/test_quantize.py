"""Quantization (int8 dynamic / weight-only / static) and pruning: save → load → identical outputs, the gate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import dapeng
from dapeng.compress.prune import prune_artifact, prune_model, sparsity_of
from dapeng.compress.quantize import quantize, quantize_artifact
from dapeng.errors import DapengError, ModelError
from dapeng.hub.artifact import load_artifact, save_artifact
from dapeng.layers.quantized import (
    GroupwiseEmbedding,
    GroupwiseLinear,
    Int8Conv2d,
    Int8Embedding,
    Int8Linear,
    prepare_quantized,
)
from dapeng.models import MODELS
from dapeng.tasks import TASKS

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "the", "a", "very", "not"]


def _records(n):
    rng = np.random.default_rng(0)
    return [{"text": " ".join(rng.choice(WORDS, 2 + i % 7)), "label": ["neg", "pos"][i % 2]} for i in range(n)]


def _save(path, name, kwargs, task_name, task):
    torch.manual_seed(0)
    full = {**task.model_kwargs(), **kwargs}
    model = MODELS.create(name, **full)
    return save_artifact(path, model=model, model_name=name, model_kwargs=full, task_name=task_name,
                         task_state=task.state())


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A tiny Transformer classifier (vocabulary of 300 rows: its embedding is quantized too)."""
    records = _records(64)
    task = TASKS.create("text-classification", tokenizer="word", vocab_size=300, max_length=32)
    task.setup(records)
    path = _save(tmp_path_factory.mktemp("text") / "model", "transformer",
                 {"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32, "max_positions": 64, "vocab_size": 300},
                 "text-classification", task)
    artifact = load_artifact(path)
    return artifact, artifact.task.encode(records)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    rng = np.random.default_rng(0)
    records = [{"image": rng.integers(0, 256, (12, 12), dtype=np.uint8), "label": str(i % 3)} for i in range(48)]
    task = TASKS.create("image-classification")
    task.setup(records)
    path = _save(tmp_path_factory.mktemp("image") / "model", "resnet", {"widths": [4, 8], "blocks": [1, 1]},
                 "image-classification", task)
    artifact = load_artifact(path)
    return artifact, artifact.task.encode(records)


def _logits(model, task, items):
    with torch.no_grad():
        return task.predict(model.eval(), task.collate(items))["logits"]


@pytest.mark.parametrize(("fixture", "method"), [
    ("text", "int8-dynamic"), ("text", "int8-weight-only"), ("image", "int8-dynamic"),
    ("image", "int8-weight-only"), ("image", "int8-static"),
])
def test_quantized_artifact_reloads_with_identical_outputs(fixture, method, request, tmp_path):
    artifact, items = request.getfixturevalue(fixture)
    result = quantize_artifact(artifact, method, items, tmp_path / "q", calibration=items[:16], max_drop=100.0)
    meta = json.loads((tmp_path / "q" / "dapeng.json").read_text())
    assert meta["quantization"]["method"] == method and meta["parent"] == str(artifact.path)
    assert result["size_mb"]["after"] < result["size_mb"]["before"]

    reloaded = load_artifact(tmp_path / "q")
    kinds = {type(m) for m in reloaded.model.modules()}
    assert Int8Linear in kinds
    assert (Int8Embedding in kinds) == (fixture == "text") and (Int8Conv2d in kinds) == (method == "int8-static")
    quantized, _ = quantize(artifact.model, method, artifact.task, items[:16])
    torch.testing.assert_close(_logits(reloaded.model, reloaded.task, items[:8]),
                               _logits(quantized, artifact.task, items[:8]), atol=0, rtol=0)
    # close to the float model, and usable through the Pipeline like any Artifact
    torch.testing.assert_close(_logits(reloaded.model, reloaded.task, items[:8]),
                               _logits(artifact.model, artifact.task, items[:8]), atol=0.1, rtol=0)
    pipe = dapeng.load(tmp_path / "q")
    if fixture == "text":
        assert pipe.predict("good film")["label"] in ("neg", "pos")


def test_max_drop_refuses_to_write_and_names_both_figures(text, tmp_path):
    artifact, items = text
    # no model loses more than -100 points: every quantized model fails this gate
    with pytest.raises(DapengError, match=r"int8-dynamic loses .* \(\d+\.\d\d → \d+\.\d\d\), more than --max-drop -100"):
        quantize_artifact(artifact, "int8-dynamic", items, tmp_path / "q", max_drop=-100.0)
    assert not (tmp_path / "q").exists()


def test_static_needs_calibration(image, tmp_path):
    artifact, items = image
    with pytest.raises(DapengError, match="calibration"):
        quantize_artifact(artifact, "int8-static", items, tmp_path / "q")


def test_a_quantized_artifact_naming_a_missing_layer_fails_in_one_line(text, tmp_path):
    artifact, items = text
    quantize_artifact(artifact, "int8-dynamic", items, tmp_path / "q", max_drop=100.0)
    meta_path = tmp_path / "q" / "dapeng.json"
    meta = json.loads(meta_path.read_text())
    meta["quantization"]["layers"]["no.such.layer"] = "linear"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="no layer 'no.such.layer'"):
        load_artifact(tmp_path / "q")


def test_prepare_quantized_rebuilds_the_structure_before_weights_load():
    torch.manual_seed(0)
    model = MODELS.create("lenet", in_channels=1, image_size=28, num_labels=3).eval()
    quantized, spec = quantize(model, "int8-weight-only")
    fresh = prepare_quantized(MODELS.create("lenet", in_channels=1, image_size=28, num_labels=3), spec)
    fresh.load_state_dict(quantized.state_dict())
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(fresh.eval()(x), quantized(x))
    assert all(t.dtype == torch.int8 for k, t in quantized.state_dict().items() if k.endswith("qweight"))


@pytest.mark.parametrize(("name", "structured"), [("lstm", False), ("textcnn", False), ("textcnn", True)])
def test_pruning_reaches_the_sparsity_and_is_permanent(name, structured):
    torch.manual_seed(0)
    model = MODELS.create(name, vocab_size=50, num_labels=2, embed_dim=8)
    pruned, masks = prune_model(model, 0.5, structured)
    assert sparsity_of(pruned)["pruned_weights"] == pytest.approx(0.5, abs=0.02)
    assert not any(k.endswith(("_orig", "_mask")) for k in pruned.state_dict())
    assert sparsity_of(model)["pruned_weights"] < 0.01  # the original is left alone
    if structured:  # whole filters: a row of the weight is all zeros or has none
        for name_, mask in masks.items():
            rows = mask.flatten(1).all(1) | ~mask.flatten(1).any(1)
            assert bool(rows.all()), name_
    ids = torch.randint(1, 50, (3, 6))
    assert pruned.eval()(ids, torch.ones(3, 6, dtype=torch.bool)).shape == (3, 2)


def test_pruned_weights_stay_zero_through_recovery_finetuning(text, tmp_path):
    artifact, items = text
    result = prune_artifact(artifact, 0.5, tmp_path / "p", train_items=items, eval_items=items[:16],
                            finetune_epochs=1, trainer_kwargs={"batch_size": 16, "lr": 1e-3, "log_every": 1000})
    assert result["sparsity"]["pruned_weights"] == pytest.approx(0.5, abs=0.02)
    assert set(result["accuracy"]) == {"before", "pruned", "finetuned"}
    reloaded = load_artifact(tmp_path / "p")
    assert sparsity_of(reloaded.model)["pruned_weights"] == pytest.approx(0.5, abs=0.02)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as `dapeng train` leaves it: config.yaml over CSV files, and RUN/model."""
    import csv

    from dapeng.config import dump_config, validate_config

    run = tmp_path_factory.mktemp("run")
    for split, n in (("train", 64), ("eval", 32)):
        with (run / f"{split}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, ["text", "label"])
            writer.writeheader()
            writer.writerows(_records(n))
    cfg = validate_config({
        "task": "text-classification", "task_options": {"tokenizer": "word", "vocab_size": 300, "max_length": 32},
        "data": {"train": str(run / "train.csv"), "eval": str(run / "eval.csv")},
        "model": {"name": "textcnn", "kwargs": {"embed_dim": 16, "filters": 8}},
        "train": {"epochs": 1, "batch_size": 16},
    })
    (run / "config.yaml").write_text(dump_config(cfg))
    task = TASKS.create("text-classification", tokenizer="word", vocab_size=300, max_length=32)
    task.setup(_records(64))
    _save(run / "model", "textcnn", {"embed_dim": 16, "filters": 8}, "text-classification", task)
    return run


def test_cli_quantize_refuses_with_exit_2_and_one_line(run_dir, tmp_path, capsys):
    from dapeng.cli.main import main

    assert main(["quantize", str(run_dir), "--method", "int8-dynamic", "--max-drop", "-100",
                 "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "more than --max-drop -100" in err and "→" in err
    assert not (tmp_path / "q").exists()


def test_cli_quantize_then_predict_and_prune(run_dir, tmp_path, capsys):
    from dapeng.cli.main import main

    assert main(["quantize", str(run_dir), "--method", "int8-weight-only", "--max-drop", "100",
                 "--out", str(tmp_path / "q"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "int8-weight-only" and 0.0 <= result["after"] <= 1.0
    assert main(["predict", str(tmp_path / "q"), "--json", "good film"]) == 0
    assert '"label"' in capsys.readouterr().out
    assert main(["prune", str(run_dir), "--sparsity", "0.5", "--structured", "--finetune-epochs", "0",
                 "--out", str(tmp_path / "p"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["structured"] and result["sparsity"]["pruned_weights"] == pytest.approx(0.5, abs=0.05)


def test_cli_export_writes_a_checked_onnx_model(run_dir, tmp_path, capsys):
    from dapeng.cli.main import main

    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "e"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checked"]["max_abs_diff"] <= 1e-4 and (tmp_path / "e" / "model.onnx").is_file()
    assert (tmp_path / "e" / "dapeng.json").is_file() and (tmp_path / "e" / "tokenizer.json").is_file()


def test_cli_quantize_with_onnxruntime_exports_first_then_serves_the_graph(run_dir, tmp_path, capsys):
    import shutil

    from dapeng.cli.main import main

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["quantize", str(run), "--backend", "onnxruntime", "--method", "int8-dynamic", "--max-drop", "100",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["backend"] == "onnxruntime" and result["model"] == str(run / "onnx-int8-dynamic")
    assert (run / "export-onnx" / "model.onnx").is_file()  # the float export it quantized, checked on real inputs
    assert main(["predict", str(run / "onnx-int8-dynamic"), "--json", "good film"]) == 0
    assert '"label"' in capsys.readouterr().out
    assert main(["quantize", str(run), "--backend", "onnxruntime", "--method", "int8-weight-only"]) == 2
    assert "--backend onnxruntime has no int8-weight-only" in capsys.readouterr().err


@pytest.mark.parametrize(("method", "hidden", "layer", "table"), [
    ("int8-weight-only", 16, Int8Linear, Int8Embedding),
    ("int8-groupwise", 32, GroupwiseLinear, GroupwiseEmbedding),
])
def test_an_int8_lm_decodes_as_its_dequantized_float_twin(method, hidden, layer, table, monkeypatch, tmp_path):
    """Decoding steps run the int8 kernels (tied head included, no fp32 table built); prefill runs aten's.

    The twin holds the dequantized weights in fp32: the same products, so greedy decoding agrees;
    the quantized model saved and reloaded as an Artifact gives the same tokens.
    """
    from _tiny_decoder import tiny_model

    model = tiny_model(300, hidden=hidden)
    quantized, spec = quantize(model, method)
    assert isinstance(quantized.embed, table) and quantized.lm_head is None  # the tied head stays tied
    assert all(isinstance(quantized.get_submodule(name), (layer, table)) for name in spec["layers"])
    twin = tiny_model(300, hidden=hidden)
    twin.load_state_dict({**model.state_dict(), **{
        f"{name}.weight": module.weight for name, module in quantized.named_modules()
        if isinstance(module, (layer, table))}})
    save_artifact(tmp_path / "q", model=quantized, model_name="lm", model_kwargs={
        "vocab_size": 300, "hidden": hidden, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 2 * hidden,
        "max_positions": 64}, task_name="causal-lm", task_state={}, quantization=spec, precision="fp32")
    reloaded = load_artifact(tmp_path / "q").model
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))

    def no_fp32_table(_self):
        raise AssertionError("decoding dequantized the int8 embedding table")

    monkeypatch.setattr(table, "weight", property(no_fp32_table))
    with torch.inference_mode():
        features = torch.randn(3, hidden)
        torch.testing.assert_close(quantized.forward_head(features), twin.forward_head(features), rtol=1e-4, atol=1e-4)
        got = quantized.generate(ids, max_new_tokens=12, temperature=0.0)
        want = twin.generate(ids, max_new_tokens=12, temperature=0.0)
        again = reloaded.generate(ids, max_new_tokens=12, temperature=0.0)
    assert torch.equal(got, want) and torch.equal(again, got)


def test_groupwise_int8_stores_weights_on_a_4_bit_block_grid_exactly():
    """What a 4-bit GGUF with 32-blocks (SmolLM2's Q4_1) dequantizes to: 16 affine levels per block."""
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 16, (24, 96), generator=g).float()
    levels[:, ::32], levels[:, 1::32] = 0, 15  # each block reaches both ends, as Q4_1's quantizer makes it
    d, m = torch.rand(24, 3, 1, generator=g) / 10, torch.randn(24, 3, 1, generator=g) / 10
    linear = nn.Linear(96, 24, bias=False)
    with torch.no_grad():
        linear.weight.copy_((levels.reshape(24, 3, 32) * d + m).reshape(24, 96))
    grouped = GroupwiseLinear.from_float(linear)
    torch.testing.assert_close(grouped.weight, linear.weight, rtol=0, atol=1e-6)
    per_channel = Int8Linear.from_float(linear, "weight-only")
    assert (per_channel.weight - linear.weight).abs().max() > 100 * (grouped.weight - linear.weight).abs().max()
