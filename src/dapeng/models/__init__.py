"""Architectures, one per file, built from `dapeng.layers`; the `MODELS` registry.

Every model follows one contract (timm's): `forward_features(...)` returns features,
`forward_head(features)` maps them to outputs, `reset_head(num_labels)` swaps the head
for fine-tuning, and `forward(...)` is `forward_head(forward_features(...))`.
Constructors take plain typed keyword arguments only.
"""

from __future__ import annotations

from dapeng.registry import Registry

MODELS: Registry = Registry("model")

# The one explicit list of models: name -> "module:factory" (imported on first use).
for _name, _target in {
    "mlp": "dapeng.models.mlp:MLP",
    "lenet": "dapeng.models.lenet:LeNet",
    "resnet": "dapeng.models.resnet:ResNet",
    "textcnn": "dapeng.models.textcnn:TextCNN",
    "rnn": "dapeng.models.rnn:rnn",
    "gru": "dapeng.models.rnn:gru",
    "lstm": "dapeng.models.rnn:lstm",
    "transformer": "dapeng.models.transformer:TransformerEncoder",
    "lm": "dapeng.models.lm:LlamaLM",
    "seq2seq": "dapeng.models.seq2seq:Seq2SeqTransformer",
}.items():
    MODELS.register(_name, _target)

__all__ = ["MODELS"]
