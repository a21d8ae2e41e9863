"""Learning from unlabeled data: each model against the labels-only one, on the canonical test splits.

    python benchmarks/few_labels.py                      # every section
    python benchmarks/few_labels.py --section mlm        # one section (repeatable)
    python benchmarks/few_labels.py --quick              # small slices, a few steps (a smoke run)

Sections (each a function `section_<name>(args) -> {"results": {...}, "ratios": {...}}` in `SECTIONS`;
the results of all sections asked for are merged into one JSON line):

* `mlm`: `results.rotten-tomatoes.{scratch,mlm_pretrained}.test_accuracy`. The same Transformer
  classifier (`CLASSIFIER`, the shape of `examples/rotten-tomatoes-mlm-pretrain.yaml`'s encoder,
  no GloVe) trained on the labelled train split from random weights, and from the encoder that
  example pretrains with masked-LM on the train split's text (labels dropped, `data.unlabeled`).
  Target: +3 points.
* `simclr`: `results.fashion-mnist.simclr.linear_probe_accuracy`: the LeNet backbone that
  `examples/fashion-mnist-simclr.yaml` pretrains with SimCLR, frozen; a logistic regression
  (scikit-learn, standardised features) fit on its features of the 55,000 train images and scored
  on the 10,000 test images. Against the same backbone at random init (`random_init`, probed the
  same way) and a logistic regression on the pixels (`pixels`). Target: 85%.

Runs are trained into `--runs` by `dapeng.runner.train`; a finished run whose config equals the
one asked for is reused, so training (the MLM and SimCLR pretraining above all) can be done once.
Speed figures on a shared machine are noisy; the accuracies are what this benchmark is for.

The last line of stdout is one JSON object: {"results": {...}, "ratios": {...}, "env": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUICK = ["train.max_steps=20", "train.epochs=1", "data.limit=300"]


def log(msg: str) -> None:
    print(f"[few_labels {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def trained_run(config: Any, out: Path) -> tuple[Path, float | None]:
    """The run directory of `config` (trained now unless a finished run of the same config is in `out`)
    and the training time in seconds (None when reused)."""
    from dapeng.config import load_config
    from dapeng.runner import train

    saved = out / "config.yaml"
    # the same config, read with today's defaults (a key added since the run was trained takes its default)
    if (out / "model" / "dapeng.json").is_file() and saved.is_file() and load_config(saved) == config:
        log(f"reusing {out}")
        return out, None
    if out.exists():
        shutil.rmtree(out)
    log(f"training into {out}")
    start = time.perf_counter()
    train(config, out, progress=False)
    return out, time.perf_counter() - start


def example_config(name: str, quick: bool, extra: list[str] = ()) -> Any:
    from dapeng.config import load_config

    return load_config(EXAMPLES / f"{name}.yaml", [*(QUICK if quick else []), *extra])


def run_facts(run: Path, seconds: float | None) -> dict[str, Any]:
    metrics = json.loads((run / "metrics.json").read_text())
    facts = {"steps": metrics["train"].get("steps"), "train_precision": metrics["train"].get("precision")}
    if seconds is not None:
        facts["train_seconds"] = seconds
    return facts


# ---------------------------------------------------------------- mlm


def classifier_config(pretrain: Any, init: Path | None, quick: bool, epochs: int = 2) -> Any:
    """The rotten-tomatoes classifier: the pretraining example's encoder shape, from scratch or from `init`."""
    from dapeng.config import validate_config

    shape = dict(pretrain.model.kwargs)
    opts = pretrain.task_options
    raw: dict[str, Any] = {
        "task": "text-classification",
        "task_options": {"tokenizer": opts.get("tokenizer", "wordpiece"), "vocab_size": opts.get("vocab_size", 8000),
                         "max_length": opts.get("max_length", 64)},
        "data": {"dataset": "rotten-tomatoes", **({"limit": 300} if quick else {})},
        # with init, only what owns no weights may be set: the shape comes with the encoder
        "model": {"name": pretrain.model.name,
                  "kwargs": {k: shape[k] for k in ("pooling", "dropout")} if init else shape,
                  "init": str(init) if init else None},
        "train": {"epochs": 1 if quick else epochs, "batch_size": 64, "max_steps": 20 if quick else None,
                  "optimizer": {"name": "adamw", "lr": 1.0e-3, "weight_decay": 0.01},
                  "schedule": {"name": "cosine", "warmup_steps": 100}, "grad_clip": 1.0,
                  "monitor": "eval/accuracy", "seed": 0},
    }
    return validate_config(raw)


def section_mlm(args: argparse.Namespace) -> dict[str, Any]:
    """Rotten Tomatoes: the same classifier from scratch and from the MLM-pretrained encoder."""
    suffix = "-quick" if args.quick else ""
    pretrain = example_config("rotten-tomatoes-mlm-pretrain", args.quick)
    mlm_run, mlm_seconds = trained_run(pretrain, args.runs / f"rotten-tomatoes-mlm-pretrain{suffix}")
    mlm_metrics = json.loads((mlm_run / "metrics.json").read_text())
    out: dict[str, Any] = {"mlm_pretraining": {**run_facts(mlm_run, mlm_seconds),
                                               "eval_masked_accuracy": mlm_metrics["eval"].get("masked_accuracy"),
                                               "eval_perplexity": mlm_metrics["eval"].get("perplexity")}}
    for key, init in (("scratch", None), ("mlm_pretrained", mlm_run)):
        run, seconds = trained_run(classifier_config(pretrain, init, args.quick, args.classifier_epochs),
                                   args.runs / f"rotten-tomatoes-classifier-{key}{suffix}")
        metrics = json.loads((run / "metrics.json").read_text())
        out[key] = {"test_accuracy": metrics["test"]["accuracy"], "test_macro_f1": metrics["test"]["macro_f1"],
                    "eval_accuracy": metrics["eval"]["accuracy"], **run_facts(run, seconds)}
        log(f"rotten-tomatoes {key}: {out[key]}")
    gain = 100 * (out["mlm_pretrained"]["test_accuracy"] - out["scratch"]["test_accuracy"])
    out["mlm_pretrained"]["points_over_scratch"] = gain
    ratio = out["mlm_pretrained"]["test_accuracy"] / out["scratch"]["test_accuracy"]
    return {"results": {"rotten-tomatoes": out}, "ratios": {"rotten_tomatoes_mlm_vs_scratch_test_accuracy": ratio}}


# ---------------------------------------------------------------- simclr


def backbone_features(model: Any, task: Any, records: list[dict[str, Any]], batch_size: int = 512) -> np.ndarray:
    """Frozen backbone features (the model's `forward_features`) of images, in record order."""
    import torch

    model.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(records), batch_size):
            batch = task.collate(task.encode(records[start : start + batch_size]))
            parts.append(model.forward_features(batch["images"]).float().numpy())
    return np.concatenate(parts)


def labels_of(records: list[dict[str, Any]]) -> np.ndarray:
    return np.array([r["label"] for r in records])


def section_simclr(args: argparse.Namespace) -> dict[str, Any]:
    """Fashion-MNIST: linear probes on the SimCLR backbone, the same backbone at random init, and the pixels."""
    import torch

    import dapeng
    from dapeng.data.catalog import load_dataset
    from dapeng.models import MODELS
    from dapeng.tasks.contrastive import linear_probe

    suffix = "-quick" if args.quick else ""
    steps = [f"train.max_steps={args.simclr_steps}"] if args.simclr_steps and not args.quick else []
    config = example_config("fashion-mnist-simclr", args.quick, steps)
    run, seconds = trained_run(config, args.runs / f"fashion-mnist-simclr{suffix}")
    splits = load_dataset("fashion-mnist")
    train, test = splits["train"], splits["test"]
    if args.quick:
        train, test = train[:600], test[:300]
    if args.probe_train:
        train = train[: args.probe_train]
    y_train, y_test = labels_of(train), labels_of(test)
    pipe = dapeng.load(run, precision="fp32")
    task = pipe.task
    results: dict[str, Any] = {}
    torch.manual_seed(config.train.seed)
    spec = json.loads((run / "model" / "dapeng.json").read_text())["model"]
    random_init = MODELS.create(spec["name"], **spec["kwargs"])
    for key, model in (("simclr", pipe.model), ("random_init", random_init)):
        start = time.perf_counter()
        accuracy = linear_probe(backbone_features(model, task, train), y_train,
                                backbone_features(model, task, test), y_test)
        results[key] = {"linear_probe_accuracy": accuracy, "probe_seconds": time.perf_counter() - start}
        log(f"fashion-mnist {key}: {results[key]}")
    results["simclr"].update(run_facts(run, seconds))
    pixels = lambda rs: np.stack([r["image"].reshape(-1) for r in rs]).astype(np.float32) / 255  # noqa: E731
    start = time.perf_counter()
    results["pixels"] = {"linear_probe_accuracy": linear_probe(pixels(train), y_train, pixels(test), y_test),
                         "probe_seconds": time.perf_counter() - start}
    log(f"fashion-mnist pixels: {results['pixels']}")
    simclr = results["simclr"]["linear_probe_accuracy"]
    return {"results": {"fashion-mnist": results},
            "ratios": {"fashion_mnist_simclr_vs_random_init_probe": simclr / results["random_init"]["linear_probe_accuracy"],
                       "fashion_mnist_simclr_vs_pixels_probe": simclr / results["pixels"]["linear_probe_accuracy"]}}


# The sections, in the order they run: other helpers add theirs here (a function returning results + ratios).
SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "mlm": section_mlm,
    "simclr": section_simclr,
}


def merge(into: dict[str, Any], more: dict[str, Any]) -> None:
    """Deep-merge `more` into `into` (sections share top-level data set keys)."""
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def env_info(threads: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"threads": threads, "precision": "fp32 (train.precision auto on this CPU)", "torch": torch.__version__,
            "cpu": cpu, "cores": os.cpu_count(), "load_average_at_end": os.getloadavg()[0],
            "note": "shared machine: other jobs ran at the same time, so seconds are noisy"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", action="append", choices=sorted(SECTIONS),
                        help="run only this section (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="300-record slices, 20 steps per training")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-few-labels"),
                        help="where the models are trained (finished runs of the same config are reused)")
    parser.add_argument("--classifier-epochs", type=int, default=2, help="mlm: epochs of both classifiers")
    parser.add_argument("--simclr-steps", type=int, default=None,
                        help="simclr: stop the pretraining after this many steps (default: the example's epochs)")
    parser.add_argument("--probe-train", type=int, default=None,
                        help="simclr: fit the probes on the first N train images (default: all 55,000)")
    args = parser.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"results": {}, "ratios": {}}
    with threadpool_limits(args.threads):
        for name in args.section or list(SECTIONS):
            merge(out, SECTIONS[name](args))
    print(json.dumps({**out, "env": env_info(args.threads)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
