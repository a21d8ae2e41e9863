"""Are dapeng's explanations faithful, and does a long input fit a memory budget?

1. Faithfulness, on the example models trained here through the runner (Fashion-MNIST
   ResNet, Rotten Tomatoes text CNN and Transformer encoder: `examples/*.yaml`): for each test input and method, the
   deletion curve (remove the most attributed pixels/words first, replaced by the IG
   baseline) against random deletion orders on the same input. Lower area = faster drop
   of the predicted label's probability = more faithful.
   `ratios.<dataset>.<method>_vs_random` = random AUC / method AUC (> 1: better than chance).
2. Integrated Gradients completeness: attributions sum to p(x) - p(baseline) within 5%
   (`results.<dataset>.ig_completeness`; also the rate at the first 50 steps, before
   dapeng's step doubling).
3. A 2,000-token input explained with IG in a fresh process under a 2 GB budget: peak RSS
   growth measured (/proc VmHWM after clear_refs), next to the activation memory plain
   Captum (one batch of all steps) would need, estimated from the same probe.

Usage: python benchmarks/explain.py [--quick] [--runs DIR]
(`--quick`: models trained 1 epoch on 2,000 records, 20 inputs, a 500-token long input.)
The last line of stdout is one JSON object {"results", "ratios", "env"}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# The models explained are the repo's examples, trained through the runner as `dapeng train` would.
ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "fashion-mnist": ROOT / "examples/fashion-mnist-cnn.yaml",  # small ResNet, crop + flip
    "rotten-tomatoes": ROOT / "examples/rotten-tomatoes-cnn.yaml",  # text CNN over GloVe-50
    "rotten-tomatoes-transformer": ROOT / "examples/rotten-tomatoes-transformer.yaml",
}
METHODS = {
    "fashion-mnist": ["ig", "saliency", "gradcam"],
    "rotten-tomatoes": ["ig", "saliency"],
    "rotten-tomatoes-transformer": ["ig", "saliency", "attention", "rollout"],
}
RANDOM_ORDERS = 5


def ensure_run(name: str, runs: Path, quick: bool = False) -> Path:
    """The run directory of `name`, trained from its example config unless it is already there.

    `quick` trains one epoch on 2,000 records (in `<runs>-quick`): weaker models, minutes not tens.
    """
    from dapeng.config import load_config
    from dapeng.runner import train

    overrides = ["train.precision=fp32"]
    if quick:
        overrides += ["data.limit=2000", "train.epochs=1"]
        runs = runs.with_name(runs.name + "-quick")
    out = runs / name
    if not (out / "model" / "dapeng.json").is_file():
        started = time.perf_counter()
        result = train(load_config(RUNS[name], overrides), out, progress=False)
        print(f"trained {name} in {time.perf_counter() - started:.0f}s: test {result['metrics']['test']}",
              file=sys.stderr)
    return out


def test_inputs(name: str, count: int, seed: int = 0) -> list[Any]:
    from dapeng.data import load_dataset

    test = load_dataset("fashion-mnist" if name == "fashion-mnist" else "rotten-tomatoes")["test"]
    picks = np.random.default_rng(seed).choice(len(test), size=min(count, len(test)), replace=False)
    key = "image" if "image" in test[0] else "text"
    return [test[int(i)][key] for i in picks]


def faithfulness(name: str, run: Path, count: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Deletion AUCs per method vs random orders, and IG completeness, on `count` test inputs."""
    import dapeng
    from dapeng.explain import explain
    from dapeng.explain.faithfulness import completeness_rate, deletion_auc

    pipeline = dapeng.load(run, precision="fp32")
    inputs = test_inputs(name, count)
    rng = np.random.default_rng(1)
    steps = 50 if name.startswith("fashion-mnist") else 100
    aucs: dict[str, list[float]] = {m: [] for m in METHODS[name]}
    aucs["random"] = []
    checks: list[dict[str, float]] = []
    seconds: dict[str, float] = {m: 0.0 for m in METHODS[name]}
    for raw in inputs:
        label = None
        for method in METHODS[name]:
            started = time.perf_counter()
            [e] = explain(pipeline, raw, method=method)
            seconds[method] += time.perf_counter() - started
            label = e.label_index
            aucs[method].append(deletion_auc(pipeline, raw, label, scores=e.scores, steps=steps))
            if method == "ig":
                checks.append(e.completeness)
        features = int(np.asarray(e.scores).size)
        aucs["random"].append(
            float(np.mean([deletion_auc(pipeline, raw, label, order=rng.permutation(features), steps=steps)
                           for _ in range(RANDOM_ORDERS)]))
        )
    mean = {m: float(np.mean(v)) for m, v in aucs.items()}
    results = {
        "inputs": len(inputs),
        "deletion_auc": mean,
        "seconds_per_explanation": {m: s / len(inputs) for m, s in seconds.items()},
        "ig_completeness": completeness_rate(checks),
        "ig_completeness_at_50_steps": float(np.mean([c["n_steps"] == 50 and c["relative_error"] <= 0.05
                                                     for c in checks])),
        "ig_mean_steps": float(np.mean([c["n_steps"] for c in checks])),
        "ig_median_relative_error": float(np.median([c["relative_error"] for c in checks])),
        "test_accuracy": json.loads((run / "metrics.json").read_text())["test"].get("accuracy"),
    }
    ratios = {f"{m}_vs_random": mean["random"] / mean[m] for m in METHODS[name]}
    return results, ratios


# ---------------------------------------------------------------- the long input


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def long_input_worker(tokens: int, budget_mb: float, n_steps: int) -> dict[str, Any]:
    """In a fresh process: IG over a `tokens`-token text (Rotten Tomatoes reviews run
    together, tokenized by the trained run's task) under `budget_mb`."""
    import torch

    import dapeng
    from dapeng.data import load_dataset
    from dapeng.explain import explain
    from dapeng.explain.attributions import _embedding_probe
    from dapeng.explain.batching import BACKWARD_FACTOR
    from dapeng.models import MODELS
    from dapeng.pipeline import Pipeline

    torch.manual_seed(0)
    trained = dapeng.load(Path(os.environ["DAPENG_EXPLAIN_RUN"]), precision="fp32")
    task = trained.task
    # The encoder at its default size (4 layers x 256, BERT layout) with room for the length;
    # untrained: activation memory depends on shapes, not on weight values.
    sizes = {k: v for k, v in task.model_kwargs().items() if k in ("vocab_size", "num_labels", "pad_id")}
    model = MODELS.create("transformer", **sizes, max_positions=tokens + 8, pooling="cls")
    task.options = task.options.model_copy(update={"max_length": tokens})  # the trained run truncates at 256
    pipeline = Pipeline(model, task, name="long", meta=trained.meta, precision="fp32")
    reviews = [r["text"] for r in load_dataset("rotten-tomatoes")["test"]]
    words: list[str] = []
    for review in reviews:
        words += review.split()
        if len(task.encode([{"text": " ".join(words)}])[0]["input_ids"]) >= tokens:
            break
    text = " ".join(words)
    ids = task.collate(task.encode([{"text": text}]))["input_ids"][:, :tokens]
    text_tokens = int(ids.shape[1])
    per_step = _embedding_probe(model, ids, None)
    torch.set_grad_enabled(True)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak is measured from here
    before = _rss_mb("VmRSS")
    started = time.perf_counter()
    [e] = explain(pipeline, text, method="ig", memory_budget_mb=budget_mb, n_steps=n_steps, max_steps=n_steps)
    seconds = time.perf_counter() - started
    peak = _rss_mb("VmHWM")
    return {
        "tokens": text_tokens,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "words": len(e.words or []),
        "budget_mb": budget_mb,
        "n_steps": n_steps,
        "internal_batch_size": e.internal_batch_size,
        "peak_rss_growth_mb": round(peak - before, 1),
        "rss_before_mb": round(before, 1),
        "activation_mb_per_step_estimated": round(per_step * BACKWARD_FACTOR / 2**20, 1),
        "plain_captum_activation_mb_estimated": round(per_step * BACKWARD_FACTOR * n_steps / 2**20, 1),
        "seconds": round(seconds, 1),
        "relative_error": e.completeness["relative_error"],
        "within_budget": peak - before <= budget_mb,
    }


def long_input(run: Path, tokens: int, budget_mb: float, n_steps: int) -> dict[str, Any]:
    env = dict(os.environ, DAPENG_EXPLAIN_RUN=str(run))
    cmd = [sys.executable, __file__, "--long-worker", str(tokens), "--budget-mb", str(budget_mb),
           "--steps", str(n_steps), "--threads", str(torch_threads())]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1], "returncode": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def env_info() -> dict[str, Any]:
    import torch

    return {
        "threads": torch.get_num_threads(),
        "precision": "fp32",
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "note": "2 cores shared with other jobs: timings are noisy; AUC ratios are measured on the same inputs",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few inputs and a shorter long input (CI)")
    parser.add_argument("--runs", type=Path, default=Path("runs/explain-bench"), help="where the trained runs live")
    parser.add_argument("--inputs", type=int, default=None, help="test inputs per dataset (default 100, quick 20)")
    parser.add_argument("--long-worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--budget-mb", type=float, default=2048)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 cores here are shared)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.long_worker is not None:
        print(json.dumps(long_input_worker(args.long_worker, args.budget_mb, args.steps)))
        return
    count = args.inputs or (20 if args.quick else 100)
    results: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    runs = {name: ensure_run(name, args.runs, args.quick) for name in RUNS}
    for name, run in runs.items():
        results[name], ratios[name] = faithfulness(name, run, count)
        print(json.dumps({name: results[name], "ratios": ratios[name]}), file=sys.stderr)
    tokens = 500 if args.quick else 2000
    results["long_input"] = long_input(runs["rotten-tomatoes-transformer"], tokens, args.budget_mb, args.steps)
    print(json.dumps({"results": results, "ratios": ratios, "env": env_info()}))


if __name__ == "__main__":
    main()
