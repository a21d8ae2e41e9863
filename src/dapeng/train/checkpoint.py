"""Checkpoints for exact resume: atomic writes, safe loads, every RNG state.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads
with `torch.load(weights_only=True)` (no pickle code runs). Writes are atomic
(`dapeng._files.atomic_write`): a process killed at any moment leaves either the old or
the new checkpoint, never a torn one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dapeng._files import atomic_write
from dapeng.errors import CheckpointError

FORMAT = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` (plus the format number) atomically with `torch.save`."""
    payload = {"format": FORMAT, **state}
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` with `weights_only=True`.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt or of an unknown format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found", "check the run directory")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle.UnpicklingError, EOFError, zipfile errors
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({type(err).__name__})",
            "delete it to restart, or restore it from a backup",
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} has an unknown format", f"expected format {FORMAT}")
    return state


def rng_state() -> dict[str, Any]:
    """Every random state a training step can consume: Python, NumPy, torch CPU and CUDA."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the random states saved by `rng_state`.

    A checkpoint loaded with `map_location="cuda"` brings these tensors to the GPU; the
    generators take their states from host memory, so each goes back to the CPU first.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
