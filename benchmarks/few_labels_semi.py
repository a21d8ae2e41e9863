"""Semi-supervised learning with few labels: FixMatch and pseudo-labelling against the labels-only model.

    python benchmarks/few_labels_semi.py            # the canonical test splits, full training
    python benchmarks/few_labels_semi.py --quick    # 30 steps on small slices (a smoke run)

Two few-label splits of the canonical training sets (`data.labels_per_class`, seeded and
stratified; the rest of train is the unlabeled pool, its labels dropped):
* `fashion-mnist.labels_1000`: 100 labels per class, 54,000 unlabeled images;
  `examples/fashion-mnist-fixmatch.yaml` (LeNet, 1,500 steps of 64 labelled + 3 x 64 unlabeled);
* `rotten-tomatoes.labels_500`: 250 labels per class, 9,746 unlabeled reviews;
  `examples/rotten-tomatoes-fixmatch.yaml` (TextCNN over frozen GloVe, 800 steps of 32 + 7 x 32).

Each example is trained three times, the same config but for its `semi:` section, so the
arms share the model, the labelled items, the steps, the optimizer and the schedule:
`supervised` (no `semi:`: the labelled few only), `pseudo_label` (`semi.method: pseudo_label`)
and `fixmatch` (the example as written). Every arm keeps its best checkpoint on the canonical
eval split (all labelled: 5,000 images / 1,281 reviews; the same for every arm) and is scored
on the canonical test split. Runs go to `--runs`; a finished run of the same config is reused.

The last line of stdout is one JSON object: {"results": {dataset: {split: {arm: {...}}}},
"ratios": {...}, "env": {...}}; `ratios.<dataset>_<arm>_vs_supervised` is the ratio of test
accuracies (above 1: the semi-supervised arm is better), `results.gains_points` the differences
in accuracy points.
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
SECTIONS = {  # dataset -> (results key of the split, example config)
    "fashion-mnist": ("labels_1000", "fashion-mnist-fixmatch"),
    "rotten-tomatoes": ("labels_500", "rotten-tomatoes-fixmatch"),
}
ARMS = ("supervised", "fixmatch", "pseudo_label")
QUICK = ["train.max_steps=30", "train.eval_every=15", "data.limit=600", "data.labels_per_class=20"]


def log(msg: str) -> None:
    print(f"[few_labels_semi {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def arm_config(example: str, arm: str, quick: bool) -> Any:
    """The example's config for one arm: without `semi:`, with pseudo-labelling, or as written."""
    from dapeng.config import load_config

    config = load_config(EXAMPLES / f"{example}.yaml", QUICK if quick else [])
    if arm == "supervised":
        return config.model_copy(update={"semi": None})
    if arm == "pseudo_label":
        return config.model_copy(update={"semi": config.semi.model_copy(update={"method": "pseudo_label"})})
    return config


def trained_run(config: Any, out: Path) -> tuple[dict[str, Any], float | None]:
    """The metrics of the run of `config` in `out` (trained now unless a finished run of the same
    config is there) and its training time in seconds (None when reused)."""
    from dapeng.config import load_config
    from dapeng.runner import train

    saved, metrics = out / "config.yaml", out / "metrics.json"
    if metrics.is_file() and saved.is_file() and load_config(saved) == config:
        log(f"reusing {out}")
        return json.loads(metrics.read_text()), None
    if out.exists():
        import shutil

        shutil.rmtree(out)
    log(f"training into {out}")
    start = time.perf_counter()
    result = train(config, out, progress=False)
    return result["metrics"], time.perf_counter() - start


def measure_semi(quick: bool, runs: Path = Path("runs/bench-few-labels"),
                 datasets: tuple[str, ...] = tuple(SECTIONS)) -> dict[str, Any]:
    """`results.<dataset>.<labels_N>.{supervised, pseudo_label, fixmatch}` and their ratios.

    Args:
        quick: 600-record slices, 20 labels per class, 30 steps.
        runs: where the runs are trained (finished runs of the same config are reused).
        datasets: which of `SECTIONS` to measure.
    """
    results: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    gains: dict[str, float] = {}
    for dataset in datasets:
        split, example = SECTIONS[dataset]
        arms: dict[str, Any] = {}
        for arm in ARMS:
            config = arm_config(example, arm, quick)
            metrics, seconds = trained_run(config, runs / f"{example}{'-quick' if quick else ''}-{arm}")
            train = metrics["train"]
            arms[arm] = {
                "test_accuracy": metrics["test"]["accuracy"], "eval_accuracy": metrics["eval"]["accuracy"],
                "labelled": train.get("train_records"),
                "unlabeled_used": train.get("unlabeled_records") if arm != "supervised" else 0,
                "steps": train["steps"], "best_step": train.get("best_step"),
                "unlabeled_confident_fraction": train.get("unlabeled_confident_fraction"),
                **({"train_seconds": seconds} if seconds is not None else {}),
            }
            log(f"{dataset} {split} {arm}: {arms[arm]}")
        results[dataset] = {split: arms}
        base = arms["supervised"]["test_accuracy"]
        for arm in ("fixmatch", "pseudo_label"):
            name = f"{dataset.replace('-', '_')}_{arm}_vs_supervised"
            ratios[name] = arms[arm]["test_accuracy"] / base if base else float("nan")
            gains[name] = 100 * (arms[arm]["test_accuracy"] - base)
    results["gains_points"] = gains
    return {"results": results, "ratios": ratios}


def env_info(threads: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"threads": threads, "precision": "fp32", "torch": torch.__version__, "cpu": cpu, "cores": os.cpu_count(),
            "load_average_at_end": os.getloadavg()[0],
            "note": "shared machine: train_seconds were measured under load"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small slices, 30 steps (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-few-labels"),
                        help="where the runs are trained (finished runs of the same config are reused)")
    parser.add_argument("--dataset", choices=list(SECTIONS), action="append",
                        help="measure only this data set (repeatable; default: both)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    measured = measure_semi(args.quick, args.runs, tuple(args.dataset or SECTIONS))
    print(json.dumps({**measured, "env": env_info(args.threads)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
