"""Hugging Face BERT folders (config.json, model.safetensors, tokenizer.json) → the dapeng `transformer`.

A sentence-transformers folder (MiniLM) also says how sentences are pooled
(`1_Pooling/config.json`), whether embeddings are L2-normalised (`modules.json`) and where
long texts are cut (`sentence_bert_config.json`); all go into the `sentence-embedding` task
state so `embed` reproduces the original.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dapeng.errors import CheckpointError, ModelError

__all__ = ["convert_bert_folder", "read_bert_folder", "read_safetensors"]

_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
}


def read_safetensors(path: Path) -> dict[str, Any]:
    """All tensors of a safetensors file as numpy arrays, or one line saying why not.

    Raises:
        CheckpointError: missing, truncated or corrupt file.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found", "check the folder")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is corrupt or truncated ({reason})", "re-download the weights") from None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found", "a BERT folder needs config.json and tokenizer.json") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({err})", "re-download the model") from None


def _pooling(folder: Path) -> tuple[str, bool]:
    """(pooling mode, L2-normalise) from a sentence-transformers folder; BERT's CLS otherwise."""
    pooling_file = folder / "1_Pooling" / "config.json"
    if not pooling_file.is_file():
        return "cls", False
    cfg = _json(pooling_file)
    modes = [mode for key, mode in _POOLING_KEYS.items() if cfg.get(key)]
    if len(modes) != 1:
        raise ModelError(f"{pooling_file}: pooling {modes or 'none'} is not supported", "one of cls, mean, max")
    modules = _json(folder / "modules.json") if (folder / "modules.json").is_file() else []
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    return modes[0], normalize


def _max_length(folder: Path, max_positions: int) -> int:
    """The longest input in tokens, as sentence-transformers decides it.

    `sentence_bert_config.json`'s `max_seq_length` first (all-MiniLM-L6-v2: 256), else the
    tokenizer's `model_max_length` (`tokenizer_config.json`), else the position table's size;
    never more than the position table holds.
    """
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        value = _json(folder / name).get(key) if (folder / name).is_file() else None
        # transformers writes a huge sentinel (int(1e30)) for "no limit"
        if isinstance(value, int | float) and 0 < value < 1e9:
            return int(min(value, max_positions))
    return max_positions


def _tokenizer_json(folder: Path) -> str:
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception for a bad file
        raise CheckpointError(f"{path} is missing or unreadable ({err})", "the folder needs tokenizer.json") from None
    # Truncation and padding are the task's business (per batch), not the file's.
    tok.no_truncation()
    tok.no_padding()
    return tok.to_str()


def read_bert_folder(folder: Path, num_labels: int = 2) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Build the dapeng encoder from a BERT folder.

    Returns:
        (model in eval mode, its constructor kwargs, sentence-embedding task state).

    Raises:
        CheckpointError: a missing, truncated or corrupt file.
        ModelError: a config that doesn't match the weights, or an unsupported BERT variant.
    """
    from dapeng.hub.mapping import build_encoder

    folder = Path(folder)
    config = _json(folder / "config.json")
    pooling, normalize = _pooling(folder)
    tokenizer = _tokenizer_json(folder)
    tensors = read_safetensors(folder / "model.safetensors")
    model, kwargs = build_encoder(config, tensors, str(folder / "model.safetensors"),
                                  num_labels=num_labels, pooling=pooling)
    state = {
        "tokenizer": tokenizer,
        "normalize": normalize,
        "max_length": _max_length(folder, kwargs["max_positions"]),
        "pad_id": kwargs["pad_id"],
    }
    return model, kwargs, state


def convert_bert_folder(folder: Path) -> Any:
    """A BERT / sentence-transformers folder → `Converted` for the store (task sentence-embedding)."""
    from dapeng.hub.builtin import Converted

    model, kwargs, state = read_bert_folder(folder)
    return Converted(model=model, model_name="transformer", model_kwargs=kwargs,
                     task_name="sentence-embedding", task_state=state)
