"""Choosing Captum's `internal_batch_size` from a memory budget.

Integrated Gradients runs the model on `n_steps` scaled copies of each input; Captum runs
them all in one batch unless told otherwise, which is how a long input runs out of memory
(captum#245, #538). Here a probe forward on ONE example, with the input requiring grad,
records every tensor autograd keeps for the backward pass (`saved_tensors_hooks`): that is
the activation memory one step costs. The budget divided by it (with headroom for the
backward's temporaries) is the number of steps run together.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# The backward pass allocates gradients about as large as the saved activations, plus
# temporaries; 2x the saved bytes covered the measured peak of every model tried here.
BACKWARD_FACTOR = 2.0


def saved_activation_bytes(run: Callable[[], torch.Tensor], model: nn.Module | None = None) -> int:
    """Bytes autograd saves for backward while `run()` executes (parameters excluded).

    Args:
        run: a closure running one forward on one example; its inputs must require grad
            (or the model's parameters must) for autograd to save anything.
        model: its parameters are shared by every step, so they are not counted.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()) + out.numel() * out.element_size()


def internal_batch_size(per_example_bytes: int, budget_mb: float, total: int) -> int:
    """How many examples (input copies x steps) one forward/backward may hold.

    Args:
        per_example_bytes: saved activation bytes of one example (`saved_activation_bytes`).
        budget_mb: the memory the attribution's activations may use, in MiB.
        total: the most that would ever be run together (n_steps x examples).

    Returns:
        At least 1, at most `total`.
    """
    need = max(1.0, per_example_bytes * BACKWARD_FACTOR)
    return int(max(1, min(total, (budget_mb * 2**20) // need)))
