"""The plain shapes data takes on the one path (DESIGN.md), named once for every package.

* a *record*: a dict straight from a reader or the catalog (`{"text": ..., "label": ...}`);
* an *item*: what `Task.encode` makes of one record (tensors, cached once);
* a *batch*: what `Task.collate` makes of a list of items (padded per batch).
"""

from __future__ import annotations

from typing import Any

Record = dict[str, Any]
Item = dict[str, Any]
Batch = dict[str, Any]
