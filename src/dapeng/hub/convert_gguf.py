"""GGUF (llama.cpp) Llama checkpoints → the dapeng `lm` decoder, its tokenizer and chat template.

The file is read with the `gguf` package; quantized tensors (Q4_1, Q8_0, ...) are
dequantized to float32. Two llama.cpp conventions are undone on the way:

* Q and K projections are stored permuted for llama.cpp's interleaved RoPE; dapeng's
  rotary embedding rotates halves (as Hugging Face's Llama does), so the rows are put back.
* GGUF shapes list the fastest axis first; the dequantized numpy arrays already come out
  as (out_features, in_features), the PyTorch layout.

The tokenizer is rebuilt as a Hugging Face `tokenizers` byte-level BPE from the vocabulary
and merges in the file, with the file's control tokens as special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dapeng.errors import CheckpointError, ModelError

__all__ = ["GGUFCheckpoint", "build_tokenizer", "convert_gguf_folder", "read_gguf"]

# llama.cpp tensor names → role names shared with the dapeng mapping table (`lm_names`).
_BLOCK_ROLES = {
    "attn_norm": "attn_norm",
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
}
_TOP_ROLES = {"token_embd.weight": "embed", "output_norm.weight": "norm", "output.weight": "lm_head"}

# Pre-tokenizer splits per `tokenizer.ggml.pre` (llama.cpp's llama-vocab.cpp), as
# `tokenizers` components: "smollm" splits every digit alone, then the GPT-2 regex.
_DIGITS_FIRST = {"smollm", "starcoder", "refact", "codeshell"}


@dataclass
class GGUFCheckpoint:
    """A Llama GGUF file in Hugging Face terms: config, float tensors by role, tokenizer."""

    config: dict[str, Any]
    tensors: dict[str, np.ndarray]  # role name ("embed", "layers.3.q", ...) -> float32 array
    tokenizer_json: str
    chat_template: str | None
    special: dict[str, Any] = field(default_factory=dict)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _open(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} not found", "check the path")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({reason}); it may be truncated or corrupt",
            "re-download the file",
        ) from None
    return reader


def _config(reader: Any, path: Path) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"{path} holds a {arch!r} model", "only Llama-architecture GGUF files convert to `lm`")
    get = lambda key, default=None: _field(reader, f"llama.{key}", default)  # noqa: E731
    heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    return {
        "vocab_size": int(get("vocab_size", len(tokens.data))),
        "dim": dim,
        "layers": int(get("block_count")),
        "heads": heads,
        "kv_heads": int(get("attention.head_count_kv", heads)),
        "hidden": int(get("feed_forward_length")),
        "max_len": int(get("context_length")),
        "rope_base": float(get("rope.freq_base", 10000.0)),
        "norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "head_dim": int(get("rope.dimension_count", dim // heads)),
    }


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp stored rows as (heads, head_dim/2, 2); rotate-half RoPE wants (heads, 2, head_dim/2).
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(reader: Any, config: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name in _TOP_ROLES:
            role = _TOP_ROLES[t.name]
        else:
            parts = t.name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _BLOCK_ROLES or parts[3] != "weight":
                raise ModelError(f"{path}: unexpected tensor {t.name!r}", "is this a plain Llama GGUF file?")
            role = f"layers.{int(parts[1])}.{_BLOCK_ROLES[parts[2]]}"
        try:
            # a plain in-memory copy first: dequantizing a memmap slice by slice is ~5x slower
            w = np.ascontiguousarray(dequantize(np.array(t.data), t.tensor_type), dtype=np.float32)
        except (ValueError, NotImplementedError) as err:
            raise CheckpointError(f"{path}: can't dequantize {t.name} ({err})", "re-download the file") from None
        if role.endswith(".q"):
            w = _unpermute(w, config["heads"])
        elif role.endswith(".k"):
            w = _unpermute(w, config["kv_heads"])
        out[role] = w
    if "lm_head" not in out and "embed" in out:
        out["lm_head"] = out["embed"]  # tied input and output embeddings
    return out


def _check_shapes(tensors: dict[str, np.ndarray], c: dict[str, Any], path: Path) -> None:
    d, hd = c["dim"], c["head_dim"]
    expected = {"embed": (c["vocab_size"], d), "norm": (d,), "lm_head": (c["vocab_size"], d)}
    for i in range(c["layers"]):
        expected |= {
            f"layers.{i}.attn_norm": (d,),
            f"layers.{i}.q": (c["heads"] * hd, d),
            f"layers.{i}.k": (c["kv_heads"] * hd, d),
            f"layers.{i}.v": (c["kv_heads"] * hd, d),
            f"layers.{i}.o": (d, c["heads"] * hd),
            f"layers.{i}.mlp_norm": (d,),
            f"layers.{i}.gate": (c["hidden"], d),
            f"layers.{i}.up": (c["hidden"], d),
            f"layers.{i}.down": (d, c["hidden"]),
        }
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ModelError(f"{path}: weights missing for {missing[0]} (and {len(missing) - 1} more)",
                         "the file's metadata and tensors disagree")
    for role, shape in expected.items():
        if tensors[role].shape != shape:
            raise ModelError(f"{path}: {role} has shape {tensors[role].shape}, the config says {shape}",
                             "the file's metadata and tensors disagree")


def build_tokenizer(tokens: list[str], merges: list[str], token_types: list[int], pre: str | None) -> Any:
    """A `tokenizers.Tokenizer` (byte-level BPE) from a GGUF vocabulary.

    Args:
        tokens: the vocabulary in id order; merges: "a b" strings in rank order.
        token_types: llama.cpp token types (3 = control → special token).
        pre: `tokenizer.ggml.pre`, which names the pre-tokenizer split.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_FIRST:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, token_types) if ty == 3]
    tok.add_special_tokens(special)
    return tok


def read_gguf(path: Path) -> GGUFCheckpoint:
    """Read a Llama GGUF file into float32 tensors by role, with its tokenizer.

    Raises:
        CheckpointError: missing, truncated or corrupt file.
        ModelError: not a Llama file, or tensors that don't match the metadata.
    """
    path = Path(path)
    reader = _open(path)
    try:
        config = _config(reader, path)
        tokens = list(_field(reader, "tokenizer.ggml.tokens"))
        merges = list(_field(reader, "tokenizer.ggml.merges", []))
        types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
        model_type = _field(reader, "tokenizer.ggml.model")
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: incomplete metadata ({err})", "re-download the file") from None
    if model_type != "gpt2":
        raise ModelError(f"{path}: tokenizer type {model_type!r} is not supported", "only byte-level BPE (gpt2)")
    # llama.cpp writes `output.weight` only for an untied head; without it the head is the embedding
    config["tied"] = all(t.name != "output.weight" for t in reader.tensors)
    tensors = _tensors(reader, config, path)
    _check_shapes(tensors, config, path)
    tokenizer = build_tokenizer(tokens, merges, types, _field(reader, "tokenizer.ggml.pre"))
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    stop = sorted({i for i in (ids["eos"], vocab_id(tokens, "<|endoftext|>")) if i is not None})
    special = {
        "bos_id": ids["bos"],
        "eos_id": ids["eos"],
        "pad_id": ids["padding"] if ids["padding"] is not None else ids["eos"],
        "stop_ids": stop,
        "add_bos": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    }
    return GGUFCheckpoint(config, tensors, tokenizer.to_str(), _field(reader, "tokenizer.chat_template"), special)


def vocab_id(tokens: list[str], token: str) -> int | None:
    """The id of `token` in the vocabulary, or None."""
    try:
        return tokens.index(token)
    except ValueError:
        return None


def convert_gguf_folder(folder: Path) -> Any:
    """Convert the single `*.gguf` file in `folder` into a `Converted` for the store."""
    files = sorted(Path(folder).glob("*.gguf"))
    if len(files) != 1:
        raise CheckpointError(f"expected one .gguf file in {folder}, found {len(files)}", "point at one file")
    return convert_gguf(files[0])


def convert_gguf(path: Path) -> Any:
    """A GGUF Llama file → `Converted(model=dapeng lm, task causal-lm with tokenizer + template)`."""
    from dapeng.hub.builtin import Converted
    from dapeng.hub.mapping import build_lm

    ckpt = read_gguf(path)
    model, kwargs = build_lm(ckpt.config, ckpt.tensors, pad_id=ckpt.special["pad_id"])
    state = {
        "tokenizer": ckpt.tokenizer_json,
        "chat_template": ckpt.chat_template,
        **ckpt.special,
        "max_length": ckpt.config["max_len"],
        "source": {"format": "gguf", "file": Path(path).name},
    }
    return Converted(model=model, model_name="lm", model_kwargs=kwargs, task_name="causal-lm", task_state=state)
