"""Explanations people can look at: attributions (Captum) and attention maps for any Pipeline.

    >>> from dapeng.explain import explain
    >>> [e] = explain(pipeline, "a gorgeous, witty film", method="ig")
    >>> e.save("report.html")

`explain(pipeline, inputs, method=...)` returns one `Explanation` per input; `Pipeline.explain`
calls it. Captum and matplotlib load only when an explanation is computed or drawn.
"""

from __future__ import annotations

from dapeng.explain.core import METHODS, explain, resolve_target
from dapeng.explain.explanation import Explanation

__all__ = ["METHODS", "Explanation", "explain", "resolve_target"]
