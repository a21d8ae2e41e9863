"""dapeng: build → train → fine-tune → explain → compress → serve deep neural networks on PyTorch.

`import dapeng` stays light: heavy modules (torch-dependent API, FastAPI, Captum,
ONNX, tokenizers) load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'dapeng' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
