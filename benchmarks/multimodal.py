"""Multimodal models: visual question answering on easy-VQA, and CLIP-style image-text matching.

    python benchmarks/multimodal.py              # every model on the canonical splits
    python benchmarks/multimodal.py --quick      # 300-record slices, 20 training steps (a smoke run)
    python benchmarks/multimodal.py --only vqa   # one part (finished runs are reused either way)

**easy-VQA** (`examples/easy-vqa-cnn-lstm.yaml`, `examples/easy-vqa-cross-attention.yaml`): the same
image encoder, question encoder and training recipe with each fusion — `concat`, `product`,
`cross-attention` — and the two baselines that see one input: `question-only` (the answer from the
question alone: what the language prior gets) and `image-only`. Each is trained by
`dapeng.runner.train` into `--runs` (a finished run whose config is the same is reused) and scored on
easy-VQA's own test split (9,673 questions about 1,000 images never seen in training), overall and
per question type (yes/no, shape, color).

**CLIP** (`examples/fashion-mnist-clip.yaml`, `examples/easy-vqa-clip.yaml`): image and text towers
trained with the symmetric InfoNCE loss on (image, caption) pairs only; on the test split,
retrieval recall@1/@5 image→text and text→image over `--gallery`-sized galleries (each image against
its own caption and the other captions of its gallery), and zero-shot classification of Fashion-MNIST
by prompting the class names, against two baselines measured here: a random guess (1/10) and a
supervised classifier with the same image tower trained on the labels (`examples/fashion-mnist-cnn`
recipe, same steps).

The last line of stdout is one JSON object: {"results": {...}, "ratios": {...}, "env": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
VQA_MODELS = {  # results key -> (example, overrides)
    "concat": ("easy-vqa-cnn-lstm", ["model.kwargs.fusion=concat"]),
    "product": ("easy-vqa-cnn-lstm", []),
    "cross-attention": ("easy-vqa-cross-attention", []),
    "question-only": ("easy-vqa-cnn-lstm", ["model.kwargs.fusion=question-only"]),
    "image-only": ("easy-vqa-cnn-lstm", ["model.kwargs.fusion=image-only"]),
}
CLIP_MODELS = {"fashion-mnist": "fashion-mnist-clip", "easy-vqa": "easy-vqa-clip"}  # data -> example
# the supervised baseline: the small-CPU Fashion-MNIST ResNet on the labels, as many images and steps as CLIP
SUPERVISED = ("fashion-mnist-cnn", ["train.epochs=3", "train.batch_size=256"])
QUICK = ["train.max_steps=20", "train.epochs=1", "data.limit=300"]


def log(msg: str) -> None:
    print(f"[multimodal {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def trained_run(example: str, overrides: list[str], name: str, runs: Path, quick: bool) -> tuple[Path, float | None]:
    """The run directory of `example` with `overrides` (trained now unless a finished run of the same
    config is there) and the training time in seconds (None when reused)."""
    from dapeng.config import load_config
    from dapeng.runner import train

    config = load_config(EXAMPLES / f"{example}.yaml", overrides + (QUICK if quick else []))
    out = runs / (f"{name}-quick" if quick else name)
    saved = out / "config.yaml"
    if (out / "model" / "dapeng.json").is_file() and saved.is_file() and load_config(saved) == config:
        log(f"{name}: reusing {out}")
        return out, None
    if out.exists():
        import shutil

        shutil.rmtree(out)
    log(f"{name}: training into {out}")
    start = time.perf_counter()
    train(config, out, progress=False)
    return out, time.perf_counter() - start


def vqa_results(runs: Path, quick: bool) -> dict[str, Any]:
    """Test accuracy (overall and per question type) of every fusion and baseline."""
    results: dict[str, Any] = {}
    for key, (example, overrides) in VQA_MODELS.items():
        run, seconds = trained_run(example, overrides, f"easy-vqa-{key}", runs, quick)
        test = json.loads((run / "metrics.json").read_text())["test"]
        results[key] = {f"test_{k}": v for k, v in test.items() if k.startswith("accuracy") or k == "macro_f1"}
        if seconds is not None:
            results[key]["train_seconds"] = seconds
        log(f"easy-vqa {key}: {results[key]}")
    return results


def vqa_ratios(results: dict[str, Any]) -> dict[str, Any]:
    fused = {k: v["test_accuracy"] for k, v in results.items() if k not in ("question-only", "image-only")}
    best = max(fused, key=fused.get)
    question_only = results["question-only"]["test_accuracy"]
    return {
        "easy-vqa.best_model": best,
        "easy-vqa.best_vs_question_only": fused[best] / question_only,
        "easy-vqa.best_points_over_question_only": 100 * (fused[best] - question_only),
        "easy-vqa.best_vs_image_only": fused[best] / results["image-only"]["test_accuracy"],
    }


def clip_results(runs: Path, quick: bool) -> dict[str, Any]:
    """Test retrieval recall of each CLIP run; zero-shot Fashion-MNIST against a random and a supervised baseline."""
    import dapeng
    from dapeng.data.captions import class_prompts
    from dapeng.data.catalog import load_dataset

    results: dict[str, Any] = {}
    for data, example in CLIP_MODELS.items():
        run, seconds = trained_run(example, [], example, runs, quick)
        test = json.loads((run / "metrics.json").read_text())["test"]
        results[data] = {k: v for k, v in test.items() if k.startswith("recall")}
        if seconds is not None:
            results[data]["train_seconds"] = seconds
        if data == "fashion-mnist":
            records = load_dataset("fashion-mnist-captions")["test"][: 300 if quick else None]
            pipe = dapeng.load(run)
            predicted = pipe.task.zero_shot(pipe.model, records, class_prompts())
            results[data]["zero_shot_accuracy"] = sum(p == r["label"] for p, r in zip(predicted, records)) / len(records)
            results[data]["zero_shot_prompts"] = sorted(class_prompts().values())
        log(f"clip {data}: {results[data]}")
    results["fashion-mnist"]["random_accuracy"] = 1 / len(class_prompts())  # a uniform guess over the classes
    run, _ = trained_run(*SUPERVISED, "fashion-mnist-supervised", runs, quick)
    results["fashion-mnist"]["supervised_accuracy"] = json.loads((run / "metrics.json").read_text())["test"]["accuracy"]
    return results


def clip_ratios(results: dict[str, Any]) -> dict[str, Any]:
    fm = results["fashion-mnist"]
    return {"clip.fashion-mnist.zero_shot_vs_random": fm["zero_shot_accuracy"] / fm["random_accuracy"],
            "clip.fashion-mnist.zero_shot_vs_supervised": fm["zero_shot_accuracy"] / fm["supervised_accuracy"]}


def env_info(threads: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "threads": threads,
        "precision": "fp32",
        "torch": torch.__version__,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],
        "note": "shared machine; training times are measured under load",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300-record slices, 20 training steps")
    parser.add_argument("--only", choices=("vqa", "clip"), default=None, help="run one part")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and evaluation")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-multimodal"),
                        help="where the models are trained (finished runs of the same config are reused)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    if args.only in (None, "vqa"):
        results["easy-vqa"] = vqa_results(args.runs, args.quick)
        ratios.update(vqa_ratios(results["easy-vqa"]))
    if args.only in (None, "clip"):
        results["clip"] = clip_results(args.runs, args.quick)
        ratios.update(clip_ratios(results["clip"]))
    print(json.dumps({"results": results, "ratios": ratios, "env": env_info(args.threads)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
