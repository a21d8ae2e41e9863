"""The BiLSTM(-CRF) tagger with its character CNN, and the transformer as a (CRF) token tagger."""

import pytest
import torch
from torch import nn

from dapeng.errors import ModelError
from dapeng.hub.artifact import load_artifact, save_artifact
from dapeng.hub.init import load_init
from dapeng.layers.charcnn import CharCNN
from dapeng.layers.crf import CRF
from dapeng.models import MODELS, create_model

torch.set_num_threads(1)

V, K, CHARS = 30, 4, 10
TINY = {"vocab_size": V, "num_labels": K, "embed_dim": 8, "hidden": 8, "dropout": 0.0,
        "char_vocab_size": CHARS, "char_embed_dim": 4, "char_filters": 6}


def _tagger(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return MODELS.create("bilstm-crf", **{**TINY, **overrides}).eval()


def _batch(seed: int = 0, b: int = 3, t: int = 5, c: int = 4):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([t, 2, 4][:b])
    mask = torch.arange(t) < lengths.unsqueeze(1)
    ids = torch.randint(1, V, (b, t), generator=g).masked_fill(~mask, 0)
    chars = torch.randint(1, CHARS, (b, t, c), generator=g)
    chars[:, :, -1] = 0  # every word a character shorter than the widest
    return ids, mask, chars.masked_fill(~mask.unsqueeze(-1), 0)


def test_emissions_shape_and_crf_attribute():
    model = _tagger()
    ids, mask, chars = _batch()
    assert model(ids, mask, chars).shape == (3, 5, K)
    assert isinstance(model.crf, CRF) and model.crf.num_tags == K
    plain = _tagger(crf=False, char_vocab_size=0)
    assert plain.crf is None and plain(ids, mask).shape == (3, 5, K)
    assert not any(k.startswith(("crf.", "chars.")) for k in plain.state_dict())


def test_characters_tell_apart_words_with_the_same_id():
    model = _tagger()
    ids, mask, chars = _batch()
    ids = torch.where(mask, 1, 0)  # every word is the unknown word
    other = chars.clone()
    other[0, 0, :3] = torch.tensor([5, 6, 7])
    with torch.no_grad():
        a, b = model(ids, mask, chars), model(ids, mask, other)
    assert not torch.allclose(a[0, 0], b[0, 0])


def test_character_padding_width_changes_nothing():
    model = _tagger()
    ids, mask, chars = _batch()
    wider = torch.cat([chars, torch.zeros(3, 5, 3, dtype=torch.long)], dim=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, wider), model(ids, mask, chars))


def test_char_cnn_ignores_padding_characters_and_gives_empty_words_zeros():
    torch.manual_seed(0)
    cnn = CharCNN(CHARS, 4, 6, kernel=3)
    chars = torch.tensor([[[3, 4, 0, 0], [0, 0, 0, 0]]])
    out = cnn(chars)
    assert out.shape == (1, 2, 6)
    torch.testing.assert_close(out[0, 0], cnn(chars[:, :1, :2])[0, 0])
    assert out[0, 1].abs().max() == 0


def test_missing_char_ids_is_one_line_error():
    model = _tagger()
    ids, mask, chars = _batch()
    with pytest.raises(ModelError, match="char_ids"):
        model(ids, mask)
    with pytest.raises(ModelError, match="char_ids"):
        model(ids, mask, chars[:2])


def test_reset_head_resizes_the_crf_and_drops_its_constraints():
    model = _tagger()
    model.crf.constrain_bio(["O", "B-X", "I-X", "B-Y"])
    model.reset_head(5)
    ids, mask, chars = _batch()
    assert model(ids, mask, chars).shape[-1] == 5
    assert model.crf.num_tags == 5 and model.crf.transition_penalty.abs().max() == 0


def test_bilstm_crf_learns_a_toy_tagging_task():
    # the tag of a word depends on its id and on the previous word's tag: CRF territory
    model = _tagger(hidden=16).train()
    ids, mask, chars = _batch(b=3, t=5)
    tags = torch.where(mask, ids % K, -100)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        model.crf.nll(model(ids, mask, chars), tags, mask).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        decoded = model.crf.decode(model(ids, mask, chars), mask)
    assert decoded == [row[: int(n)].tolist() for row, n in zip(tags, mask.sum(1))]


def test_tagger_trains_under_bf16_autocast():
    model = _tagger().train()
    ids, mask, chars = _batch()
    tags = torch.where(mask, ids % K, -100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, mask, chars)
        loss = model.crf.nll(out, tags, mask)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_artifact_round_trip_keeps_crf_constraints(tmp_path):
    model = _tagger()
    model.crf.constrain_bio(["O", "B-X", "I-X", "B-Y"])
    from dapeng.tasks import TASKS

    task = TASKS.create("text-classification")
    task.setup([{"text": "a b", "label": "x"}, {"text": "b", "label": "y"}])
    path = save_artifact(tmp_path / "tagger", model=model, model_name="bilstm-crf", model_kwargs=TINY,
                         task_name="text-classification", task_state=task.state())
    loaded = load_artifact(path).model
    ids, mask, chars = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, chars), model(ids, mask, chars))
    assert torch.equal(loaded.crf.transition_penalty, model.crf.transition_penalty)
    assert loaded.crf.transition_penalty.min() < -1000


ENCODER = {"vocab_size": 40, "num_labels": 3, "hidden": 16, "layers": 2, "heads": 2, "intermediate": 32,
           "max_positions": 16, "dropout": 0.0}


def test_transformer_tags_subwords_and_carries_an_optional_crf():
    torch.manual_seed(0)
    model = MODELS.create("transformer", **ENCODER, pooling="none", crf=True).eval()
    ids = torch.randint(3, 40, (2, 6))
    assert model(ids).shape == (2, 6, 3) and isinstance(model.crf, CRF)
    assert MODELS.create("transformer", **ENCODER).crf is None
    with pytest.raises(ModelError, match="pooling='none'"):
        create_model("transformer", {**ENCODER, "crf": True}, given=["crf"])


def test_fine_tuning_a_pretrained_encoder_with_a_fresh_crf(tmp_path):
    from dapeng.tasks import TASKS

    torch.manual_seed(0)
    source = MODELS.create("transformer", **ENCODER)
    task = TASKS.create("text-classification", tokenizer="word", vocab_size=40)
    task.setup([{"text": "a b c", "label": "x"}, {"text": "b c", "label": "y"}])
    path = save_artifact(tmp_path / "enc", model=source, model_name="transformer", model_kwargs=ENCODER,
                         task_name="text-classification", task_state=task.state())
    model, kwargs = load_init(str(path), "transformer", {"pooling": "none", "crf": True}, task)
    assert kwargs["crf"] is True and isinstance(model.crf, CRF)
    for name, value in source.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_sentence_alone_equals_it_in_a_mixed_length_batch(precision):
    model = _tagger(crf=True)
    ids, mask, chars = _batch(t=7, c=6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        batched = model(ids, mask, chars).float()
        alone = [model(ids[b : b + 1, :n], mask[b : b + 1, :n], chars[b : b + 1, :n]).float()[0]
                 for b, n in enumerate(mask.sum(1).tolist())]
        paths = model.crf.decode(model(ids, mask, chars), mask)
        assert paths == [model.crf.decode(a.unsqueeze(0), torch.ones(1, len(a), dtype=torch.bool))[0] for a in alone]
    for b, a in enumerate(alone):
        torch.testing.assert_close(batched[b, : len(a)], a, atol=1e-2 if precision == "bf16" else 1e-5, rtol=0)


def test_models_show_feeds_the_character_cnn(capsys):
    from dapeng.cli.main import main

    args = ["models", "show", "bilstm-crf", "--set", "vocab_size=50", "--set", "hidden=8", "--set", "char_vocab_size=20",
            "--seq-len", "6"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "CharCNN" in out and "char_ids (1, 6, 8)" in out and "CRF" in out
