"""Compression on trained runs: accuracy, size and throughput of each variant, on the same inputs and threads.

    python benchmarks/compress.py --runs bilstm=runs/rt-bilstm minilm=runs/rt-minilm resnet=runs/fm
    python benchmarks/compress.py --train-into /tmp/bench-runs          # train missing runs from the examples
    python benchmarks/compress.py --quick --runs cnn=runs/rt-cnn         # small slices (CI)

For each run (`dapeng train` directory), on the first `--items` records of its eval split:
* variants: `fp32` (eager), `bf16` (autocast), `ort-fp32` (`dapeng export` → ONNX Runtime),
  `ort-int8` (ONNX Runtime's dynamic int8 quantization of that file), `int8-dynamic`,
  `int8-weight-only`, `int8-static` (image models: Conv2d too; calibrated on 256 training
  samples) through `dapeng.compress.quantize`, and `pruned-50` (50% unstructured magnitude
  pruning, `--prune-epochs` of recovery fine-tuning; 0 with --quick);
* `accuracy` on those items, `size_mb` of the saved weights (model.safetensors / model.onnx),
  `items_per_s_b1` (one input per call) and `items_per_s_b32` (batches of 32), pre-collated
  batches timed alike for every variant, after a warm-up call.
With `--train-into DIR`, runs missing from `--runs` are trained from `examples/` first, small:
one epoch on `--train-limit` records (the figures then show the variants side by side, not
the examples' best accuracy).

With `--lm smollm2-135m` (alone or beside `--runs`), the LM too: fp32 against `int8-weight-only`
(int8 Linear weights and tied embedding table, one scale per row) and `int8-groupwise` (uint8,
a scale and zero point per 32 inputs: SmolLM2's weights come from a Q4_1 GGUF, 32-blocks of 16
levels, which that grid holds exactly); dapeng's CPU kernel streams the int8 weights in
decoding steps. Batch 1: greedy 32-token continuations of 20 prompts
(sentences of the Brown corpus' test documents), `decode_tokens_per_s` (1 / the median step,
process CPU time, one thread), `size_mb`, and `greedy_agreement` (continuations identical to
fp32's) and `token_agreement` (tokens equal up to the first difference, averaged); ratios
`smollm2.int8_decode_vs_fp32_b1` (group-wise) and `smollm2.int8_per_channel_decode_vs_fp32_b1`. The two models alternate prompt by prompt.

The last line of stdout is one JSON object {"results": {model: {variant: {...}}}, "ratios": {...},
"env": {...}}; ratios (above 1: the compressed variant is better) are `int8_vs_fp32_b32`,
`int8_vs_fp32_b1`, `ort_vs_eager_b32`, `ort_int8_vs_fp32_b32` (speed) and `size_fp32_vs_int8`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "cnn": "examples/rotten-tomatoes-cnn.yaml",
    "bilstm": "examples/rotten-tomatoes-bilstm.yaml",
    "transformer": "examples/rotten-tomatoes-transformer.yaml",
    "minilm": "examples/rotten-tomatoes-minilm.yaml",
    "resnet": "examples/fashion-mnist-cnn.yaml",
}


def train_small(name: str, out: Path, limit: int) -> Path:
    """One epoch of the example on `limit` records per split, unless `out` already holds the run."""
    from dapeng.config import load_config
    from dapeng.runner import train

    if not (out / "model").is_dir():
        cfg = load_config(ROOT / EXAMPLES[name], [f"data.limit={limit}", "train.epochs=1", "train.precision=fp32"])
        train(cfg, out, progress=False)
    return out


def _throughput(call, batches: list[Any], size: int) -> float:
    """Items per second of `call` over pre-collated `batches` (each of `size` items), after one warm-up."""
    call(batches[0])
    start = time.perf_counter()
    for batch in batches:
        call(batch)
    return len(batches) * size / (time.perf_counter() - start)


def _accuracy(logits_of, batches: list[dict[str, Any]]) -> float:
    import numpy as np

    right = total = 0
    for batch in batches:
        pred = np.asarray(logits_of(batch)).argmax(-1)
        right += int((pred == batch["labels"].numpy()).sum())
        total += len(pred)
    return right / max(total, 1)


def _torch_call(model, names: list[str], precision: str = "fp32"):
    import torch

    def call(batch):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model(*(batch[n] for n in names)).float().numpy()
    return call


def _ort_call(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda batch: session.run(None, {n: batch[n].numpy() for n in names})[0]


def measure(call, eval_batches, b1, b32, size_mb: float) -> dict[str, float]:
    return {"accuracy": _accuracy(call, eval_batches), "size_mb": size_mb,
            "items_per_s_b1": _throughput(call, b1, 1), "items_per_s_b32": _throughput(call, b32, 32)}


def bench_run(run: Path, args: argparse.Namespace, work: Path) -> dict[str, dict[str, float]]:
    from dapeng.compress.export import INPUTS, export
    from dapeng.compress.prune import prune_model
    from dapeng.compress.quantize import quantize, weights_size_mb
    from dapeng.hub.artifact import WEIGHTS, load_artifact
    from dapeng.runner import load_run_config, load_splits

    cfg = load_run_config(run)
    artifact = load_artifact(run / "model", precision="fp32")
    task, model = artifact.task, artifact.model.eval()
    splits = load_splits(cfg)
    items = task.encode(list(splits.eval[: args.items]))
    eval_batches = [task.collate(items[i:i + 64]) for i in range(0, len(items), 64)]
    b1 = [task.collate([it]) for it in items[: args.timed]]
    b32 = [task.collate(items[i:i + 32]) for i in range(0, 32 * max(1, args.timed // 32), 32) if i + 32 <= len(items)]
    names = list(INPUTS[task.capabilities.input])
    fp32_size = (run / "model" / WEIGHTS).stat().st_size / 1e6
    results = {"fp32": measure(_torch_call(model, names), eval_batches, b1, b32, fp32_size)}
    if not args.quick:
        results["bf16"] = measure(_torch_call(model, names, "bf16"), eval_batches, b1, b32, fp32_size / 2)

    onnx_dir = work / f"{run.name}-onnx"
    export(model, task, items, onnx_dir, "onnx")
    results["ort-fp32"] = measure(_ort_call(onnx_dir / "model.onnx", args.threads), eval_batches, b1, b32,
                                  (onnx_dir / "model.onnx").stat().st_size / 1e6)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8_onnx = onnx_dir / "model.int8.onnx"
    quantize_dynamic(str(onnx_dir / "model.onnx"), str(int8_onnx), weight_type=QuantType.QInt8)
    results["ort-int8"] = measure(_ort_call(int8_onnx, args.threads), eval_batches, b1, b32,
                                  int8_onnx.stat().st_size / 1e6)

    methods = ["int8-dynamic", "int8-weight-only"] + (["int8-static"] if task.capabilities.input == "image" else [])
    calibration = task.encode(list(splits.train[:256])) if "int8-static" in methods else []
    for method in methods:
        quantized, _ = quantize(model, method, task, calibration)
        results[method] = measure(_torch_call(quantized, names), eval_batches, b1, b32, weights_size_mb(quantized))

    pruned, masks = prune_model(model, 0.5)
    if args.prune_epochs:
        from dapeng.compress.prune import finetune
        from dapeng.runner import trainer_kwargs

        kwargs = {k: v for k, v in trainer_kwargs(cfg.train).items()
                  if k not in ("checkpoint_every", "eval_every", "max_steps", "early_stopping", "compile", "ema")}
        finetune(pruned, masks, task, task.encode(list(splits.train)), items,
                 {**kwargs, "epochs": args.prune_epochs, "device": "cpu"})
    results["pruned-50"] = measure(_torch_call(pruned.eval(), names), eval_batches, b1, b32, fp32_size)
    return results


LM_METHODS = ("int8-weight-only", "int8-groupwise")


def lm_prompts(count: int) -> list[str]:
    """The first sentence (6-30 words) of each of `count` Brown test documents: real, varied English."""
    from dapeng.data.catalog import load_dataset

    prompts, seen = [], set()
    for record in load_dataset("brown-pos")["test"]:
        doc = record["doc"]
        words = record["tokens"]
        if doc in seen or not 6 <= len(words) <= 30:
            continue
        seen.add(doc)
        prompts.append(" ".join(words))
        if len(prompts) == count:
            break
    return prompts


def bench_lm(name: str, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    """fp32 against int8-weight-only greedy decoding, batch 1 (module docstring)."""
    import statistics

    import torch

    from dapeng.compress.quantize import quantize, weights_size_mb
    from dapeng.hub.artifact import load_artifact
    from dapeng.hub.store import resolve

    artifact = load_artifact(resolve(name), precision="fp32")
    task, fp32 = artifact.task, artifact.model.eval()
    models = {"fp32": fp32, **{method: quantize(fp32, method)[0] for method in LM_METHODS}}
    steps: dict[str, list[float]] = {k: [] for k in models}
    outputs: dict[str, list[list[int]]] = {k: [] for k in models}
    for prompt in prompts:
        ids = torch.tensor([task.prompt_ids(prompt)])
        for variant, model in models.items():
            marks, tokens = [], []
            with torch.inference_mode():
                for token in model.generate(ids, max_new_tokens=new_tokens, temperature=0.0, stream=True):
                    marks.append(time.process_time())
                    tokens.append(int(token))
            steps[variant] += [b - a for a, b in zip(marks, marks[1:])]
            outputs[variant].append(tokens)
    result: dict[str, Any] = {variant: {"decode_tokens_per_s": 1.0 / statistics.median(steps[variant]),
                                        "size_mb": weights_size_mb(model)} for variant, model in models.items()}
    for method in LM_METHODS:
        same = [a == b for a, b in zip(outputs["fp32"], outputs[method])]
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) / len(a)
                  for a, b in zip(outputs["fp32"], outputs[method])]
        result[method].update(greedy_agreement=sum(same) / len(same), token_agreement=sum(prefix) / len(prefix))
    result["prompts"], result["new_tokens"] = len(prompts), new_tokens
    return result


def ratios_of(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    ratios = {}
    lm = results.get("smollm2")
    if lm is not None:  # int8: the group-wise variant (the one that keeps greedy output); per-channel beside it
        fp32 = lm["fp32"]
        ratios["smollm2.int8_decode_vs_fp32_b1"] = lm["int8-groupwise"]["decode_tokens_per_s"] / fp32["decode_tokens_per_s"]
        ratios["smollm2.size_fp32_vs_int8"] = fp32["size_mb"] / lm["int8-groupwise"]["size_mb"]
        ratios["smollm2.int8_per_channel_decode_vs_fp32_b1"] = (lm["int8-weight-only"]["decode_tokens_per_s"]
                                                                / fp32["decode_tokens_per_s"])
    for name, r in results.items():
        if name == "smollm2":
            continue
        fp32, int8 = r["fp32"], r["int8-dynamic"]
        ratios[f"{name}.int8_vs_fp32_b32"] = int8["items_per_s_b32"] / fp32["items_per_s_b32"]
        ratios[f"{name}.int8_vs_fp32_b1"] = int8["items_per_s_b1"] / fp32["items_per_s_b1"]
        ratios[f"{name}.size_fp32_vs_int8"] = fp32["size_mb"] / int8["size_mb"]
        ratios[f"{name}.ort_vs_eager_b32"] = r["ort-fp32"]["items_per_s_b32"] / fp32["items_per_s_b32"]
        ratios[f"{name}.ort_int8_vs_fp32_b32"] = r["ort-int8"]["items_per_s_b32"] / fp32["items_per_s_b32"]
    return ratios


def env_info(threads: int) -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"threads": threads, "precision": "fp32 (bf16 variant: autocast)", "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "cpu": cpu, "cores": os.cpu_count(),
            "load_average_at_end": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="*", default=[], metavar="NAME=RUN", help=f"trained runs; names: {', '.join(EXAMPLES)}")
    parser.add_argument("--train-into", type=Path, default=None, help="train the runs --runs lacks into this folder")
    parser.add_argument("--train-limit", type=int, default=2000, help="records per split for --train-into runs")
    parser.add_argument("--items", type=int, default=None, help="eval records measured (default: all; --quick 256)")
    parser.add_argument("--timed", type=int, default=None, help="inputs timed one at a time (default 128; --quick 32)")
    parser.add_argument("--prune-epochs", type=int, default=None, help="recovery epochs after pruning (1; --quick 0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small slices, no bf16, no recovery fine-tuning")
    parser.add_argument("--lm", default=None, metavar="HUB_NAME", help="also the LM's int8 decoding (smollm2-135m)")
    parser.add_argument("--lm-prompts", type=int, default=None, help="prompts for --lm (20; --quick 4)")
    args = parser.parse_args(argv)
    args.items = args.items or (256 if args.quick else 100_000)
    args.timed = args.timed or (32 if args.quick else 128)
    args.prune_epochs = args.prune_epochs if args.prune_epochs is not None else (0 if args.quick else 1)

    import torch

    torch.set_num_threads(args.threads)
    runs = dict(spec.split("=", 1) for spec in args.runs)
    if args.train_into:
        for name in EXAMPLES:
            if name not in runs:
                runs[name] = str(train_small(name, args.train_into / name, 600 if args.quick else args.train_limit))
    if not runs and not args.lm:
        parser.error("nothing to measure: pass --runs NAME=RUN, --train-into DIR or --lm smollm2-135m")
    results = {}
    if args.lm:
        print(f"compress benchmark: {args.lm} int8 decoding", file=sys.stderr, flush=True)
        count = args.lm_prompts or (4 if args.quick else 20)
        results["smollm2"] = bench_lm(args.lm, lm_prompts(count), 8 if args.quick else 32)
    with tempfile.TemporaryDirectory() as work:
        for name, run in runs.items():
            print(f"compress benchmark: {name} ({run})", file=sys.stderr, flush=True)
            results[name] = bench_run(Path(run), args, Path(work))
    print(json.dumps({"results": results, "ratios": ratios_of(results), "env": env_info(args.threads)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
