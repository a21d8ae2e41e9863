"""Classification on real data: each example config against a tuned classical baseline, same split.

    python benchmarks/classification.py                      # everything: minutes on a GPU, a day on 2 CPU cores
    python benchmarks/classification.py --datasets rotten-tomatoes --seeds 3
    python benchmarks/classification.py --datasets fashion-mnist --models resnet-small   # CPU-sized
    python benchmarks/classification.py --datasets fashion-mnist --example resnet=my.yaml  # another config
    python benchmarks/classification.py --quick              # small slices, one epoch (CI)

For each data set, on its canonical split (`dapeng data info NAME`):
* every example of `EXAMPLES` is trained with `dapeng.runner.train` (the code path of
  `dapeng train`), once per seed; test accuracy and macro-F1 are the mean over seeds;
* the baseline is scikit-learn logistic regression (pixels for images, TF-IDF word
  1–2-grams for text) with C chosen on the eval split;
* an example with a `distill:` section (`bilstm-distilled`) learns from a teacher: the run
  given by `--teacher`, else one trained first from `TEACHERS` (fine-tuned MiniLM-L6, about
  40 minutes on one core) and reported as `teacher`;
* with `--ablation`, the first example is trained again with augmentation off (seed 0),
  right after its own runs, to show what augmentation changed (on `--ablation-limit`
  training records, to bound the cost).

The last line of stdout is one JSON object: {"results": {dataset: {model: {...}}},
"ratios": {...}, "env": {...}}; ratios are model accuracy ÷ baseline accuracy (>1: the
neural model is better) and augmented ÷ plain accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES: dict[str, dict[str, str]] = {
    # `resnet` is sized for a GPU (4 minutes on an H200, many hours on 2 CPU cores in fp32);
    # `resnet-small` for a CPU budget: `--models resnet-small` on a machine without a GPU.
    "fashion-mnist": {"resnet": "examples/fashion-mnist-resnet.yaml", "resnet-small": "examples/fashion-mnist-cnn.yaml"},
    "rotten-tomatoes": {
        "bilstm": "examples/rotten-tomatoes-bilstm.yaml",
        "transformer": "examples/rotten-tomatoes-transformer.yaml",
        "cnn": "examples/rotten-tomatoes-cnn.yaml",
        # the BiLSTM distilled from fine-tuned MiniLM (the teacher trains first unless --teacher names one)
        "bilstm-distilled": "examples/rotten-tomatoes-bilstm-distilled.yaml",
    },
}
TEACHERS: dict[str, str] = {"rotten-tomatoes": "examples/rotten-tomatoes-minilm.yaml"}
NO_AUGMENT: dict[str, Any] = {"augment": {}}


class InitModel:
    """Trainer callback: let the task initialise the model (GloVe vectors) before the first step.

    The runner may call `task.init_model` itself; doing it again before any step copies the
    same vectors, so the two never conflict.
    """

    def on_fit_start(self, trainer: Any, **_: Any) -> None:
        init = getattr(trainer.task, "init_model", None)
        if callable(init) and trainer.state.step == 0:
            init(trainer.model)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_example(
    path: str,
    seed: int,
    out: Path,
    quick: bool,
    overrides: dict[str, Any] | None = None,
    limit: int | None = None,
    epochs: int | None = None,
    teacher: Path | None = None,
) -> dict[str, Any]:
    """Train one example config; returns test metrics, wall time and throughput."""
    from dapeng.config import RunConfig
    from dapeng.runner import train

    raw = yaml.safe_load((ROOT / path).read_text())
    raw = copy.deepcopy(raw)
    raw["train"]["seed"] = seed
    if overrides:
        raw["task_options"] = {**raw.get("task_options", {}), **overrides}
    if limit:
        raw["data"]["limit"] = limit
    if epochs:
        raw["train"]["epochs"] = epochs
    if quick:
        raw["data"]["limit"] = 600
        raw["train"]["epochs"] = 1
    if raw.get("distill") and teacher is not None:
        raw["distill"]["teacher"] = str(teacher)
    cfg = RunConfig.model_validate(raw)
    start = time.perf_counter()
    result = train(cfg, out, callbacks=[InitModel()], progress=False)
    wall = time.perf_counter() - start
    m = result["metrics"]
    facts = {k: v for k, v in m["train"].items() if k.startswith("teacher")}
    return {
        **facts,
        "test_accuracy": m["test"]["accuracy"],
        "macro_f1": m["test"]["macro_f1"],
        "eval_accuracy": m["eval"]["accuracy"],
        "wall_s": wall,
        "examples_per_s": m["train"].get("samples_per_sec"),
        "epochs": m["train"].get("epochs"),
        "precision": m["train"].get("precision"),
    }


def summarize(runs: list[dict[str, Any]], path: str) -> dict[str, Any]:
    accs = [r["test_accuracy"] for r in runs]
    return {
        **{k: v for k, v in runs[0].items() if k.startswith("teacher")},
        "test_accuracy": statistics.fmean(accs),
        "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "test_accuracy_seeds": accs,
        "macro_f1": statistics.fmean(r["macro_f1"] for r in runs),
        "eval_accuracy": statistics.fmean(r["eval_accuracy"] for r in runs),
        "wall_s": statistics.fmean(r["wall_s"] for r in runs),
        "examples_per_s": statistics.fmean(r["examples_per_s"] or 0.0 for r in runs),
        "epochs": runs[0]["epochs"],
        "precision": runs[0]["precision"],
        "seeds": len(runs),
        "config": path,
    }


def baseline(dataset: str, quick: bool) -> dict[str, Any]:
    """Logistic regression with C tuned on the eval split, on the same canonical split."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    from dapeng.config import DataConfig
    from dapeng.data import load_splits

    splits = load_splits(DataConfig(dataset=dataset, limit=600 if quick else None))
    start = time.perf_counter()
    if splits.train and "image" in splits.train[0]:

        def features(records: list[dict[str, Any]]) -> Any:
            return np.stack([np.asarray(r["image"], dtype=np.float32).ravel() / 255 for r in records])

        grid, max_iter = [0.01, 0.1, 1.0], 300
        x_train, x_eval, x_test = features(splits.train), features(splits.eval), features(splits.test)
        # lbfgs on 55k x 784 takes minutes per fit here: tune C on a seeded 10k subset, refit once on all
        tune = np.random.default_rng(0).permutation(len(x_train))[:10000]
    else:
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, lowercase=True)
        x_train = vec.fit_transform([r["text"] for r in splits.train])
        x_eval, x_test = (vec.transform([r["text"] for r in s]) for s in (splits.eval, splits.test))
        grid, max_iter = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0], 1000
        tune = None
    y_train, y_eval, y_test = ([str(r["label"]) for r in s] for s in (splits.train, splits.eval, splits.test))
    best: tuple[float, float, Any] | None = None
    x_tune = x_train if tune is None else x_train[tune]
    y_tune = y_train if tune is None else [y_train[i] for i in tune]
    for c in grid:
        clf = LogisticRegression(C=c, max_iter=200 if quick else max_iter).fit(x_tune, y_tune)
        acc = accuracy_score(y_eval, clf.predict(x_eval))
        log(f"  baseline {dataset} C={c}: eval accuracy {acc:.4f}")
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    assert best is not None
    eval_acc, c, clf = best
    if tune is not None:
        clf = LogisticRegression(C=c, max_iter=200 if quick else max_iter).fit(x_train, y_train)
        eval_acc = accuracy_score(y_eval, clf.predict(x_eval))
    pred = clf.predict(x_test)
    wall = time.perf_counter() - start
    return {
        "test_accuracy": accuracy_score(y_test, pred),
        "macro_f1": f1_score(y_test, pred, average="macro"),
        "eval_accuracy": eval_acc,
        "C": c,
        "wall_s": wall,
        "examples_per_s": (len(y_tune) * len(grid) + (len(y_train) if tune is not None else 0)) / wall,
        "model": "logistic regression on pixels"
        if not hasattr(x_train, "nnz")
        else "TF-IDF 1-2-grams + logistic regression",
    }


def ablation(
    dataset: str,
    model: str,
    path: str,
    results: dict[str, Any],
    ratios: dict[str, float],
    args: argparse.Namespace,
    out_root: Path,
) -> None:
    """Train `path` again without augmentation (seed 0) and record the difference."""
    pair: dict[str, dict[str, Any]] = {}
    if args.ablation_limit is None and model in results[dataset]:
        pair["augmented"] = {"test_accuracy": results[dataset][model]["test_accuracy_seeds"][0]}
    for name, overrides in (("augmented", None), ("plain", NO_AUGMENT)):
        if name in pair:
            continue
        log(f"[{dataset}] ablation {model} {name}")
        pair[name] = run_example(
            path,
            0,
            out_root / f"{dataset}-{model}-ablation-{name}",
            args.quick,
            overrides,
            args.ablation_limit,
            args.epochs,
        )
        print(json.dumps({"partial": {dataset: {f"{model}_ablation_{name}": pair[name]}}}), flush=True)
    results[dataset]["augmentation"] = {
        "model": model,
        "train_records": args.ablation_limit or "all",
        "seed": 0,
        "test_accuracy_augmented": pair["augmented"]["test_accuracy"],
        "test_accuracy_plain": pair["plain"]["test_accuracy"],
        "delta_points": 100 * (pair["augmented"]["test_accuracy"] - pair["plain"]["test_accuracy"]),
    }
    ratios[f"{dataset}.{model}.augmented_vs_plain_accuracy"] = (
        pair["augmented"]["test_accuracy"] / pair["plain"]["test_accuracy"]
    )


def env_info(threads: int, precisions: list[str]) -> dict[str, Any]:
    import torch

    from dapeng.train.precision import bf16_supported

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cuda = torch.cuda.is_available()
    return {
        "threads": threads,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": ",".join(precisions) or ("bf16" if bf16_supported(torch.device("cpu")) else "fp32"),
        "torch": torch.__version__,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],
        "note": "a GPU trained the models; the baseline ran on this machine's CPU"
        if cuda
        else "shared 2-core machine; other jobs ran at the same time, so times are noisy",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="600-record slices, one epoch, one seed")
    parser.add_argument("--datasets", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    parser.add_argument(
        "--models", nargs="+", default=None, help="only these example names (e.g. bilstm resnet)"
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds per example (text); images use --image-seeds"
    )
    parser.add_argument("--image-seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from here (split seeds across machines)")
    parser.add_argument(
        "--ablation", action="store_true", help="also train the first example without augmentation"
    )
    parser.add_argument(
        "--ablation-limit", type=int, default=None, help="training records for the ablation pair"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)"
    )
    parser.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    parser.add_argument(
        "--epochs", type=int, default=None, help="override every example's epochs (CPU budget)"
    )
    parser.add_argument(
        "--example",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="train the config at PATH as example NAME of the chosen data set (replaces or adds one)",
    )
    parser.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="the teacher run of the distilled examples (default: train it first, from TEACHERS)",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="train the examples only")
    parser.add_argument("--baseline-only", action="store_true", help="the baselines (and --ablation) only")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("DAPENG_QUIET", "1")
    out_root = args.out or Path(tempfile.mkdtemp(prefix="dapeng-bench-"))
    results: dict[str, dict[str, Any]] = {}
    ratios: dict[str, float] = {}
    for dataset in args.datasets:
        results[dataset] = {}
        examples = {**EXAMPLES[dataset], **dict(e.split("=", 1) for e in args.example)}
        examples = {k: v for k, v in examples.items() if args.models is None or k in args.models}
        seeds = 1 if args.quick else (args.image_seeds if dataset == "fashion-mnist" else args.seeds)
        if args.baseline_only:
            results[dataset]["baseline"] = baseline(dataset, args.quick)
            print(json.dumps({"partial": {dataset: {"baseline": results[dataset]["baseline"]}}}), flush=True)
            if args.ablation and examples:
                model, path = next(iter(examples.items()))
                ablation(dataset, model, path, results, ratios, args, out_root)
            examples = {}
        teacher = args.teacher
        if teacher is None and any(yaml.safe_load((ROOT / p).read_text()).get("distill") for p in examples.values()):
            log(f"[{dataset}] teacher ({TEACHERS[dataset]})")
            teacher = out_root / f"{dataset}-teacher"
            results[dataset]["teacher"] = {
                **run_example(TEACHERS[dataset], 0, teacher, args.quick),
                "config": TEACHERS[dataset],
            }
            print(json.dumps({"partial": {dataset: {"teacher": results[dataset]["teacher"]}}}), flush=True)
        for model, path in examples.items():
            runs = []
            for seed in range(args.first_seed, args.first_seed + seeds):
                log(f"[{dataset}] {model} seed {seed}")
                out = out_root / f"{dataset}-{model}-s{seed}"
                runs.append(run_example(path, seed, out, args.quick, epochs=args.epochs, teacher=teacher))
                print(json.dumps({"partial": {dataset: {model: runs[-1]}}}), flush=True)
            results[dataset][model] = summarize(runs, path)
            if "baseline" not in results[dataset] and not args.skip_baseline:
                # right after the first example, so a run cut short still has the comparison
                log(f"[{dataset}] baseline")
                results[dataset]["baseline"] = baseline(dataset, args.quick)
                print(
                    json.dumps({"partial": {dataset: {"baseline": results[dataset]["baseline"]}}}), flush=True
                )
            if args.ablation and model == next(iter(examples)):
                ablation(dataset, model, path, results, ratios, args, out_root)
        base = results[dataset].get("baseline")
        if base is None and not args.skip_baseline:
            base = results[dataset]["baseline"] = baseline(dataset, args.quick)
        for model in examples if base else ():
            ratios[f"{dataset}.{model}.accuracy_vs_baseline"] = (
                results[dataset][model]["test_accuracy"] / base["test_accuracy"]
            )
        for model in examples:  # what distillation changed, where its undistilled student ran too
            plain = model.removesuffix("-distilled")
            if plain != model and plain in results[dataset]:
                ratios[f"{dataset}.{model}.accuracy_vs_{plain}"] = (
                    results[dataset][model]["test_accuracy"] / results[dataset][plain]["test_accuracy"]
                )
    precisions = sorted({r["precision"] for d in results.values() for r in d.values() if r.get("precision")})
    env = env_info(args.threads, precisions)
    print(json.dumps({"results": results, "ratios": ratios, "env": env}), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
