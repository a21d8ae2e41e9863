"""Architectures, one per file, built from `dapeng.layers`; the `MODELS` registry.

Every model follows one contract (timm's): `forward_features(...)` returns features,
`forward_head(features)` maps them to outputs, `reset_head(num_labels)` swaps the head
for fine-tuning, and `forward(...)` is `forward_head(forward_features(...))`.
Constructors take plain typed keyword arguments only.

* Image models (`mlp`, `lenet`, `resnet`): `forward(images (B, C, H, W)) -> (B, K)`; kwargs
  `in_channels`, `image_size`, `num_labels`; `forward_features` gives the pooled (B, F) vector;
  `cam_layer` is the last conv block (None for the MLP).
* Text models (`textcnn`, `rnn`, `gru`, `lstm`, `transformer`): `forward(input_ids (B, T),
  attention_mask (B, T) bool | None) -> (B, K)`, or (B, T, K) with `pooling="none"`; kwargs
  `vocab_size`, `num_labels`, `pad_id`; `forward_features` gives the pooled (B, D) vector the head
  reads (per-token (B, T, D) with `pooling="none"`); `get_input_embeddings()`. The transformer
  also has `encode(...) -> (B, T, D)`, BERT's last hidden state, and with `pooling="none",
  crf=True` a `crf` over its per-token logits.
* Tagger (`bilstm-crf`): `forward(input_ids (B, T), attention_mask (B, T) bool | None,
  char_ids (B, T, C) | None) -> (B, T, K)` emissions; kwargs `vocab_size`, `num_labels`,
  `pad_id`, `char_vocab_size` (0: no character CNN, else `char_ids` are required), `crf`;
  `forward_features` gives the per-token (B, T, D) BiLSTM states; `crf` is a
  `dapeng.layers.crf.CRF` (its `nll` trains, its `decode` tags) or None;
  `get_input_embeddings()`. Tagging models' `reset_head` resets the CRF too.
* `lm`: `forward(input_ids, attention_mask=None) -> (B, T, V)`; `forward_features` = `encode`
  = final hidden states; `generate(...)` with a static KV cache.
* `seq2seq`: `forward(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
  -> (B, T_out, V)`; `encode`, `decode`, `generate(input_ids, attention_mask, max_new_tokens,
  num_beams)`.
* `prodlda` (topic model): `forward(bow (B, V), context (B, C) | None) -> (B, V)` word
  log-probabilities; `forward_features` gives the topic mix θ (B, K), `forward_head` decodes it;
  `posterior`, `topic_words() -> (K, V)`; kwargs `vocab_size`, `num_topics`, `context_dim`.
  Models with inputs of their own kind give `example_inputs(batch)` (`dapeng models show`).

* `vqa`: `forward(images (B, C, S, S), input_ids (B, T), attention_mask (B, T)) -> (B, K)` answer
  logits; kwargs `vocab_size`, `num_labels`, `pad_id`, `in_channels`, `image_size`, `fusion`;
  `forward_features` gives the fused (B, F) vector; `cam_layer`; `get_input_embeddings()`.
* `clip`: `forward(images, input_ids, attention_mask) -> {"image_embeds", "text_embeds", "logits"}`;
  `encode_image`, `encode_text` (unit vectors), `scale()` (the learned inverse temperature).

Attention weights: `dapeng.layers.attention.capture_attention(model)`.
`dapeng.models.introspect` summarises and draws any registered model (`dapeng models`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from dapeng.errors import ModelError
from dapeng.registry import Registry

MODELS: Registry = Registry("model")

# The one explicit list of models: name -> "module:factory" (imported on first use).
BUILTIN_MODELS: dict[str, str] = {
    "mlp": "dapeng.models.mlp:MLP",
    "lenet": "dapeng.models.lenet:LeNet",
    "resnet": "dapeng.models.resnet:ResNet",
    "textcnn": "dapeng.models.textcnn:TextCNN",
    "rnn": "dapeng.models.rnn:rnn",
    "gru": "dapeng.models.rnn:gru",
    "lstm": "dapeng.models.rnn:lstm",
    "transformer": "dapeng.models.transformer:TransformerEncoder",
    "bilstm-crf": "dapeng.models.tagger:BiLSTMTagger",
    "lm": "dapeng.models.lm:LlamaLM",
    "seq2seq": "dapeng.models.seq2seq:Seq2SeqTransformer",
    "prodlda": "dapeng.models.prodlda:ProdLDA",
    "vqa": "dapeng.models.vqa:VQAModel",
    "clip": "dapeng.models.clip:CLIPModel",
}
for _name, _target in BUILTIN_MODELS.items():
    MODELS.register(_name, _target)

# What a constructor raises for an argument value it can't build with (layers raise ValueError,
# torch a RuntimeError for a negative size, integer arithmetic a ZeroDivisionError for zero heads).
_BAD_VALUE = (ValueError, AssertionError, KeyError, IndexError, ZeroDivisionError, RuntimeError)


def forward_inputs(model: Any, batch: Mapping[str, Any], names: Iterable[str] | None = None) -> dict[str, Any]:
    """The entries of `batch` (of `names`, when given) that `model.forward` takes as keyword arguments.

    A forward with `**kwargs` takes them all. The one place every caller (Pipeline, tasks,
    explainers) learns which batch tensors a model reads, e.g. a tagger's `char_ids`.
    """
    import inspect

    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    keys = batch if names is None else [k for k in names if k in batch]
    return {k: batch[k] for k in keys if takes_any or k in params}


def create_model(name: str, kwargs: Mapping[str, Any], given: Iterable[str] = (), key: str = "model.kwargs.") -> Any:
    """`MODELS.create(name, **kwargs)`, with a bad argument as one ModelError line naming its key.

    Args:
        name: a `MODELS` name.
        kwargs: the constructor arguments.
        given: the keys the user set (the others come from the task); the error names the
            one at fault among them.
        key: what goes before an argument's name in the message: `config key model.kwargs.`
            (a config), `--set ` (the command line).

    Raises:
        NotFoundError: an unknown model name.
        ModelError: an unknown argument, or a value the model can't be built with.
    """
    factory = MODELS.get(name)
    where = key.rstrip(". ")
    hint = f"see `dapeng models show {name}` for its arguments"
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise ModelError(f"{where}: model {name!r} rejects them: {err}", hint) from None
    except _BAD_VALUE as err:
        reason = str(err).strip("'\"") or type(err).__name__
        if isinstance(err, ZeroDivisionError):
            reason = f"a zero where a size is needed ({reason})"
        given = [k for k in given if k in kwargs]
        # the key the message names, else the only key the user set, else the only size ≤ 0 among them
        sizes = [k for k in given if type(kwargs[k]) is int and kwargs[k] <= 0]
        named = [k for k in given if re.search(rf"\b{re.escape(k)}\b", reason)] or (given if len(given) == 1 else [])
        named = named or (sizes if len(sizes) == 1 else [])
        if named:
            raise ModelError(f"{key}{named[0]}: {kwargs[named[0]]!r} doesn't build model {name!r}: {reason}",
                             hint) from None
        shown = ", ".join(f"{k}={kwargs[k]!r}" for k in (given or kwargs))
        raise ModelError(f"{where}: model {name!r} can't be built with {shown}: {reason}", hint) from None


__all__ = ["BUILTIN_MODELS", "MODELS", "create_model"]
