"""Data: the dataset catalog, readers for users' files, tokenizers and augmentation.

`load_splits(cfg)` is the one entry the runner uses; the rest is importable piecemeal
(`dapeng.data.catalog`, `.readers`, `.tokenizers`, `.augment`, `.glove`). Attributes load
lazily so that `dapeng data list` imports neither numpy nor torch.
"""

from __future__ import annotations

from dapeng._lazy import lazy_getattr

_LAZY = {
    "load_splits": "dapeng.data.splits:load_splits",
    "Splits": "dapeng.data.splits:Splits",
    "load_dataset": "dapeng.data.catalog:load_dataset",
    "fetch": "dapeng.data.catalog:fetch",
    "CATALOG": "dapeng.data.catalog:CATALOG",
    "read_records": "dapeng.data.readers:read_records",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
