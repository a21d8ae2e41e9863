"""Name and config maps from foreign checkpoints to dapeng models (kept here, not in model files).

* Hugging Face BERT (`BertModel` safetensors) → `transformer` (`dapeng.models.transformer`).
* GGUF Llama roles (from `convert_gguf`) → `lm` (`dapeng.models.lm`).

Each builder checks every tensor's name and shape against the freshly built dapeng model
before copying anything, so a checkpoint that doesn't fit fails with one line and no
half-loaded model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from dapeng.errors import ModelError

__all__ = ["BERT_NAMES", "LM_NAMES", "bert_kwargs", "build_encoder", "build_lm", "load_mapped", "map_names"]

# Hugging Face BERT name (regex) → dapeng `transformer` name (format string on the groups).
BERT_NAMES: dict[str, str] = {
    r"embeddings\.word_embeddings\.weight": "embeddings.word.weight",
    r"embeddings\.position_embeddings\.weight": "embeddings.position.weight",
    r"embeddings\.token_type_embeddings\.weight": "embeddings.token_type.weight",
    r"embeddings\.LayerNorm\.(weight|bias)": "embeddings.norm.{0}",
    r"encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)": "layers.{0}.attn.q.{1}",
    r"encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)": "layers.{0}.attn.k.{1}",
    r"encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)": "layers.{0}.attn.v.{1}",
    r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)": "layers.{0}.attn.o.{1}",
    r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)": "layers.{0}.norm1.{1}",
    r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)": "layers.{0}.ffn.up.{1}",
    r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)": "layers.{0}.ffn.down.{1}",
    r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)": "layers.{0}.norm2.{1}",
}
# Present in BERT checkpoints but not part of the encoder dapeng builds.
BERT_IGNORED = (r"embeddings\.position_ids", r"pooler\..*", r"cls\..*")

# `convert_gguf` role name → dapeng `lm` name.
LM_NAMES: dict[str, str] = {
    r"embed": "embed.weight",
    r"norm": "norm.weight",
    r"lm_head": "lm_head.weight",
    r"layers\.(\d+)\.attn_norm": "layers.{0}.norm1.weight",
    r"layers\.(\d+)\.q": "layers.{0}.attn.q.weight",
    r"layers\.(\d+)\.k": "layers.{0}.attn.k.weight",
    r"layers\.(\d+)\.v": "layers.{0}.attn.v.weight",
    r"layers\.(\d+)\.o": "layers.{0}.attn.o.weight",
    r"layers\.(\d+)\.mlp_norm": "layers.{0}.norm2.weight",
    r"layers\.(\d+)\.gate": "layers.{0}.ffn.gate.weight",
    r"layers\.(\d+)\.up": "layers.{0}.ffn.up.weight",
    r"layers\.(\d+)\.down": "layers.{0}.ffn.down.weight",
}


def map_names(
    tensors: Mapping[str, Any], table: Mapping[str, str], ignored: tuple[str, ...] = (), source: str = "checkpoint"
) -> dict[str, Any]:
    """Rename `tensors` through `table`; an unknown name is a ModelError (never silently dropped)."""
    compiled = [(re.compile(pattern), target) for pattern, target in table.items()]
    skip = [re.compile(p) for p in ignored]
    out: dict[str, Any] = {}
    for name, value in tensors.items():
        bare = name.removeprefix("bert.")
        if any(s.fullmatch(bare) for s in skip):
            continue
        for pattern, target in compiled:
            m = pattern.fullmatch(bare)
            if m:
                out[target.format(*m.groups())] = value
                break
        else:
            raise ModelError(f"{source}: unexpected tensor {name!r}", "the checkpoint is not of the expected layout")
    return out


def load_mapped(model: nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Copy `state` (dapeng names → arrays/tensors) into `model`, after checking every name and shape.

    Raises:
        ModelError: a weight is missing, left over, or of the wrong shape; the model is untouched.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        count = len(missing) + len(extra)
        raise ModelError(f"{source}: weights don't match the config ({what}; {count} name(s) differ)",
                         "the config.json and the weights come from different models")
    for name, value in state.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise ModelError(
                f"{source}: {name} has shape {tuple(value.shape)}, the config implies {tuple(own[name].shape)}",
                "the config.json and the weights come from different models",
            )
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
               for k, v in state.items()}
    model.load_state_dict(tensors, strict=True)


def bert_kwargs(config: Mapping[str, Any], num_labels: int = 2, pooling: str = "mean") -> dict[str, Any]:
    """Hugging Face `BertConfig` dict → `transformer` constructor kwargs.

    Raises:
        ModelError: a BERT variant dapeng's encoder doesn't implement.
    """
    act = config.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
        raise ModelError(f"BERT activation {act!r} is not supported", "use a BERT checkpoint with gelu or relu")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ModelError("only absolute position embeddings convert", "use a standard BERT checkpoint")
    try:
        return {
            "vocab_size": int(config["vocab_size"]),
            "num_labels": num_labels,
            "pad_id": int(config.get("pad_token_id", 0)),
            "hidden": int(config["hidden_size"]),
            "layers": int(config["num_hidden_layers"]),
            "heads": int(config["num_attention_heads"]),
            "intermediate": int(config["intermediate_size"]),
            "max_positions": int(config.get("max_position_embeddings", 512)),
            "type_vocab_size": int(config.get("type_vocab_size", 2)),
            "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12)),
            "norm_first": False,
            "dropout": float(config.get("hidden_dropout_prob", 0.1)),
            "pooling": pooling,
            "activation": {"gelu": "gelu", "relu": "relu"}.get(act, "gelu_tanh"),
        }
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"BERT config lacks or mistypes {err}", "check config.json") from None


def build_encoder(config: Mapping[str, Any], tensors: Mapping[str, Any], source: str, **kw: Any) -> tuple[nn.Module, dict]:
    """Build a `transformer` from a BERT config and load the BERT tensors into it (head left fresh)."""
    from dapeng.models import MODELS

    kwargs = bert_kwargs(config, **kw)
    model = MODELS.create("transformer", **kwargs)
    state = map_names(tensors, BERT_NAMES, BERT_IGNORED, source)
    head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    load_mapped(model, {**state, **head}, source)
    return model.eval(), kwargs


def lm_kwargs(config: Mapping[str, Any], pad_id: int) -> dict[str, Any]:
    """GGUF Llama config (see `convert_gguf.read_gguf`) → `lm` constructor kwargs."""
    return {
        "vocab_size": config["vocab_size"],
        "pad_id": pad_id,
        "hidden": config["dim"],
        "layers": config["layers"],
        "heads": config["heads"],
        "kv_heads": config["kv_heads"],
        "intermediate": config["hidden"],
        "head_dim": config["head_dim"],
        "max_positions": config["max_len"],
        "rope_theta": config["rope_base"],
        "rms_norm_eps": config["norm_eps"],
        "tie_embeddings": config["tied"],
    }


def build_lm(config: Mapping[str, Any], tensors: Mapping[str, Any], pad_id: int) -> tuple[nn.Module, dict]:
    """Build an `lm` from a GGUF Llama config and load its tensors."""
    from dapeng.models import MODELS

    kwargs = lm_kwargs(config, pad_id)
    model = MODELS.create("lm", **kwargs)
    state = map_names(tensors, LM_NAMES, source="GGUF")
    own = model.state_dict()
    if "lm_head.weight" not in own:
        state.pop("lm_head.weight", None)
    load_mapped(model, state, "GGUF")
    return model.eval(), kwargs
