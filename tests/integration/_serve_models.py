"""Tiny real Artifacts for serving tests: an image classifier (beside `test_serve.tiny_text_artifact`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def tiny_image_artifact(path: Path) -> Path:
    """A LeNet on 8x8 grey images, two labels (untrained: serving only needs it to be real)."""
    from dapeng.hub.artifact import save_artifact
    from dapeng.models import MODELS
    from dapeng.tasks import TASKS

    rng = np.random.default_rng(0)
    records = [{"image": rng.integers(0, 256, (8, 8), dtype=np.uint8), "label": ["cat", "dog"][i % 2]}
               for i in range(8)]
    task = TASKS.create("image-classification")
    task.setup(records)
    torch.manual_seed(0)
    kwargs = {**task.model_kwargs(), "channels": (4, 8), "hidden": 16}
    return save_artifact(path, model=MODELS.create("lenet", **kwargs), model_name="lenet", model_kwargs=kwargs,
                         task_name="image-classification", task_state=task.state())
