"""Image–caption pairs for contrastive (CLIP-style) training, made from labelled data sets.

* `easy-vqa-captions`: one caption per easy-VQA image, "a {color} {shape}", read off its QA pairs:
  the answer of a color question ("what color is the shape?" → "red") or a shape question ("what
  shape is in the image?" → "circle"), else a yes/no question that names a color or shape and
  whose answer says it is there ("is there a red shape?" yes, "is there not a circle?" no). An
  image whose questions never reveal its color says "a {shape}", never its shape "a {color} shape".
* `fashion-mnist-captions`: each image described by a template around its class name ("a picture of
  a sneaker", "this is a dress"), the template chosen by the image's index: the loss sees only these
  texts, never a label. `ZERO_SHOT_TEMPLATE` is not among the training templates: zero-shot
  prompts are phrasings the model has not read.

Records are `{"image", "text"}` plus `"label"` (Fashion-MNIST's class, for zero-shot evaluation
only) or `"image_id"` (easy-VQA).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from dapeng.data.datasets import (
    EASY_VQA_COLORS,
    EASY_VQA_SHAPES,
    FASHION_MNIST_CLASSES,
    Records,
    easy_vqa,
    fashion_mnist,
)

FASHION_MNIST_NAMES = {
    "T-shirt/top": "t-shirt", "Trouser": "pair of trousers", "Pullover": "pullover", "Dress": "dress",
    "Coat": "coat", "Sandal": "sandal", "Shirt": "shirt", "Sneaker": "sneaker", "Bag": "bag",
    "Ankle boot": "ankle boot",
}
TEMPLATES = ("a {}", "a picture of a {}", "an image of a {}", "this is a {}", "a small grey {}")
ZERO_SHOT_TEMPLATE = "a photo of a {}"


def class_prompts(classes: tuple[str, ...] = FASHION_MNIST_CLASSES) -> dict[str, str]:
    """The zero-shot prompt of each Fashion-MNIST class: {"Sneaker": "a photo of a sneaker", ...}."""
    return {c: ZERO_SHOT_TEMPLATE.format(FASHION_MNIST_NAMES[c]) for c in classes}


def fashion_mnist_captions(folder: Path) -> Records:
    from dapeng.data.catalog import fetch

    del folder  # the captions are made from fashion-mnist's own cached files
    out: Records = {}
    for split, records in fashion_mnist(fetch("fashion-mnist")).items():
        out[split] = [{"image": r["image"], "label": r["label"],
                       "text": TEMPLATES[i % len(TEMPLATES)].format(FASHION_MNIST_NAMES[r["label"]])}
                      for i, r in enumerate(records)]
    return out


def _revealed(question: str, answer: str) -> tuple[str, str] | None:
    """("color" | "shape", word) when a yes/no question shows the image holds that color or shape."""
    words = question.rstrip("?").split()
    negated = "not" in words or words[:2] == ["is", "no"]
    if (answer == "yes") == negated:
        return None
    for word in words:
        if word in EASY_VQA_COLORS:
            return "color", word
        if word in EASY_VQA_SHAPES:
            return "shape", word
    return None


def caption_from_qa(pairs: list[tuple[str, str, str]]) -> str:
    """The caption of one image from its (question, answer, type) triples (module docstring)."""
    seen: dict[str, str] = {}
    for _question, answer, kind in pairs:
        if kind in ("color", "shape"):
            seen[kind] = answer
    for question, answer, kind in pairs:
        found = _revealed(question, answer) if kind == "yes/no" else None
        if found:
            seen.setdefault(*found)
    if "shape" not in seen:
        return f"a {seen['color']} shape" if "color" in seen else "a shape"
    return f"a {seen['color']} {seen['shape']}" if "color" in seen else f"a {seen['shape']}"


def easy_vqa_captions(folder: Path) -> Records:
    from dapeng.data.catalog import fetch

    del folder  # made from easy-vqa's own cached wheel
    out: Records = {}
    for split, records in easy_vqa(fetch("easy-vqa")).items():
        pairs: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        images = {}
        for r in records:
            pairs[r["image_id"]].append((r["text"], r["label"], r["type"]))
            images[r["image_id"]] = r["image"]
        out[split] = [{"image": images[i], "text": caption_from_qa(pairs[i]), "image_id": i} for i in images]
    return out
