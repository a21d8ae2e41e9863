"""End to end through the command line and `dapeng.load` with the real built-in models (cached after first use)."""

import json

import numpy as np
import pytest

import dapeng
from dapeng.cli.main import main

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.data, pytest.mark.slow]


def test_generate_cli_streams_and_chat(capsys):
    assert main(["generate", "smollm2-135m", "--prompt", "The capital of France is", "--max-new-tokens", "4",
                 "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
    assert main(["generate", "smollm2-135m", "--chat", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12", "--precision", "fp32", "--json"]) == 0
    assert "Paris" in json.loads(capsys.readouterr().out)["text"]


def test_generate_python_api_stream_equals_text():
    pipe = dapeng.load("smollm2-135m", precision="fp32")
    text = pipe.generate("Water boils at", max_new_tokens=8, temperature=0.0)
    assert "".join(pipe.generate("Water boils at", max_new_tokens=8, stream=True)) == text
    sampled = [pipe.generate("Once upon a time", max_new_tokens=6, temperature=0.9, top_p=0.9, seed=3) for _ in "ab"]
    assert sampled[0] == sampled[1]


def test_embed_cli_and_api(tmp_path, capsys):
    assert main(["embed", "minilm-l6", "a gripping film", "a thrilling movie", "tax forms are due", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    vectors = np.array(out["embeddings"])
    assert out["shape"] == [3, 384]
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2
    api = dapeng.load("minilm-l6", precision="fp32").embed(["a gripping film"])
    np.testing.assert_allclose(api[0], vectors[0], atol=1e-5)
    assert main(["embed", "minilm-l6", "x", "--out", str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (1, 384)


def test_causal_lm_trains_through_dapeng_train(tmp_path, capsys):
    text = tmp_path / "poem.txt"
    text.write_text("the cat sat on the mat\nthe dog sat on the log\n" * 20)
    config = tmp_path / "lm.yaml"
    config.write_text(
        "task: causal-lm\n"
        "task_options: {block_size: 32, vocab_size: 300}\n"
        f"data: {{train: {text}, eval: {text}, format: text}}\n"
        "model: {name: lm, kwargs: {hidden: 32, layers: 2, heads: 4, kv_heads: 2, intermediate: 64}}\n"
        "train: {epochs: 30, batch_size: 4, optimizer: {lr: 0.003}, precision: fp32, log_every: 5}\n"
    )
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["eval"]["perplexity"] < 3.0
    assert dapeng.load(tmp_path / "run", precision="fp32").generate("the cat sat", max_new_tokens=4).startswith(" on")
