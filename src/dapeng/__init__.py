"""dapeng: build → train → fine-tune → explain → compress → serve deep neural networks on PyTorch.

`import dapeng` stays light: heavy modules (torch-dependent API, FastAPI, Captum,
ONNX, tokenizers) load on first attribute access.
"""

from __future__ import annotations

from dapeng._lazy import lazy_getattr

__version__ = "0.1.0"

# public name -> "module:attribute"; resolved lazily so `import dapeng` never imports torch.
_LAZY = {
    "load": "dapeng.pipeline:load",
    "Pipeline": "dapeng.pipeline:Pipeline",
    "Trainer": "dapeng.train.trainer:Trainer",
    "MODELS": "dapeng.models:MODELS",
    "TASKS": "dapeng.tasks:TASKS",
    "DapengError": "dapeng.errors:DapengError",
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)
