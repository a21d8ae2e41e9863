"""A tiny random Llama-layout `lm` and its `causal-lm` task (a BPE of a few sentences), for decoding tests."""

from __future__ import annotations

import torch

from dapeng.models import MODELS
from dapeng.pipeline import Pipeline
from dapeng.tasks import TASKS

CONTEXT = 64
TEXT = "the cat sat on the mat. the dog sat on the log. a bird sang in the tree. " * 4


def tiny_task(**kwargs):
    """A causal-lm task with a byte-level BPE learned from `TEXT`."""
    task = TASKS.create("causal-lm", vocab_size=300, block_size=16, max_length=CONTEXT, **kwargs)
    task.setup([{"text": TEXT}])
    return task


def tiny_model(vocab_size: int, seed: int = 0, hidden: int = 16) -> torch.nn.Module:
    """Two decoder blocks, GQA (4 query heads over 2 key/value heads), random fp32 weights.

    Llama's std 0.02 makes every logit nearly equal, so greedy decoding would repeat one
    token; the weights are scaled up so that the tokens vary and their logits stand apart.
    """
    torch.manual_seed(seed)
    model = MODELS.create("lm", vocab_size=vocab_size, hidden=hidden, layers=2, heads=4, kv_heads=2,
                          intermediate=2 * hidden, max_positions=CONTEXT)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(40)
    return model.eval()


def tiny_pipeline() -> Pipeline:
    task = tiny_task()
    return Pipeline(tiny_model(task.tokenizer.get_vocab_size()), task, name="tiny", precision="fp32", device="cpu")


def greedy_alone(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """`n` greedy tokens of `prompt` decoded on its own (`model.generate`), and their logits (n, V)."""
    tokens = model.generate(torch.tensor([prompt]), max_new_tokens=n, temperature=0.0)[0, len(prompt):].tolist()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]
    return tokens, logits
