"""masked-lm: the masking recipe (rates, 80/10/10, at least one per row, whole words, specials) and its
use as a backbone for a later classifier."""

from __future__ import annotations

import logging

import pytest
import torch

from dapeng.models import MODELS
from dapeng.tasks.masked_lm import IGNORE, MaskedLM, mask_tokens

MASK, VOCAB = 4, 1000
RANDOM_IDS = torch.arange(5, VOCAB)  # ids 0-4 are the specials


def _batch(rows: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (rows, length), generator=g)
    maskable = torch.ones(rows, length, dtype=torch.bool)
    return ids, maskable


def test_mask_rate_and_80_10_10_split_on_a_large_sample():
    ids, maskable = _batch(400, 250)
    corrupted, labels = mask_tokens(ids, maskable, MASK, RANDOM_IDS, generator=torch.Generator().manual_seed(1))
    picked = labels != IGNORE
    assert picked.float().mean().item() == pytest.approx(0.15, abs=0.005)
    assert torch.equal(labels[picked], ids[picked])  # the targets are the original tokens
    n = picked.sum().item()
    as_mask = (corrupted[picked] == MASK).sum().item() / n
    kept = (corrupted[picked] == ids[picked]).sum().item() / n
    random = 1 - as_mask - kept
    assert as_mask == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1, abs=0.01)  # (a random draw of the same id counts as kept: 1 in 995)
    assert random == pytest.approx(0.1, abs=0.01)
    assert torch.equal(corrupted[~picked], ids[~picked])  # the rest is untouched
    assert corrupted.min() >= 4  # never a special other than [MASK], never padding


def test_every_row_gets_a_masked_token_even_a_one_token_row():
    ids = torch.tensor([[2, 7, 3, 0, 0, 0]] * 64 + [[2, 7, 8, 9, 10, 3]] * 64)  # [CLS] w [SEP] + padding
    maskable = (ids >= 5)
    for seed in range(5):
        _, labels = mask_tokens(ids, maskable, MASK, RANDOM_IDS, generator=torch.Generator().manual_seed(seed))
        assert ((labels != IGNORE).sum(1) >= 1).all()
        assert (labels[:64, 1] == 7).all()  # the one-token rows: their one word


def test_a_batch_of_one_token_rows_gives_a_finite_loss():
    """transformers#16711: a batch with no masked token gave loss 0/0 = NaN."""
    task = MaskedLM(tokenizer="word", vocab_size=50, max_length=8)
    task.setup([{"text": w} for w in ("a", "b", "c", "d")])
    model = MODELS.create("transformer", **task.model_kwargs(), hidden=16, layers=1, heads=2, intermediate=32,
                          max_positions=8)
    batch = task.collate(task.encode([{"text": "a"}, {"text": "b"}]))
    for mode in (model.train, model.eval):
        mode()
        loss, outputs = task.loss(model, batch)
        assert torch.isfinite(loss) and outputs["tokens"] == 2


def test_whole_word_masking_masks_every_piece_of_a_picked_word():
    # 200 rows of 40 words, each word 1-3 pieces
    g = torch.Generator().manual_seed(0)
    word_ids = torch.repeat_interleave(torch.arange(40).expand(200, 40), torch.randint(1, 4, (40,), generator=g),
                                       dim=1)
    word_ids[:, 0] = -1  # [CLS]
    ids = torch.randint(5, VOCAB, word_ids.shape, generator=g)
    maskable = word_ids >= 0
    _, labels = mask_tokens(ids, maskable, MASK, RANDOM_IDS, word_ids=word_ids, generator=g)
    picked = labels != IGNORE
    for row in range(200):
        for word in word_ids[row].unique().tolist():
            if word < 0:
                continue
            at = word_ids[row] == word
            assert picked[row, at].all() or not picked[row, at].any(), (row, word)
    rate = picked.float().sum() / maskable.sum()
    assert rate.item() == pytest.approx(0.15, abs=0.02)


def test_specials_and_padding_are_never_masked():
    task = MaskedLM(vocab_size=200, max_length=12, whole_word=True)
    texts = ["the film was good and the plot was witty", "a dull story", "fun"]
    task.setup([{"text": t} for t in texts * 5])
    batch = task.collate(task.encode([{"text": t} for t in texts]))
    specials = torch.isin(batch["input_ids"], torch.tensor(task.special_ids))
    assert specials.any()
    for seed in range(20):
        _, labels = task.corrupt(batch, torch.Generator().manual_seed(seed))
        assert (labels[specials] == IGNORE).all()
        assert (labels[~batch["attention_mask"]] == IGNORE).all()
    assert task.mask_id not in task.random_ids().tolist()


def test_long_texts_become_windows_and_embed_keeps_one_per_text():
    task = MaskedLM(tokenizer="word", vocab_size=50, max_length=6)
    text = " ".join(["a", "b", "c", "d"] * 5)  # 20 words: windows of 4 between [CLS] and [SEP]
    task.setup([{"text": text}])
    items = task.encode([{"text": text}])
    assert len(items) == 5 and all(len(it["input_ids"]) == 6 for it in items)
    assert len(task.encode([{"text": text}], windows=False)) == 1


def test_the_pretrained_encoder_initialises_a_classifier_and_the_mlm_head_stays_behind(tmp_path, caplog):
    from dapeng.hub.artifact import save_artifact
    from dapeng.hub.init import load_init, skipped_weights
    from dapeng.tasks.text_classification import TextClassificationTask

    texts = ["a good film", "a bad film", "the plot was dull", "witty and fun"] * 3
    task = MaskedLM(vocab_size=80, max_length=16)
    task.setup([{"text": t} for t in texts])
    kwargs = {**task.model_kwargs(), "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32, "max_positions": 16}
    mlm = MODELS.create("transformer", **kwargs)
    path = save_artifact(tmp_path / "mlm", model=mlm, model_name="transformer", model_kwargs=kwargs,
                         task_name="masked-lm", task_state=task.state(), precision="fp32")
    classifier_task = TextClassificationTask(max_length=16)
    classifier_task.setup([{"text": t, "label": str(i % 2)} for i, t in enumerate(texts)])
    with caplog.at_level(logging.INFO, logger="dapeng.hub.init"):
        model, built = load_init(str(path), "transformer", {}, classifier_task)
    assert model.mlm is None and built["mlm_head"] is False and built["num_labels"] == 2
    skipped = skipped_weights(model)
    assert skipped and all(k.startswith(("mlm.", "head.")) for k in skipped)
    assert any(k.startswith("mlm.") for k in skipped) and "left behind" in caplog.text
    torch.testing.assert_close(model.embeddings.word.weight, mlm.embeddings.word.weight)
    torch.testing.assert_close(model.layers[0].ffn.up.weight, mlm.layers[0].ffn.up.weight)
    # the classifier encodes with the pretrained tokenizer
    assert classifier_task.tokenizer.get_vocab() == task.tokenizer.get_vocab()


def test_tiny_bf16_train_and_predict(tmp_path):
    import json

    from dapeng.config import validate_config
    from dapeng.pipeline import load
    from dapeng.runner import train

    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": f"the film number {i} was good and witty"}) + "\n" for i in range(24)))
    cfg = validate_config({
        "task": "masked-lm", "task_options": {"vocab_size": 60, "max_length": 16},
        "data": {"train": str(data), "format": "jsonl", "unlabeled": True},
        "model": {"name": "transformer", "kwargs": {"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32,
                                                    "max_positions": 16}},
        "train": {"epochs": 1, "batch_size": 8, "precision": "bf16"},
    })
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["metrics"]["train"]["precision"] == "bf16"
    for value in result["metrics"]["eval"].values():
        assert value == value  # not NaN
    vectors = load(tmp_path / "run", precision="bf16").embed(["a good film", "a film"])
    assert vectors.shape == (2, 16) and torch.isfinite(torch.from_numpy(vectors)).all()
