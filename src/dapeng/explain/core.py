"""`explain(pipeline, inputs, method=...)`: from raw inputs to `Explanation`s.

The inputs take the one path of DESIGN.md — `task.encode` then `task.collate` — so the
model sees exactly what `predict` feeds it; the algorithms live in `attributions.py`
(Captum) and `attention.py`, the words in `words.py`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dapeng.errors import DapengError, ModelError, NotFoundError
from dapeng.explain import attention as attn
from dapeng.explain.attributions import image_attributions, text_attributions
from dapeng.explain.explanation import Explanation
from dapeng.explain.words import WordAlignment, align_words, merge_tokens
from dapeng.tasks.base import capabilities_of

METHODS = ("ig", "saliency", "gradcam", "attention", "rollout")
MAX_EXPLAINED_TOKENS = 256
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def explain(
    pipeline: Any,
    inputs: Any,
    method: str = "ig",
    target: str | int | None = None,
    memory_budget_mb: float = 2048,
    n_steps: int = 50,
    max_steps: int | None = None,
) -> list[Explanation]:
    """Explain the pipeline's predictions for `inputs`, one `Explanation` per input.

    Args:
        pipeline: anything with `.model`, `.task` and `.labels` (a `dapeng.Pipeline`).
        inputs: one input or a list: texts, `{"text": ...}` records, image paths, image
            bytes, numpy arrays (H, W[, C]) or PIL images.
        method: "ig" (Integrated Gradients), "saliency", "gradcam" (images), "attention"
            (every layer's and head's weights) or "rollout" (attention rollout).
        target: the label to explain (name or index); the predicted one when None.
            For a language model, the index of the generated token to explain.
        memory_budget_mb: bound on the activations one attribution pass holds at once;
            the internal batch is chosen to fit it.
        n_steps: Integrated Gradients steps to start with, doubled while the attributions
            miss completeness by more than 5%, up to `max_steps` (default 8 x n_steps).

    Raises:
        DapengError: an unknown method or target, or a method the model cannot support.
    """
    if method not in METHODS:
        raise DapengError(f"unknown explanation method {method!r}", f"choose one of: {', '.join(METHODS)}")
    task = pipeline.task
    # the pipeline's own: a backend without gradients (ONNX Runtime) declares no explanations
    caps = getattr(pipeline, "capabilities", None) or capabilities_of(task)
    caps.require_method(method, getattr(pipeline, "name", "model"), getattr(task, "name", "?"))
    pipeline = _in_fp32(pipeline)
    model: nn.Module = pipeline.model
    steps = (n_steps, max_steps or 8 * n_steps)
    was_training = model.training
    model.eval()
    try:
        return [
            _explain_one(pipeline, record, raw, method, target, memory_budget_mb, steps)
            for record, raw in _records(pipeline, inputs)
        ]
    finally:
        model.train(was_training)


def _in_fp32(pipeline: Any) -> Any:
    """The pipeline itself, or for a bf16/fp16 model a view of it over an fp32 copy.

    Gradients and IG's Riemann sums in half precision lose the completeness they promise;
    the copy costs the model's size once more, for the length of the call.
    """
    if all(p.dtype == torch.float32 for p in pipeline.model.parameters() if p.is_floating_point()):
        return pipeline
    return pipeline.in_fp32()


# ---------------------------------------------------------------- inputs


def _load_image(value: Any) -> np.ndarray:
    from PIL import Image

    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, Path)):
        try:
            value = Image.open(value)
        except OSError as err:
            raise DapengError(f"cannot read image {str(value)!r}: {err}", "pass a PNG or JPEG file") from None
    if isinstance(value, Image.Image):
        return np.asarray(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    raise DapengError(f"cannot explain an input of type {type(value).__name__}", "pass text or an image")


def _is_image_path(value: Any) -> bool:
    return isinstance(value, Path) or (
        isinstance(value, str) and value.lower().endswith(IMAGE_SUFFIXES) and Path(value).is_file()
    )


def _records(pipeline: Any, inputs: Any) -> list[tuple[dict[str, Any], Any]]:
    """(record, raw input) per input; anything but a list or tuple is one input.

    A `dapeng.Pipeline` reads inputs itself (`to_records`, as `predict` does); other
    pipeline-like objects get texts as {"text": ...} and anything else as an image.
    """
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    to_records = getattr(pipeline, "to_records", None)
    if callable(to_records):
        records = to_records(items)
        return [(r, r.get("image", r.get("text"))) for r in records]
    out = []
    for item in items:
        if isinstance(item, dict):
            record = {k: v for k, v in item.items() if k not in ("label", "labels", "tags")}
            if "image" in record:
                record["image"] = _load_image(record["image"])
            out.append((record, record.get("image", record.get("text"))))
        elif isinstance(item, str) and not _is_image_path(item):
            out.append(({"text": item}, item))
        else:
            image = _load_image(item)
            out.append(({"image": image}, image))
    return out


def _batch(task: Any, record: dict[str, Any], device: torch.device) -> dict[str, Any]:
    batch = task.collate(task.encode([record]))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# ---------------------------------------------------------------- targets


def _label_names(pipeline: Any, k: int) -> list[str]:
    labels = getattr(pipeline, "labels", None)
    return [str(x) for x in labels] if labels else [str(i) for i in range(k)]


def resolve_target(labels: list[str], target: str | int | None, probs: torch.Tensor) -> int:
    """The label index to explain: `target` by name or index, else the argmax of `probs`."""
    if target is None:
        return int(probs.argmax())
    if isinstance(target, str):
        if target in labels:
            return labels.index(target)
        folded = [x.lower() for x in labels]
        if target.lower() in folded:
            return folded.index(target.lower())
        if not target.lstrip("-").isdigit():
            raise NotFoundError(f"unknown label {target!r}", f"choose one of: {', '.join(labels)}")
        target = int(target)
    if not 0 <= target < len(labels):
        raise NotFoundError(f"label index {target} out of range", f"use 0..{len(labels) - 1}")
    return int(target)


# ---------------------------------------------------------------- one input


def _explain_one(
    pipeline: Any, record: dict[str, Any], raw: Any, method: str, target: Any, budget: float, steps: tuple[int, int]
) -> Explanation:
    caps = capabilities_of(pipeline.task)
    if caps.output == "text":
        # A language model's task encodes training text in blocks ending in end-of-text;
        # a prompt is encoded as `generate` encodes it.
        text = record["text"]
        ids = torch.tensor([pipeline.task.prompt_ids(text)], device=_device(pipeline.model))
        return _explain_prompt(pipeline, ids, align_words(pipeline.task, text, ids[0].tolist()), method, target)
    batch = _batch(pipeline.task, record, _device(pipeline.model))
    if caps.input == "image+text":
        return _explain_image_text(pipeline, record, raw, batch, method, target, budget, steps)
    if caps.input == "image":
        return _explain_image(pipeline, record, raw, batch, method, target, budget, steps)
    return _explain_text(pipeline, record, batch, method, target, budget, steps, tags=caps.output == "tags")


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return model(ids) if mask is None else model(ids, mask)


class _WithInputs(nn.Module):
    """The model with the batch's other per-sequence inputs bound (a tagger's `char_ids`).

    Attribution methods run the model on many copies of one sequence (one per target and
    IG step); the bound inputs are expanded to however many rows come.
    """

    def __init__(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.inputs = inputs

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        rows = input_ids.shape[0]
        bound = {k: v.expand(rows, *v.shape[1:]) for k, v in self.inputs.items()}
        return self.model(input_ids, attention_mask, **bound)


def _bind_inputs(model: nn.Module, batch: dict[str, Any]) -> nn.Module:
    from dapeng.models import forward_inputs

    taken = forward_inputs(model, {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")})
    extra = {k: v[:1] for k, v in taken.items() if torch.is_tensor(v)}
    return _WithInputs(model, extra) if extra else model


def _pad_id(task: Any, alignment: WordAlignment) -> int:
    for source in (getattr(task, "pad_id", None), _kwarg(task, "pad_id"), alignment.pad_id):
        if source is not None:
            return int(source)
    return 0


def _kwarg(task: Any, name: str) -> Any:
    try:
        return task.model_kwargs().get(name)
    except Exception:  # a task rebuilt for inference may not know its sizes; other sources remain
        return None


def _explain_text(
    pipeline: Any, record: dict[str, Any], batch: dict[str, Any], method: str, target: Any, budget: float,
    steps: tuple[int, int], tags: bool = False,
) -> Explanation:
    task = pipeline.task
    if batch["input_ids"].shape[0] > 1:  # a tagger's sentence longer than one window
        raise DapengError(f"the input is longer than the model's window ({batch['input_ids'].shape[1]} tokens)",
                          "explain a shorter text")
    model = _bind_inputs(pipeline.model, batch)
    ids: torch.Tensor = batch["input_ids"][:1]  # (1, T)
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask[:1]
    text = record.get("text") if isinstance(record.get("text"), str) else " ".join(record.get("tokens", []))
    alignment = align_words(task, text, ids[0].tolist(), batch.get("word_ids"))
    with torch.no_grad():
        out = _forward(model, ids, mask).float()
    if method == "gradcam":
        raise ModelError("Grad-CAM explains image models", "use method ig or saliency for text")
    if method in ("attention", "rollout"):
        return _explain_attention(pipeline, ids, mask, out, alignment, method, target)
    keep = torch.tensor([w is not None for w in alignment.word_of_token], device=ids.device)
    baseline = torch.where(keep, torch.full_like(ids, _pad_id(task, alignment)), ids)
    if tags:  # a tagger: (1, T, K), one explanation row per word
        return _explain_tags(pipeline, model, ids, mask, baseline, out, alignment, method, budget, steps)
    probs = out[0].softmax(-1)
    labels = _label_names(pipeline, probs.numel())
    k = resolve_target(labels, target, probs)
    result = text_attributions(model, ids, mask, baseline, [k], method, *steps, budget)
    predicted = int(probs.argmax())
    return Explanation(
        method=method, kind="text", label=labels[k], label_index=k, probability=float(probs[k]),
        predicted=labels[predicted], predicted_probability=float(probs[predicted]),
        scores=merge_tokens(result.scores[0], alignment), text=alignment.text, words=alignment.words,
        spans=alignment.spans, completeness=result.completeness[0] if result.completeness else None,
        internal_batch_size=result.internal_batch_size,
    )


def _explain_tags(
    pipeline: Any, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, baseline: torch.Tensor,
    out: torch.Tensor, alignment: WordAlignment, method: str, budget: float, steps: tuple[int, int],
) -> Explanation:
    probs = out[0].softmax(-1)  # (T, K)
    labels = _label_names(pipeline, probs.shape[-1])
    firsts = alignment.first_tokens()
    if not firsts:
        raise DapengError("nothing to explain: the input has no words", "pass a non-empty text")
    crf = getattr(pipeline.model, "crf", None)
    if crf is not None:  # the tags the model predicts are the CRF's best path, not each word's argmax
        words = out[:, firsts]
        tags = crf.decode(words, torch.ones(words.shape[:2], dtype=torch.bool, device=words.device))[0]
    else:
        tags = [int(probs[t].argmax()) for t in firsts]
    targets = [(t, k) for t, k in zip(firsts, tags)]
    result = text_attributions(model, ids, mask, baseline, targets, method, *steps, budget)
    matrix = np.stack([merge_tokens(row, alignment) for row in result.scores])  # (W, W)
    tag_probs = [float(probs[t, k]) for t, k in targets]
    mean = float(np.mean(tag_probs))
    names = [labels[k] for k in tags]
    return Explanation(
        method=method, kind="tokens", label="per-token", label_index=-1, probability=mean,
        predicted=" ".join(names), predicted_probability=mean, scores=matrix, text=alignment.text,
        words=alignment.words, spans=alignment.spans, tags=names, internal_batch_size=result.internal_batch_size,
        extra={"tag_probabilities": tag_probs, "completeness": result.completeness or []},
    )


def _explain_attention(
    pipeline: Any, ids: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor, alignment: WordAlignment,
    method: str, target: Any,
) -> Explanation:
    model = pipeline.model
    _, maps, last = attn.capture_with_inputs(model, lambda: _forward(model, ids, mask))
    roll = attn.rollout(maps)  # (1, T, T)
    pooling = getattr(model, "pooling", None)
    if method == "attention" and last is not None and maps[-1].shape[-1] == maps[-1].shape[-2]:
        # the last layer's weights, scaled by how much of each token they carry (norm of W_o v)
        queries = attn.query_weights(ids.shape[1], 1, mask, pooling).to(maps[-1].device)
        importance = attn.value_weighted(maps[-1], last[0], last[1], queries)[0]  # (T,)
    else:  # rollout: every layer's head-averaged weights mixed with the residual stream
        flow = roll if method == "rollout" else maps[-1].mean(1)  # (1, T, T)
        importance = attn.token_importance(flow, mask, pooling)[0]  # (T,)
    probs = out[0].softmax(-1) if out.dim() == 2 else out[0].softmax(-1).amax(0)
    labels = _label_names(pipeline, probs.numel())
    k = resolve_target(labels, target, probs)
    predicted = int(probs.argmax())
    return Explanation(
        method=method, kind="attention", label=labels[k], label_index=k, probability=float(probs[k]),
        predicted=labels[predicted], predicted_probability=float(probs[predicted]),
        scores=merge_tokens(importance.cpu().numpy(), alignment), text=alignment.text,
        words=alignment.words, spans=alignment.spans, tokens=alignment.tokens,
        attention=[m[0].cpu().numpy() for m in maps],
        rollout=roll[0].cpu().numpy(),
    )


def _explain_prompt(
    pipeline: Any, ids: torch.Tensor, alignment: WordAlignment, method: str, target: Any
) -> Explanation:
    """A language model: its attention over the prompt for the `target`-th generated token."""
    if method not in ("attention", "rollout"):
        raise ModelError(
            "a language model's generations are explained by attention",
            "use method attention (the attention over the prompt for a generated token)",
        )
    index = _generated_index(target)
    generated, probs, rows = attn.prompt_attention(pipeline.model, ids, new_tokens=index + 1)
    mean = torch.stack([r.mean(0) for r in rows]).mean(0)[: ids.shape[1]]  # (P,) over layers and heads
    piece = alignment.token_text(generated[-1])
    return Explanation(
        method="attention", kind="attention", label=piece, label_index=generated[-1], probability=probs[-1],
        predicted=piece, predicted_probability=probs[-1],
        scores=merge_tokens(mean.cpu().numpy(), alignment), text=alignment.text, words=alignment.words,
        spans=alignment.spans, tokens=alignment.tokens + [alignment.token_text(t) for t in generated[:-1]],
        attention=[r.cpu().numpy() for r in rows],
        extra={"generated": [alignment.token_text(t) for t in generated]},
    )


def _generated_index(target: Any) -> int:
    """Which generated token to explain: an index 0..MAX_EXPLAINED_TOKENS-1 (default 0, the first)."""
    if target is None:
        return 0
    text = str(target)
    if isinstance(target, bool) or not text.isdigit() or int(text) >= MAX_EXPLAINED_TOKENS:
        raise NotFoundError(f"target {target!r} is not the index of a generated token",
                            f"a language model's target is 0..{MAX_EXPLAINED_TOKENS - 1}: which generated token to explain")
    return int(text)


def _display_image(raw: Any, height: int, width: int) -> np.ndarray:
    """The input as (H, W, C) floats in [0, 1], resized to the model's input size."""
    from PIL import Image

    image = np.asarray(raw)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3, 4):
        image = image.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if image.dtype != np.uint8:
        image = np.clip(image * (255.0 if image.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.shape[:2] != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    image = image.astype(np.float32) / 255.0
    return image[..., None] if image.ndim == 2 else image


def _explain_image(
    pipeline: Any, record: dict[str, Any], raw: Any, batch: dict[str, Any], method: str, target: Any,
    budget: float, steps: tuple[int, int],
) -> Explanation:
    model, task = pipeline.model, pipeline.task
    images: torch.Tensor = batch["images"][:1].float()  # (1, C, H, W)
    with torch.no_grad():
        probs = model(images).float()[0].softmax(-1)
    labels = _label_names(pipeline, probs.numel())
    k = resolve_target(labels, target, probs)
    predicted = int(probs.argmax())
    height, width = images.shape[-2:]
    display = _display_image(raw, height, width)
    common = dict(
        method=method, label=labels[k], label_index=k, probability=float(probs[k]), predicted=labels[predicted],
        predicted_probability=float(probs[predicted]), image=display,
    )
    if method in ("attention", "rollout"):
        _, maps = attn.capture(model, lambda: model(images))
        roll = attn.rollout(maps)[0]
        return Explanation(kind="attention", scores=roll.mean(0).cpu().numpy(), rollout=roll.cpu().numpy(),
                           attention=[m[0].cpu().numpy() for m in maps], **common)
    black = {**record, "image": np.zeros_like(np.asarray(record["image"]))}
    baseline = _batch(task, black, images.device)["images"][:1].float()
    result = image_attributions(model, images, baseline, k, method, *steps, budget)
    return Explanation(
        kind="image", scores=result.scores[0], internal_batch_size=result.internal_batch_size,
        completeness=result.completeness[0] if result.completeness else None, **common,
    )


class _ImageSide(nn.Module):
    """An image+text model seen as an image model: the question bound (Grad-CAM's view)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.model, self.ids, self.mask = model, ids, mask

    @property
    def cam_layer(self) -> nn.Module:
        return self.model.cam_layer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows = images.shape[0]
        return self.model(images, self.ids.expand(rows, -1), self.mask.expand(rows, -1))


class _TextSide(nn.Module):
    """An image+text model seen as a text model: the image bound (word attributions' view)."""

    def __init__(self, model: nn.Module, images: torch.Tensor) -> None:
        super().__init__()
        self.model, self.images = model, images

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        images = self.images.expand(input_ids.shape[0], *self.images.shape[1:])
        return self.model(images, input_ids, attention_mask)


def _explain_image_text(
    pipeline: Any, record: dict[str, Any], raw: Any, batch: dict[str, Any], method: str, target: Any,
    budget: float, steps: tuple[int, int],
) -> Explanation:
    """A question about an image: Grad-CAM over the image and Integrated Gradients over the question's
    words, both for the same answer (`method` "gradcam" names the image half)."""
    if method != "gradcam":
        raise ModelError(f"an image+text model is explained by gradcam, not {method!r}",
                         "use method gradcam: a map over the image and word attributions of the question")
    model, task = pipeline.model, pipeline.task
    images = batch["images"][:1].float()  # (1, C, H, W)
    ids, mask = batch["input_ids"][:1], batch["attention_mask"][:1]  # (1, T)
    with torch.no_grad():
        probs = model(images, ids, mask).float()[0].softmax(-1)
    labels = _label_names(pipeline, probs.numel())
    k = resolve_target(labels, target, probs)
    predicted = int(probs.argmax())
    cam = image_attributions(_ImageSide(model, ids, mask), images, images, k, "gradcam", *steps, budget)
    alignment = align_words(task, record["text"], ids[0].tolist())
    keep = torch.tensor([w is not None for w in alignment.word_of_token], device=ids.device)
    baseline = torch.where(keep, torch.full_like(ids, _pad_id(task, alignment)), ids)
    words = text_attributions(_TextSide(model, images), ids, mask, baseline, [k], "ig", *steps, budget)
    return Explanation(
        method=method, kind="image", label=labels[k], label_index=k, probability=float(probs[k]),
        predicted=labels[predicted], predicted_probability=float(probs[predicted]),
        scores=cam.scores[0], image=_display_image(raw, *images.shape[-2:]), text=alignment.text,
        words=alignment.words, spans=alignment.spans,
        completeness=words.completeness[0] if words.completeness else None,
        extra={"word_scores": merge_tokens(words.scores[0], alignment).tolist()},
    )
