"""Converters on tiny synthetic checkpoints: names map, Q/K un-permute, and bad files fail in one line."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from dapeng.errors import CheckpointError, ModelError
from dapeng.hub.convert_bert import read_bert_folder
from dapeng.hub.convert_gguf import build_tokenizer, read_gguf

pytestmark = pytest.mark.usefixtures("one_thread")


CONFIG = {"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 32, "max_position_embeddings": 24, "type_vocab_size": 2,
          "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0, "model_type": "bert"}


def bert_tensors(cfg, seed=0):
    rng = np.random.default_rng(seed)
    d, f = cfg["hidden_size"], cfg["intermediate_size"]

    def w(*shape):
        return rng.normal(0, 0.1, shape).astype(np.float32)

    out = {
        "embeddings.word_embeddings.weight": w(cfg["vocab_size"], d),
        "embeddings.position_embeddings.weight": w(cfg["max_position_embeddings"], d),
        "embeddings.token_type_embeddings.weight": w(2, d),
        "embeddings.LayerNorm.weight": 1 + w(d), "embeddings.LayerNorm.bias": w(d),
        "embeddings.position_ids": np.arange(cfg["max_position_embeddings"])[None],
        "pooler.dense.weight": w(d, d), "pooler.dense.bias": w(d),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            out[p + f"attention.self.{name}.weight"], out[p + f"attention.self.{name}.bias"] = w(d, d), w(d)
        out[p + "attention.output.dense.weight"], out[p + "attention.output.dense.bias"] = w(d, d), w(d)
        out[p + "attention.output.LayerNorm.weight"], out[p + "attention.output.LayerNorm.bias"] = 1 + w(d), w(d)
        out[p + "intermediate.dense.weight"], out[p + "intermediate.dense.bias"] = w(f, d), w(f)
        out[p + "output.dense.weight"], out[p + "output.dense.bias"] = w(d, f), w(d)
        out[p + "output.LayerNorm.weight"], out[p + "output.LayerNorm.bias"] = 1 + w(d), w(d)
    return out


def bert_folder(path, cfg=CONFIG, tensors=None):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors if tensors is not None else bert_tensors(CONFIG), str(path / "model.safetensors"))
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *[f"w{i}" for i in range(36)]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


def bert_reference(tensors, ids, cfg=CONFIG):
    """A plain-torch BERT forward on the Hugging Face tensors (post-LN, erf GELU)."""
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}
    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    ln = torch.nn.functional.layer_norm
    x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = ln(x + t["embeddings.token_type_embeddings.weight"][0], (d,), t["embeddings.LayerNorm.weight"],
           t["embeddings.LayerNorm.bias"], 1e-12)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def lin(x, name, p=p):
            return x @ t[p + name + ".weight"].T + t[p + name + ".bias"]

        def heads(y):
            return y.view(*y.shape[:2], h, d // h).transpose(1, 2)

        q, k, v = (heads(lin(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, -1) @ v
        a = lin(a.transpose(1, 2).reshape(x.shape), "attention.output.dense")
        x = ln(x + a, (d,), t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"], 1e-12)
        f = lin(torch.nn.functional.gelu(lin(x, "intermediate.dense")), "output.dense")
        x = ln(x + f, (d,), t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], 1e-12)
    return x


def test_bert_conversion_matches_reference(tmp_path):
    tensors = bert_tensors(CONFIG)
    model, kwargs, state = read_bert_folder(bert_folder(tmp_path / "bert", tensors=tensors))
    assert kwargs["hidden"] == 16 and kwargs["pooling"] == "cls" and state["normalize"] is False
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.encode(ids)
    torch.testing.assert_close(got, bert_reference(tensors, ids), atol=1e-5, rtol=1e-5)


def one_line(err):
    assert "\n" not in str(err.value)


def test_bert_truncated_weights(tmp_path):
    folder = bert_folder(tmp_path / "bert")
    blob = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        read_bert_folder(folder)
    one_line(err)
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError):
        read_bert_folder(folder)


def test_bert_config_not_matching_weights(tmp_path):
    folder = bert_folder(tmp_path / "bert", cfg={**CONFIG, "hidden_size": 32, "num_attention_heads": 4})
    with pytest.raises(ModelError, match="config") as err:
        read_bert_folder(folder)
    one_line(err)
    folder = bert_folder(tmp_path / "bert2", cfg={**CONFIG, "num_hidden_layers": 3})
    with pytest.raises(ModelError, match="missing layers.2"):
        read_bert_folder(folder)


def test_bert_unknown_tensor_and_missing_config(tmp_path):
    tensors = {**bert_tensors(CONFIG), "encoder.layer.0.crossattention.weight": np.zeros(3, np.float32)}
    with pytest.raises(ModelError, match="unexpected tensor"):
        read_bert_folder(bert_folder(tmp_path / "a", tensors=tensors))
    folder = bert_folder(tmp_path / "b")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        read_bert_folder(folder)


@pytest.mark.parametrize(("files", "expected"), [
    ({"sentence_bert_config.json": {"max_seq_length": 10}, "tokenizer_config.json": {"model_max_length": 12}}, 10),
    ({"sentence_bert_config.json": {"max_seq_length": 100}}, 24),  # never past the position table
    ({"tokenizer_config.json": {"model_max_length": 12}}, 12),
    ({"tokenizer_config.json": {"model_max_length": int(1e30)}}, 24),  # transformers' "no limit"
    ({}, 24),
])
def test_bert_max_length_follows_sentence_transformers(tmp_path, files, expected):
    from dapeng.tasks.embedding import SentenceEmbedding

    folder = bert_folder(tmp_path / "m")
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    model, _, state = read_bert_folder(folder)
    assert state["max_length"] == expected
    task = SentenceEmbedding.from_state(state)
    long = " ".join(f"w{i % 30}" for i in range(40))
    cut = " ".join(long.split()[:expected])
    np.testing.assert_allclose(task.embed(model, long), task.embed(model, cut), atol=1e-6)


def test_builtin_fetch_takes_the_sentence_transformers_config(tmp_path, monkeypatch):
    """The minilm-l6 files taken from its wheel include sentence_bert_config.json (max_seq_length 256)."""
    import dataclasses
    import zipfile

    from dapeng.hub import builtin
    from dapeng.hub.store import Store

    spec = builtin.BUILTINS["minilm-l6"]
    source = bert_folder(tmp_path / "src")
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (source / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Normalize"}]))
    (source / "vocab.txt").write_text("[PAD]\n")
    (source / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 20, "do_lower_case": False}))

    def fake_wheel(spec, into):
        into.mkdir(parents=True)
        wheel = into / "fake-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for f in source.rglob("*"):
                if f.is_file():
                    zf.write(f, f"{spec.folder}/{f.relative_to(source).as_posix()}")
        return wheel

    monkeypatch.setattr(builtin, "_installed_folder", lambda spec: None)
    monkeypatch.setattr(builtin, "_download_wheel", fake_wheel)
    store = Store(tmp_path / "home" / "hub")
    # a copy stored by the converter before the fix: cut at 512 (here: the position table, 24)
    monkeypatch.setitem(builtin.BUILTINS, "minilm-l6", dataclasses.replace(spec, checksums={}, revision=1,
                                                                            files=spec.files[:-1]))
    old = builtin.install_builtin("minilm-l6", store)
    assert old.meta()["preprocess"]["max_length"] == 24
    monkeypatch.setitem(builtin.BUILTINS, "minilm-l6", dataclasses.replace(spec, checksums={}))
    path = store.resolve("minilm-l6")  # converted again: the stored copy is of an older revision
    meta = json.loads((path / "dapeng.json").read_text())
    assert meta["preprocess"]["max_length"] == 20 and meta["preprocess"]["normalize"] is True
    assert path != old.path and store.resolve("minilm-l6@1") == old.path and store.resolve("minilm-l6") == path


# ------------------------------------------------------------------------------------- GGUF

LLAMA = {"vocab": 300, "dim": 32, "layers": 2, "heads": 4, "kv_heads": 2, "hidden": 48}


def permute(w, heads):
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows for interleaved RoPE."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_tensors(seed=0):
    rng = np.random.default_rng(seed)
    c = LLAMA
    hd = c["dim"] // c["heads"]

    def w(*shape):
        return rng.normal(0, 0.2, shape).astype(np.float32)

    t = {"embed": w(c["vocab"], c["dim"]), "norm": 1 + w(c["dim"])}
    for i in range(c["layers"]):
        t |= {f"layers.{i}.attn_norm": 1 + w(c["dim"]), f"layers.{i}.q": w(c["heads"] * hd, c["dim"]),
              f"layers.{i}.k": w(c["kv_heads"] * hd, c["dim"]), f"layers.{i}.v": w(c["kv_heads"] * hd, c["dim"]),
              f"layers.{i}.o": w(c["dim"], c["heads"] * hd), f"layers.{i}.mlp_norm": 1 + w(c["dim"]),
              f"layers.{i}.gate": w(c["hidden"], c["dim"]), f"layers.{i}.up": w(c["hidden"], c["dim"]),
              f"layers.{i}.down": w(c["dim"], c["hidden"])}
    return t


def write_gguf(path, tensors, block_count=LLAMA["layers"]):
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    c = LLAMA
    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet]
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens += ["Ġt", "he", "Ġthe"]
    tokens += [f"<extra{i}>" for i in range(c["vocab"] - len(tokens))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(block_count)
    w.add_context_length(64)
    w.add_embedding_length(c["dim"])
    w.add_feed_forward_length(c["hidden"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(c["vocab"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_eos_token_id(2)
    w.add_bos_token_id(1)
    names = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
             "mlp_norm": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
    for role, value in tensors.items():
        if role == "embed":
            name = "token_embd.weight"
        elif role == "norm":
            name = "output_norm.weight"
        elif role == "lm_head":
            name = "output.weight"
        else:
            _, i, r = role.split(".")
            name = f"blk.{i}.{names[r]}.weight"
            if r == "q":
                value = permute(value, c["heads"])
            elif r == "k":
                value = permute(value, c["kv_heads"])
        w.add_tensor(name, np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_roundtrip_unpermutes_qk_and_reads_tokenizer(tmp_path):
    tensors = llama_tensors()
    ckpt = read_gguf(write_gguf(tmp_path / "tiny.gguf", tensors))
    assert ckpt.config["heads"] == 4 and ckpt.config["kv_heads"] == 2 and ckpt.config["layers"] == 2
    for role in ("layers.0.q", "layers.1.k", "layers.0.down", "embed"):
        np.testing.assert_array_equal(ckpt.tensors[role], tensors[role])
    np.testing.assert_array_equal(ckpt.tensors["lm_head"], tensors["embed"])
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(ckpt.tokenizer_json)
    enc = tok.encode("<|im_start|> the 12")
    assert enc.ids[0] == 1 and "Ġthe" in enc.tokens and enc.tokens[-2:] == ["1", "2"]
    assert tok.decode(tok.encode(" the café").ids) == " the café"
    assert ckpt.special["stop_ids"] == [0, 2]


def test_gguf_lm_matches_rotate_half_reference(tmp_path):
    """The converted `lm` equals a plain Llama forward on the un-permuted (Hugging Face layout) weights."""
    from dapeng.hub.mapping import build_lm

    tensors = llama_tensors()
    ckpt = read_gguf(write_gguf(tmp_path / "tiny.gguf", tensors))
    model, kwargs = build_lm(ckpt.config, ckpt.tensors, pad_id=2)
    assert kwargs["kv_heads"] == 2 and kwargs["tie_embeddings"] is True
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids)
    torch.testing.assert_close(got, llama_reference(tensors, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("own_head", [False, True], ids=["tied", "own-output-weight"])
def test_gguf_lm_matches_transformers_gguf_loader(tmp_path, own_head):
    """A file with its own `output.weight` keeps that head (untied); one without ties it to the embedding."""
    transformers = pytest.importorskip("transformers")
    from dapeng.hub.mapping import build_lm

    tensors = llama_tensors()
    if own_head:
        tensors["lm_head"] = np.random.default_rng(5).normal(0, 0.2, tensors["embed"].shape).astype(np.float32)
    ckpt = read_gguf(write_gguf(tmp_path / "tiny.gguf", tensors))
    model, kwargs = build_lm(ckpt.config, ckpt.tensors, pad_id=2)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()
    assert kwargs["tie_embeddings"] is (not own_head) and ref.config.tie_word_embeddings is (not own_head)
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = model(ids), ref(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, llama_reference(tensors, ids), atol=1e-4, rtol=1e-4)


def llama_reference(t, ids):
    c = LLAMA
    t = {k: torch.from_numpy(v) for k, v in t.items()}
    hd, n = c["dim"] // c["heads"], ids.shape[1]
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(n).float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    x = t["embed"][ids]
    for i in range(c["layers"]):
        p = f"layers.{i}."
        h = rms(x, t[p + "attn_norm"])
        q = (h @ t[p + "q"].T).view(1, n, c["heads"], hd).transpose(1, 2)
        k = (h @ t[p + "k"].T).view(1, n, c["kv_heads"], hd).transpose(1, 2)
        v = (h @ t[p + "v"].T).view(1, n, c["kv_heads"], hd).transpose(1, 2)
        rep = c["heads"] // c["kv_heads"]
        q, k, v = rope(q), rope(k).repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = (q @ k.transpose(-1, -2)) / hd**0.5 + torch.full((n, n), float("-inf")).triu(1)
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, n, -1)
        x = x + a @ t[p + "o"].T
        h = rms(x, t[p + "mlp_norm"])
        x = x + (torch.nn.functional.silu(h @ t[p + "gate"].T) * (h @ t[p + "up"].T)) @ t[p + "down"].T
    return rms(x, t["norm"]) @ t.get("lm_head", t["embed"]).T


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing"])
def test_gguf_bad_files_are_one_line_errors(tmp_path, damage):
    path = write_gguf(tmp_path / "tiny.gguf", llama_tensors())
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[: len(blob) - 4000])
    elif damage == "garbage":
        path.write_bytes(b"NOTGGUF" + blob[7:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(CheckpointError) as err:
        read_gguf(path)
    one_line(err)


def test_gguf_metadata_not_matching_tensors(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", llama_tensors(), block_count=3)
    with pytest.raises(ModelError, match="disagree") as err:
        read_gguf(path)
    one_line(err)


def test_build_tokenizer_marks_control_tokens_special():
    tok = build_tokenizer(["<s>", "a", "b", "ab"], ["a b"], [3, 1, 1, 1], pre=None)
    assert tok.encode("ab<s>").ids == [3, 0]
    assert tok.decode([3, 0], skip_special_tokens=True) == "ab"
