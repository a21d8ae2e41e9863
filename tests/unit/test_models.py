"""Contract tests over every registered model (timm's test_models.py), plus causal, padding and cache checks."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dapeng.errors import ModelError
from dapeng.layers.attention import capture_attention
from dapeng.models import BUILTIN_MODELS, MODELS

torch.set_num_threads(1)

V, K, B, T = 40, 3, 2, 6
IMAGE = {"in_channels": 1, "image_size": 16, "num_labels": K}
TEXT = {"vocab_size": V, "num_labels": K, "pad_id": 0}
TINY = {
    "mlp": {**IMAGE, "hidden": 16},
    "lenet": {**IMAGE, "channels": (4, 8), "hidden": 16},
    "resnet": {**IMAGE, "widths": (4, 8), "blocks": (1, 1)},
    "textcnn": {**TEXT, "embed_dim": 8, "filters": 4},
    "rnn": {**TEXT, "embed_dim": 8, "hidden": 6},
    "gru": {**TEXT, "embed_dim": 8, "hidden": 6, "layers": 2},
    "lstm": {**TEXT, "embed_dim": 8, "hidden": 6, "layers": 2},
    "bilstm-crf": {**TEXT, "embed_dim": 8, "hidden": 6, "char_vocab_size": 12, "char_embed_dim": 4, "char_filters": 5},
    "transformer": {**TEXT, "hidden": 16, "layers": 2, "heads": 4, "intermediate": 32, "max_positions": 32},
    "lm": {"vocab_size": V, "hidden": 16, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 32, "max_positions": 64},
    "seq2seq": {"vocab_size": V, "hidden": 16, "layers": 1, "heads": 4, "intermediate": 32, "max_positions": 32},
    "prodlda": {"vocab_size": V, "num_topics": K, "hidden": 8},
    "vqa": {**TEXT, "in_channels": 1, "image_size": 16, "fusion": "cross-attention", "embed_dim": 8, "hidden": 6,
            "widths": (4, 8), "fusion_dim": 8, "heads": 2},
    "clip": {"vocab_size": V, "in_channels": 1, "image_size": 16, "embed_dim": 8, "widths": (4, 8), "word_dim": 8,
             "hidden": 6},
}
MULTIMODAL = ["vqa", "clip"]  # images and texts in; clip has no head: it returns both towers' embeddings
IMAGE_MODELS = ["mlp", "lenet", "resnet"]
TEXT_MODELS = ["textcnn", "rnn", "gru", "lstm", "transformer"]
TAGGERS = ["bilstm-crf"]  # (B, T, K) emissions and a CRF


def _build(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return MODELS.create(name, **{**TINY[name], **overrides})


def _inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name in IMAGE_MODELS:
        return {"images": torch.randn(B, 1, 16, 16, generator=g)}
    if name == "prodlda":  # word counts of B documents
        return {"bow": torch.poisson(torch.full((B, V), 0.5), generator=g)}
    images = torch.randn(B, 1, 16, 16, generator=g)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    ids[~mask] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if name in TAGGERS:
        chars = torch.randint(1, 12, (B, T, 4), generator=g)
        chars[0, :, 3] = 0  # shorter words: padding characters
        inputs["char_ids"] = chars.masked_fill(~mask.unsqueeze(-1), 0)
    if name == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, V, (B, 4), generator=g)
    if name in MULTIMODAL:
        inputs["images"] = images
    return inputs


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out  # clip: (B, B) image-text logits


def _expected_shape(name: str) -> tuple[int, ...]:
    return {"lm": (B, T, V), "seq2seq": (B, 4, V), "bilstm-crf": (B, T, K), "prodlda": (B, V), "clip": (B, B)}.get(name, (B, K))


def test_every_registered_model_has_a_tiny_config():
    # the package's own table: other tests register toy models into MODELS
    assert sorted(TINY) == sorted(BUILTIN_MODELS)
    assert set(MODELS.names()) >= {"mlp", "lenet", "resnet", "textcnn", "rnn", "gru", "lstm", "transformer", "lm", "seq2seq"}


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_shape_and_contract(name):
    model = _build(name).eval()
    out = _logits(model(**_inputs(name)))
    assert out.shape == _expected_shape(name)
    assert torch.isfinite(out).all()
    if name != "clip":
        torch.testing.assert_close(model.forward_head(model.forward_features(**_inputs(name))), out)


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_parameter_gets_a_finite_gradient(name):
    model = _build(name).train()
    inputs = _inputs(name)
    out = _logits(model(**inputs))
    loss = out.float().square().mean()
    if getattr(model, "crf", None) is not None:  # the CRF's scores only get a gradient from its loss
        tags = torch.randint(0, K, (B, T), generator=torch.Generator().manual_seed(3))
        loss = loss + model.crf.nll(out, tags, inputs["attention_mask"])
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


@pytest.mark.parametrize("name", sorted(TINY))
def test_safetensors_round_trip_gives_identical_outputs(name, tmp_path):
    model = _build(name).eval()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    torch.manual_seed(123)  # a differently initialised twin
    twin = MODELS.create(name, **TINY[name]).eval()
    twin.load_state_dict(load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(_logits(twin(**_inputs(name))), _logits(model(**_inputs(name))))


@pytest.mark.parametrize("name", sorted(set(TINY) - {"clip"}))
def test_reset_head_changes_the_output_size(name):
    model = _build(name).eval()
    model.reset_head(5)
    assert model(**_inputs(name)).shape[-1] == 5


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_models_cam_layer_and_channels_last(name):
    model = _build(name).eval()
    cam = model.cam_layer
    if name == "mlp":
        assert cam is None
    else:
        assert any(cam is m for m in model.modules())
        seen = []
        cam.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        x = _inputs(name)["images"]
        out = model(x.to(memory_format=torch.channels_last))
        assert len(seen[0]) == 4  # a spatial map for Grad-CAM
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [*TEXT_MODELS, *TAGGERS, "lm"])
def test_text_models_ignore_padding(name):
    model = _build(name).eval()
    inputs = _inputs(name)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = 5
    more_ids = torch.cat([ids, torch.randint(3, V, (B, extra))], dim=1)  # garbage where the mask is False
    more_mask = torch.cat([mask, torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    short_kw, long_kw = {}, {}
    if "char_ids" in inputs:
        chars = inputs["char_ids"]
        short_kw["char_ids"] = chars
        long_kw["char_ids"] = torch.cat([chars, torch.randint(1, 12, (B, extra, chars.shape[2]))], dim=1)
    with torch.no_grad():
        short, long = model(ids, mask, **short_kw), model(more_ids, more_mask, **long_kw)
    if name in ("lm", *TAGGERS):
        short, long = short[mask], long[:, :T][mask]
    torch.testing.assert_close(long, short, atol=1e-5, rtol=1e-5)
    assert isinstance(model.get_input_embeddings(), nn.Embedding)


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_text_models_tag_every_token_with_pooling_none(name):
    model = _build(name, pooling="none").eval()
    out = model(**_inputs(name))
    assert out.shape == (B, T, K)


def test_lm_is_causal():
    model = _build("lm").eval()
    ids = _inputs("lm")["input_ids"]
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_seq2seq_decoder_is_causal():
    model = _build("seq2seq").eval()
    inputs = _inputs("seq2seq")
    changed = {**inputs, "decoder_input_ids": inputs["decoder_input_ids"].clone()}
    changed["decoder_input_ids"][:, 2:] = (changed["decoder_input_ids"][:, 2:] + 1) % V
    with torch.no_grad():
        a, b = model(**inputs), model(**changed)
    torch.testing.assert_close(a[:, :2], b[:, :2])


def _greedy_by_recomputation(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_lm_kv_cache_generation_equals_full_recomputation():
    model = _build("lm", tie_embeddings=False).eval()
    nn.init.normal_(model.lm_head.weight, std=1.0)  # spread the logits so tokens vary
    ids = _inputs("lm")["input_ids"]
    out = model.generate(ids, max_new_tokens=12)
    assert out.shape == (B, T + 12)
    assert torch.equal(out, _greedy_by_recomputation(model, ids, 12))
    assert len(set(out[:, T:].flatten().tolist())) > 1
    streamed = list(model.generate(ids[:1], max_new_tokens=12, stream=True))
    assert streamed == out[0, T:].tolist()


def test_lm_generation_with_left_padding_matches_unpadded_rows():
    model = _build("lm", tie_embeddings=False).eval()
    nn.init.normal_(model.lm_head.weight, std=1.0)
    ids = _inputs("lm")["input_ids"]
    short = ids[1:, :3]
    padded = torch.cat([torch.zeros(1, T - 3, dtype=torch.long), short], dim=1)
    batch = torch.cat([ids[:1], padded])
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, : T - 3] = False
    out = model.generate(batch, max_new_tokens=8, attention_mask=mask)
    assert torch.equal(out[1, T:], model.generate(short, max_new_tokens=8)[0, 3:])
    assert torch.equal(out[0, T:], model.generate(ids[:1], max_new_tokens=8)[0, T:])


def test_lm_sampling_and_stop_ids():
    model = _build("lm", tie_embeddings=False).eval()
    nn.init.normal_(model.lm_head.weight, std=1.0)
    ids = _inputs("lm")["input_ids"][:1]
    first = int(model.generate(ids, max_new_tokens=1)[0, -1])
    assert model.generate(ids, max_new_tokens=10, stop_ids=[first]).shape == (1, T + 1)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = model.generate(ids, 8, temperature=0.9, top_k=5, top_p=0.9, generator=g1)
    b = model.generate(ids, 8, temperature=0.9, top_k=5, top_p=0.9, generator=g2)
    assert torch.equal(a, b)
    top1 = model.generate(ids, 8, temperature=1.0, top_k=1)
    assert torch.equal(top1, model.generate(ids, 8))  # top-1 sampling is greedy
    with pytest.raises(ModelError, match="max_positions"):
        model.generate(ids, max_new_tokens=100)


def test_seq2seq_cached_greedy_equals_recomputation_and_beams_score_no_worse():
    model = _build("seq2seq", tie_embeddings=False).eval()
    nn.init.normal_(model.head.weight, std=1.0)
    inputs = _inputs("seq2seq")
    src, mask = inputs["input_ids"], inputs["attention_mask"]
    greedy = model.generate(src, mask, max_new_tokens=7)
    with torch.no_grad():
        seq = torch.full((B, 1), model.bos_id)
        for _ in range(7):
            seq = torch.cat([seq, model(src, mask, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    ended = (seq == model.eos_id).long().cumsum(1).roll(1, dims=1).clamp_max(1).bool()
    ended[:, 0] = False
    assert torch.equal(greedy, seq.masked_fill(ended, model.pad_id)[:, : greedy.shape[1]])

    def logprob(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            lp = model(src, mask, tokens[:, :-1]).log_softmax(-1)
        scored = tokens[:, 1:] != model.pad_id  # padding after eos is not part of the output
        return (lp.gather(-1, tokens[:, 1:, None]).squeeze(-1) * scored).sum(1)

    beams = model.generate(src, mask, max_new_tokens=7, num_beams=4, length_penalty=0.0)
    assert (logprob(beams) >= logprob(greedy) - 1e-5).all()


@pytest.mark.parametrize("name", ["transformer", "lm", "seq2seq"])
def test_capture_attention_rows_sum_to_one_and_outputs_unchanged(name):
    model = _build(name).eval()
    inputs = _inputs(name)
    with torch.no_grad():
        plain = model(**inputs)
        with capture_attention(model) as maps:
            captured = model(**inputs)
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    layers = {"transformer": 2, "lm": 2, "seq2seq": 3}[name]
    assert len(maps) == layers
    for w in maps:
        assert w.dim() == 4 and w.shape[:2] == (B, 4)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    if name != "seq2seq":
        assert maps[0][1, :, :4, 4:].abs().max() == 0  # padded keys get no weight
    with torch.no_grad():
        model(**inputs)
    assert len(maps) == layers  # nothing recorded after the block


def test_transformer_rejects_too_long_input():
    model = _build("transformer")
    with pytest.raises(ModelError, match="max_positions=32"):
        model(torch.ones(1, 33, dtype=torch.long))


@pytest.mark.parametrize("name", ["lenet", "transformer", "lm"])
def test_dynamo_traces_in_one_graph(name):
    torch._dynamo.reset()
    model = _build(name).eval()
    inputs = _inputs(name)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs), model(**inputs))


def test_lm_bf16_generation_without_native_bf16_keeps_fp32_activations(monkeypatch):
    import dapeng.models.lm as lm

    monkeypatch.setattr(lm, "native_bf16", lambda device="cpu": False)
    model = _build("lm", tie_embeddings=False).eval()
    nn.init.normal_(model.lm_head.weight, std=1.0)
    ids = torch.randint(3, V, (8, T), generator=torch.Generator().manual_seed(2))
    rounded = model.to(torch.bfloat16).float()  # the fp32 model holding exactly the bf16 weights
    expected = rounded.generate(ids, max_new_tokens=6)
    half = rounded.to(torch.bfloat16)
    assert half._activation_dtype() == torch.float32
    # batch 8: weights stay bf16, every product is the fp32 one with those weights
    assert torch.equal(half.generate(ids, max_new_tokens=6), expected)
    assert half.generate(ids[:1], max_new_tokens=3).shape == (1, T + 3)
    from dapeng.layers.lora import apply_lora

    apply_lora(half, rank=2)
    assert half._activation_dtype() == torch.bfloat16  # wrapped layers run as they are


def test_lm_one_sequence_decoding_head_follows_weight_updates():
    model = _build("lm").eval()  # tied embeddings: the head is the embedding matrix
    with torch.no_grad():
        model.embed.weight.mul_(30)  # spread the logits so tokens vary
    batch = _inputs("lm")["input_ids"]

    def recomputed(ids: torch.Tensor, n: int) -> torch.Tensor:
        out = ids
        with torch.no_grad():
            for _ in range(n):
                out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return out

    for ids in (batch[:1], batch):
        assert torch.equal(model.generate(ids, max_new_tokens=6), recomputed(ids, 6))
    with torch.no_grad():
        model.embed.weight[5:].neg_()  # in place: decoding must see the update
    for ids in (batch[:1], batch):
        assert torch.equal(model.generate(ids, max_new_tokens=6), recomputed(ids, 6))
