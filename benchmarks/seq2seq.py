"""Translation and summarization on Debian's package descriptions (DDTP), against baselines measured in the same run.

    python benchmarks/seq2seq.py              # the canonical test splits in full
    python benchmarks/seq2seq.py --quick      # 40-pair slices, a few training steps (a smoke run)

dapeng's models are the example configs (`examples/ddtp-en-fr-transformer.yaml` on EN→FR, the same
config with `data.dataset: ddtp-en-de` on EN→DE, `examples/ddtp-summary-transformer.yaml`), trained by
`dapeng.runner.train` into `--runs` (a finished run of the same config is reused: `dapeng train
examples/… --out RUNS/<name>` trains it once), loaded with `dapeng.load` and run over the canonical
test split through `Pipeline.predict` with the example's decoding options (beam 4), batch 32.

Baselines, scored by the same functions:
* `copy_source`: the English source as the translation (what a model gets for copying names,
  versions and commands, which these descriptions are full of);
* `smollm2_fewshot`: SmolLM2-135M-Instruct without training, prompted with 3 training pairs
  (`Pipeline.generate`, greedy, one line), on the first `--fewshot-n` test pairs (its decoding
  is ~100× slower than the encoder-decoder's on a CPU);
* `lead` (summarization): the long description's first sentence, cut to the training synopses'
  mean length in words.

Metrics: sacreBLEU corpus BLEU and chrF (signatures in `env.sacrebleu`), ROUGE-1/2/L F1 of
`rouge-score` over Unicode-aware words (`dapeng.tasks.seq2seq.rouge_scores`).
`sentences_per_s` counts test sources over the wall time of `Pipeline.predict` (beam 4, batch 32,
one warm-up batch first) on `--threads` threads.

With `benchmarks/seq2seq_qa.py` present, its `measure(quick)` dict goes under `results["qa"]`.
The last line of stdout is one JSON object: {"results": {...}, "ratios": {...}, "env": {...}}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dapeng.data.catalog import load_dataset
from dapeng.records import Record
from dapeng.tasks.seq2seq import rouge_scores, sacrebleu_scores

BATCH = 32
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# data set -> (example config, overrides that make it this data set's run)
TRANSLATION = {"ddtp-en-fr": ("ddtp-en-fr-transformer", []),
               "ddtp-en-de": ("ddtp-en-fr-transformer", ["data.dataset=ddtp-en-de"])}
SUMMARY = ("ddtp-summary-transformer", [])
LANGUAGE = {"ddtp-en-fr": "French", "ddtp-en-de": "German"}


def log(msg: str) -> None:
    print(f"[seq2seq {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def trained_run(example: str, overrides: list[str], name: str, runs: Path, quick: bool) -> tuple[Path, float | None]:
    """The run directory of `example` with `overrides` (trained now unless a finished run of the same
    config is there) and the training time in seconds (None when reused)."""
    from dapeng.config import load_config
    from dapeng.runner import train

    quick_overrides = ["train.max_steps=20", "data.limit=200", "task_options.vocab_size=1000"] if quick else []
    config = load_config(EXAMPLES / f"{example}.yaml", [*overrides, *quick_overrides])
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


def translation_scores(hypotheses: Sequence[str], test: Sequence[Record]) -> dict[str, Any]:
    scores, _ = sacrebleu_scores(hypotheses, [r["target"] for r in test])
    return {**scores, "pairs": len(test)}


def dapeng_model(run: Path, test: Sequence[Record], summary: bool) -> dict[str, Any]:
    """A trained run's test scores and decoding speed through `dapeng.load(run).predict`, batch 32."""
    import dapeng

    pipe = dapeng.load(run, precision="fp32")
    sources = [r["text"] for r in test]
    pipe.predict(sources[:BATCH], batch_size=BATCH)  # warm-up
    start = time.perf_counter()
    outputs = pipe.predict(sources, batch_size=BATCH)
    seconds = time.perf_counter() - start
    scores = rouge_summary(outputs, test) if summary else translation_scores(outputs, test)
    facts = json.loads((run / "metrics.json").read_text())["train"]
    return {**scores, "sentences_per_s": len(sources) / seconds, "seconds": seconds,
            "num_beams": pipe.task.num_beams, "batch_size": BATCH, "trained_steps": facts.get("steps"),
            "trained_samples": facts.get("samples"), "examples": [{"source": s, "output": o}
                                                                  for s, o in zip(sources[:3], outputs[:3])]}


def rouge_summary(hypotheses: Sequence[str], test: Sequence[Record]) -> dict[str, Any]:
    return {**rouge_scores(hypotheses, [r["target"] for r in test]), "pairs": len(test)}


def fewshot_prompt(train: Sequence[Record], language: str, shots: int = 3) -> str:
    """Instructions and `shots` short training pairs, for a model that was never trained on the task."""
    short = [r for r in train if len(r["text"].split()) <= 8][:shots]
    lines = [f"Translate Debian package descriptions from English to {language}.", ""]
    for r in short:
        lines += [f"English: {r['text']}", f"{language}: {r['target']}", ""]
    return "\n".join(lines)


def smollm2_fewshot(train: Sequence[Record], test: Sequence[Record], language: str) -> dict[str, Any]:
    """SmolLM2-135M-Instruct, untrained on the task, translating with a 3-shot prompt, greedy, one line."""
    import dapeng

    pipe = dapeng.load("smollm2-135m", precision="fp32")
    prefix = fewshot_prompt(train, language)
    outputs = []
    start = time.perf_counter()
    for r in test:
        prompt = f"{prefix}English: {r['text']}\n{language}:"
        outputs.append(pipe.generate(prompt, max_new_tokens=96, stop=["\n"]).strip())
    seconds = time.perf_counter() - start
    return {**translation_scores(outputs, test), "sentences_per_s": len(test) / seconds, "shots": 3,
            "examples": [{"source": r["text"], "output": o} for r, o in zip(test[:3], outputs[:3])]}


_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def lead_baseline(train: Sequence[Record], test: Sequence[Record]) -> dict[str, Any]:
    """The first sentence of each long description, cut to the training synopses' mean length in words."""
    words = round(sum(len(r["target"].split()) for r in train) / len(train))
    outputs = [" ".join(_SENTENCE_END.split(r["text"].split("\n")[0])[0].split()[:words]) for r in test]
    return {**rouge_summary(outputs, test), "words": words}


def qa_results(quick: bool) -> dict[str, Any] | None:
    """`benchmarks/seq2seq_qa.py::measure(quick)`, when that file exists."""
    path = Path(__file__).with_name("seq2seq_qa.py")
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("seq2seq_qa", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.measure(quick)


def seq2seq_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """dapeng ÷ baseline, above 1 when dapeng is better."""
    ratios: dict[str, Any] = {}
    for data in TRANSLATION:
        got = results.get(data, {})
        ours, copy, fewshot = got.get("transformer"), got.get("copy_source"), got.get("smollm2_fewshot")
        if ours and copy and copy["bleu"]:
            ratios[f"{data}_transformer_vs_copy_source_bleu"] = ours["bleu"] / copy["bleu"]
        if ours and fewshot and fewshot["bleu"]:
            ratios[f"{data}_transformer_vs_smollm2_fewshot_bleu"] = ours["bleu"] / fewshot["bleu"]
    summary = results.get("ddtp-summary", {})
    if "transformer" in summary and summary.get("lead", {}).get("rougeL"):
        ratios["ddtp-summary_transformer_vs_lead_rougeL"] = summary["transformer"]["rougeL"] / summary["lead"]["rougeL"]
    return ratios


def env_info(threads: int) -> dict[str, Any]:
    import sacrebleu
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    _, signatures = sacrebleu_scores(["a"], ["a"])
    return {"threads": threads, "precision": "fp32", "torch": torch.__version__, "cpu": cpu,
            "cores": os.cpu_count(), "batch_size": BATCH, "sacrebleu": {"version": sacrebleu.__version__,
                                                                         **signatures},
            "load_average_at_end": os.getloadavg()[0],
            "note": "shared machine; other jobs ran at the same time, so sentences/s is noisy"}


def limit(splits: dict[str, list[Record]], n: int | None) -> dict[str, list[Record]]:
    return {k: v[:n] for k, v in splits.items()} if n else splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 pairs of each test split, 20 training steps")
    parser.add_argument("--threads", type=int, default=1, help="threads for every model and baseline")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-seq2seq"),
                        help="where dapeng's models are trained (finished runs of the same config are reused)")
    parser.add_argument("--data", nargs="+", default=[*TRANSLATION, "ddtp-summary"],
                        choices=[*TRANSLATION, "ddtp-summary"], help="the data sets to measure")
    parser.add_argument("--fewshot-n", type=int, default=100, help="test pairs SmolLM2 few-shot translates")
    parser.add_argument("--no-fewshot", action="store_true", help="skip the SmolLM2 few-shot baseline")
    parser.add_argument("--test-limit", type=int, default=None,
                        help="score only the first N test pairs (a busy CPU; the figures then say how many)")
    args = parser.parse_args(argv)

    import torch

    n = 40 if args.quick else None
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    for data in args.data:
        splits = limit(load_dataset(data), n)
        test, got = splits["test"][: args.test_limit], results.setdefault(data, {})
        summary = data == "ddtp-summary"
        example, overrides = SUMMARY if summary else TRANSLATION[data]
        run, seconds = trained_run(example, overrides, f"{data}-transformer", args.runs, args.quick)
        got["transformer"] = dapeng_model(run, test, summary)
        if seconds is not None:
            got["transformer"]["train_seconds"] = seconds
        if summary:
            got["lead"] = lead_baseline(splits["train"], test)
        else:
            got["copy_source"] = translation_scores([r["text"] for r in test], test)
            if not args.no_fewshot:
                few = test[: min(args.fewshot_n, 5 if args.quick else args.fewshot_n)]
                got["smollm2_fewshot"] = smollm2_fewshot(splits["train"], few, LANGUAGE[data])
                # the transformer on the same pairs, for a like-for-like comparison
                got["transformer"]["bleu_on_fewshot_pairs"] = dapeng_model(run, few, False)["bleu"]
        log(f"{data}: {json.dumps({k: {m: v for m, v in r.items() if m != 'examples'} for k, r in got.items()})}")
    qa = qa_results(args.quick)
    if qa is not None:
        results["qa"] = qa
    print(json.dumps({"results": results, "ratios": seq2seq_ratios(results), "env": env_info(args.threads)},
                     ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
