"""Batch invariance: a text's prediction alone equals its prediction inside a mixed-length batch.

Every registered text-classification model, at tiny sizes and with each of its poolings, in
fp32 (probabilities within 1e-3), under bf16 autocast over fp32 weights (how `precision:
bf16` trains and how `Pipeline(..., precision="bf16")` runs) and with bf16 weights (what
`dapeng.load(..., precision="bf16")` and `dapeng serve --precision bf16` run), both within 1e-2.
The models get a confident head (logits with a standard deviation of 6, as a trained
classifier's spread): an untrained head puts every probability near 1/K, where no
difference can show.
"""

import json

import numpy as np
import pytest
import torch

from dapeng.models import BUILTIN_MODELS, MODELS
from dapeng.pipeline import Pipeline
from dapeng.tasks import TASKS

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "the", "a", "dull", "moving", "acting", "score"]
LENGTHS = (1, 2, 3, 5, 8, 13, 21, 34, 4, 17, 1, 9)  # words; the longest pads the batch to 36 tokens
TOLERANCE = {"fp32": 1e-3, "bf16": 1e-2, "bf16-weights": 1e-2}
LOGIT_STD = 6.0

RNN = {"embed_dim": 8, "hidden": 6}
TRANSFORMER = {"hidden": 16, "layers": 2, "heads": 2, "intermediate": 32, "max_positions": 64}
TEXT_CLASSIFIERS = {
    "textcnn": [{"embed_dim": 8, "filters": 4}, {"embed_dim": 8, "filters": 4, "pooling": "mean"}],
    "rnn": [RNN, {**RNN, "bidirectional": False, "pooling": "mean"}],
    "gru": [{**RNN, "layers": 2}, {**RNN, "pooling": "max"}],
    "lstm": [{**RNN, "layers": 2}, {**RNN, "bidirectional": False}, {**RNN, "pooling": "mean"},
             {**RNN, "pooling": "max"}],
    "transformer": [TRANSFORMER, {**TRANSFORMER, "pooling": "cls"}, {**TRANSFORMER, "pooling": "max"},
                    {**TRANSFORMER, "norm_first": True}],
}
NOT_TEXT_CLASSIFIERS = {"mlp", "lenet", "resnet", "lm", "seq2seq", "bilstm-crf", "prodlda", "vqa", "clip"}  # the tagger: test_tagger_model.py
CASES = [(name, kwargs) for name, variants in TEXT_CLASSIFIERS.items() for kwargs in variants]


def _case_id(case: tuple[str, dict]) -> str:
    name, kwargs = case
    return "-".join([name, *(f"{k}={v}" for k, v in kwargs.items() if k in ("pooling", "bidirectional",
                                                                          "norm_first", "layers"))])


def _texts() -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, n)) for n in LENGTHS]


def _task(**options):
    records = [{"text": t, "label": ["neg", "pos", "mid"][i % 3]} for i, t in enumerate(_texts() * 3)]
    task = TASKS.create("text-classification", tokenizer="word", vocab_size=64, max_length=64, **options)
    task.setup(records)
    return task


def _confident_pipeline(name: str, kwargs: dict, task, precision: str) -> Pipeline:
    torch.manual_seed(0)
    model = MODELS.create(name, **task.model_kwargs(), **kwargs).eval()
    items = task.encode([{"text": t} for t in _texts()])
    with torch.no_grad():
        spread = model(**task.collate(items)).std()
        model.head.weight.mul_(LOGIT_STD / spread)
        model.head.bias.mul_(LOGIT_STD / spread)
    if precision == "bf16-weights":
        model = model.to(torch.bfloat16)
    return Pipeline(model, task, precision="fp32" if precision == "fp32" else "bf16", device="cpu")


def _alone_and_batched(pipe: Pipeline, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, K) probabilities of each text in one mixed-length batch, and of each text alone."""
    items = pipe.task.encode([{"text": t} for t in texts])
    assert len({len(it["input_ids"]) for it in items}) > 5  # a mixed-length batch
    with pipe.inference():
        batched = pipe.forward(pipe.task.collate(items))["logits"]
        alone = torch.cat([pipe.forward(pipe.task.collate([it]))["logits"] for it in items])
    return batched.float().softmax(-1), alone.float().softmax(-1)


def _assert_invariant(batched: torch.Tensor, alone: torch.Tensor, tolerance: float) -> None:
    assert torch.equal(batched.argmax(-1), alone.argmax(-1))
    worst = (batched - alone).abs().max().item()
    assert worst <= tolerance, f"probabilities alone and batched differ by {worst:.2e} (> {tolerance})"


def test_every_registered_model_is_either_a_text_classifier_here_or_not_one():
    assert set(BUILTIN_MODELS) == set(TEXT_CLASSIFIERS) | NOT_TEXT_CLASSIFIERS


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("precision", list(TOLERANCE))
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_prediction_alone_equals_prediction_in_a_mixed_length_batch(case, precision):
    name, kwargs = case
    pipe = _confident_pipeline(name, kwargs, _task(), precision)
    _assert_invariant(*_alone_and_batched(pipe, _texts()), TOLERANCE[precision])


@pytest.mark.usefixtures("one_thread")
def test_a_tokenizer_json_that_pads_by_itself_does_not_make_predictions_batch_dependent(tmp_path):
    from dapeng.data.tokenizers import train_tokenizer

    tokenizer = train_tokenizer(_texts(), "word", vocab_size=64)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest text of each encode_batch
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer.to_str())
    task = _task(tokenizer_path=str(path))
    pipe = _confident_pipeline("transformer", TRANSFORMER, task, "fp32")
    texts = _texts()
    # through `predict`, which tokenizes what it is given together, as the server's batches are
    batched = pipe.predict(texts, batch_size=len(texts))
    alone = [pipe.predict(text) for text in texts]
    probabilities = [[list(p["probabilities"].values()) for p in ps] for ps in (batched, alone)]
    _assert_invariant(*torch.tensor(probabilities), TOLERANCE["fp32"])
    assert json.loads(task.state()["tokenizer"])["padding"] is None  # the Artifact's tokenizer.json too


def test_bf16_masked_mean_pooling_is_the_fp32_mean_rounded_once():
    from dapeng.layers.pooling import pool_sequence

    x = torch.randn(3, 37, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    keep = torch.arange(37) < torch.tensor([[37], [20], [3]])  # (3, 37): 37, 20 and 3 real tokens
    pooled = pool_sequence(x, keep, "mean")
    assert pooled.dtype == torch.bfloat16
    assert torch.equal(pooled, pool_sequence(x.float(), keep, "mean").bfloat16())
