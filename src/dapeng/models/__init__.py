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
  also has `encode(...) -> (B, T, D)`, BERT's last hidden state.
* `lm`: `forward(input_ids, attention_mask=None) -> (B, T, V)`; `forward_features` = `encode`
  = final hidden states; `generate(...)` with a static KV cache.
* `seq2seq`: `forward(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
  -> (B, T_out, V)`; `encode`, `decode`, `generate(input_ids, attention_mask, max_new_tokens,
  num_beams)`.

Attention weights: `dapeng.layers.attention.capture_attention(model)`.
`dapeng.models.introspect` summarises and draws any registered model (`dapeng models`).
"""

from __future__ import annotations

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
    "lm": "dapeng.models.lm:LlamaLM",
    "seq2seq": "dapeng.models.seq2seq:Seq2SeqTransformer",
}
for _name, _target in BUILTIN_MODELS.items():
    MODELS.register(_name, _target)

__all__ = ["BUILTIN_MODELS", "MODELS"]
