"""The BERT- and Llama-layout models compute what Hugging Face's do, given the same weights.

The name mapping written here is the test's own; the converters in `dapeng.hub` own theirs.
"""

import pytest
import torch

from dapeng.models import MODELS

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


def test_transformer_matches_hf_bert_hidden_states():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=32, max_position_embeddings=20, type_vocab_size=2)
    torch.manual_seed(0)
    ref = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ours = MODELS.create("transformer", vocab_size=50, hidden=16, layers=2, heads=4, intermediate=32,
                         max_positions=20, layer_norm_eps=cfg.layer_norm_eps).eval()
    sd = ref.state_dict()
    mapped = {
        "embeddings.word.weight": sd["embeddings.word_embeddings.weight"],
        "embeddings.position.weight": sd["embeddings.position_embeddings.weight"],
        "embeddings.token_type.weight": sd["embeddings.token_type_embeddings.weight"],
        "embeddings.norm.weight": sd["embeddings.LayerNorm.weight"],
        "embeddings.norm.bias": sd["embeddings.LayerNorm.bias"],
    }
    for i in range(2):
        p = f"encoder.layer.{i}."
        for ours_name, hf_name in {
            "attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
            "attn.o": "attention.output.dense", "norm1": "attention.output.LayerNorm",
            "ffn.up": "intermediate.dense", "ffn.down": "output.dense", "norm2": "output.LayerNorm",
        }.items():
            for leaf in ("weight", "bias"):
                mapped[f"layers.{i}.{ours_name}.{leaf}"] = sd[p + hf_name + "." + leaf]
    missing = ours.load_state_dict(mapped, strict=False).missing_keys
    assert missing == ["head.weight", "head.bias"]
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    types = torch.zeros(2, 7, dtype=torch.long)
    types[:, 4:] = 1
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours.encode(ids, mask.bool(), types)
    assert (got - expected)[mask.bool()].abs().max() <= 1e-5


def test_lm_matches_hf_llama_logits():
    cfg = transformers.LlamaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, rope_theta=100000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ours = MODELS.create("lm", vocab_size=60, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48,
                         rope_theta=100000.0, rms_norm_eps=1e-5, max_positions=64).eval()
    sd = ref.state_dict()
    mapped = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    for i in range(2):
        p = f"model.layers.{i}."
        for ours_name, hf_name in {
            "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
            "attn.o": "self_attn.o_proj", "ffn.gate": "mlp.gate_proj", "ffn.up": "mlp.up_proj",
            "ffn.down": "mlp.down_proj", "norm1": "input_layernorm", "norm2": "post_attention_layernorm",
        }.items():
            mapped[f"layers.{i}.{ours_name}.weight"] = sd[p + hf_name + ".weight"]
    ours.load_state_dict(mapped)
    ids = torch.randint(0, 60, (2, 40))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max() <= 1e-5
    hf_tokens = ref.generate(ids[:1, :8], max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert torch.equal(ours.generate(ids[:1, :8], max_new_tokens=10), hf_tokens)
