"""Extractive question answering on brown-qa: dapeng's models against a lexical-overlap baseline, in one run.

    python benchmarks/seq2seq_qa.py              # the canonical test split in full
    python benchmarks/seq2seq_qa.py --quick      # 300 questions of each split, a few training steps

brown-qa (`dapeng data info brown-qa`, `dapeng.data.brown_qa`) asks for a proper-noun phrase of a
Brown passage with a question whose content words are GloVe neighbours of the sentence's own,
so string matching can't find the sentence. dapeng's models are the example configs
`examples/qa-minilm.yaml` (MiniLM-L6 fine-tuned with a span head) and `examples/qa-transformer.yaml`
(a from-scratch encoder with its own WordPiece), trained by `dapeng.runner.train` into `--runs`
(a finished run of the same config is reused), then run over the test split through
`dapeng.load(run).predict` (`--quick`), or on the full split read from the run's own test metrics
(`RUN/metrics.json`: the Trainer's pass over the same canonical test split, decoded and scored the
same way), since a second pass of MiniLM over the test passages costs ~10 minutes of a busy CPU.

`lexical_overlap` is the sliding-window baseline (Richardson et al. 2013, as in the SQuAD paper):
every span of 1-4 context tokens that holds no question word and neither starts nor ends on a
stop word or punctuation is a candidate; its score is the IDF-weighted count of question words
among the W tokens on each side of it (W: the question's length in words, IDF over the test
contexts); the best candidate (then the shorter, then the earlier) is the answer.
`lexical_overlap_cloze` is the same baseline given the question before paraphrasing (the record's
`cloze`): the gap between the two is what the paraphrase takes from string matching.

Scores are SQuAD's official exact match and F1 (0-100, max over gold answers).

`measure(quick)` returns `{"<model>": {"exact_match", "f1", ...}, "lexical_overlap": {...}, ...}`
(benchmarks/seq2seq.py puts it under `results.qa`); run as a script, the last line of stdout is
one JSON object: {"results": {"qa": ...}, "ratios": {...}, "env": {...}}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dapeng.data.catalog import load_dataset
from dapeng.records import Record
from dapeng.tasks.question_answering import score_answers

DATASET = "brown-qa"
MODELS = {"minilm": "qa-minilm", "transformer": "qa-transformer"}
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BATCH = 32
QUICK = 300
_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")
STOP = frozenset(
    ["a", "an", "the", "of", "in", "on", "at", "to", "for", "from", "by", "with", "and", "or", "but", "as", "is", "was", "were", "be", "been", "are", "it", "its", "his", "her", "their", "he", "she", "they", "we", "you", "i", "this", "that", "these", "those", "which", "who", "whom", "what", "when", "where", "why", "how", "not", "no", "so", "than", "then", "there", "here", "into", "onto", "over", "under", "about", "after", "before", "up", "down", "out", "if"]
)


def log(msg: str) -> None:
    print(f"[seq2seq_qa {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def scores(records: Sequence[Record], predicted: Sequence[str]) -> dict[str, float]:
    """SQuAD's exact match and F1 (0-100) of `predicted` against each record's gold answers."""
    pairs = [score_answers(p, [a["text"] for a in r["answers"]]) for r, p in zip(records, predicted)]
    n = max(len(pairs), 1)
    return {"exact_match": 100 * sum(em for em, _ in pairs) / n, "f1": 100 * sum(f1 for _, f1 in pairs) / n,
            "questions": len(pairs)}


# ---------------------------------------------------------------- the baseline


def _words(text: str) -> list[tuple[str, int, int]]:
    return [(m.group().lower(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def _candidate(word: str) -> bool:
    return word.isalnum() and word not in STOP


def lexical_overlap(record: Record, idf: dict[str, float], default_idf: float, max_span: int = 4,
                    field: str = "question") -> str:
    """The sliding-window baseline's answer to one question (see the module docstring)."""
    question = {w for w, _, _ in _words(record[field]) if w.isalnum() and w != "what"}
    tokens = _words(record["context"])
    width = max(1, len(question))
    weights = [idf.get(w, default_idf) if w in question else 0.0 for w, _, _ in tokens]
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    n = len(tokens)

    def around(i: int, j: int) -> float:  # the W tokens before i and the W from j on
        return prefix[i] - prefix[max(0, i - width)] + prefix[min(n, j + width)] - prefix[j]

    best: tuple[float, int, int] | None = None
    best_span = (0, 0)
    for i in range(n):
        if not _candidate(tokens[i][0]) or tokens[i][0] in question:
            continue
        for j in range(i + 1, min(n, i + max_span) + 1):
            if tokens[j - 1][0] in question or not tokens[j - 1][0].isalnum():
                break
            if not _candidate(tokens[j - 1][0]):
                continue
            key = (around(i, j), -(j - i), -i)
            if best is None or key > best:
                best, best_span = key, (i, j)
    if best is None:
        return ""
    i, j = best_span
    return record["context"][tokens[i][1] : tokens[j - 1][2]]


def baseline(test: Sequence[Record], field: str) -> dict[str, Any]:
    df = Counter(w for r in test for w in {w for w, _, _ in _words(r["context"])})
    n = len(test)
    idf = {w: math.log(n / (1 + k)) + 1 for w, k in df.items()}
    start = time.perf_counter()
    predicted = [lexical_overlap(r, idf, math.log(n) + 1, field=field) for r in test]
    return {**scores(test, predicted), "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------- dapeng's models


def trained_run(example: str, runs: Path, quick: bool) -> tuple[Path, float | None]:
    """The run directory of `example` (trained now unless a finished run of the same config is there)
    and the training time in seconds (None when reused)."""
    from dapeng.config import load_config
    from dapeng.runner import train

    overrides = ["train.max_steps=20", "train.epochs=1", f"data.limit={QUICK}"] if quick else []
    config = load_config(EXAMPLES / f"{example}.yaml", overrides)
    out = runs / (f"{example}-quick" if quick else example)
    saved = out / "config.yaml"
    if (out / "model" / "dapeng.json").is_file() and saved.is_file() and load_config(saved) == config:
        log(f"{example}: reusing {out}")
        return out, None
    if out.exists():
        import shutil

        shutil.rmtree(out)
    log(f"{example}: training into {out}")
    start = time.perf_counter()
    train(config, out, progress=False)
    return out, time.perf_counter() - start


def dapeng_model(run: Path, test: Sequence[Record], quick: bool) -> dict[str, Any]:
    """A trained run's test scores: through `dapeng.load(run).predict`, batch 32, on the quick slice; on the
    full canonical test split, the ones its training run measured there (the same decoding and scorer)."""
    facts = json.loads((run / "metrics.json").read_text())
    trained = {"trained_steps": facts["train"].get("steps"), "train_precision": facts["train"].get("precision")}
    if not quick:
        measured = facts["test"]
        return {"exact_match": measured["exact_match"], "f1": measured["f1"], "questions": len(test),
                "source": "the run's test metrics", **trained}
    import dapeng

    pipe = dapeng.load(run, precision="fp32")
    inputs = [{"question": r["question"], "context": r["context"]} for r in test]
    start = time.perf_counter()
    predicted = [out["answer"] for out in pipe.predict(inputs, batch_size=BATCH)]
    seconds = time.perf_counter() - start
    return {**scores(test, predicted), "questions_per_s": len(test) / seconds, **trained}


def measure(quick: bool, runs: Path = Path("runs/bench-qa")) -> dict[str, Any]:
    """`{"<model>": {"exact_match", "f1", ...}, "lexical_overlap": {...}, "lexical_overlap_cloze": {...}}` on
    brown-qa's canonical test split (its first 300 questions with `quick`)."""
    test = load_dataset(DATASET)["test"]
    test = test[:QUICK] if quick else test
    log(f"{DATASET}: {len(test)} test questions")
    results: dict[str, Any] = {}
    for key, example in MODELS.items():
        run, seconds = trained_run(example, runs, quick)
        results[key] = dapeng_model(run, test, quick)
        if seconds is not None:
            results[key]["train_seconds"] = seconds
        log(f"{key}: {results[key]}")
    results["lexical_overlap"] = baseline(test, "question")
    results["lexical_overlap_cloze"] = baseline(test, "cloze")
    log(f"lexical_overlap: {results['lexical_overlap']}; on the cloze: {results['lexical_overlap_cloze']}")
    floor = results["lexical_overlap"]["f1"]
    for key in MODELS:
        results[key]["f1_points_over_lexical_overlap"] = results[key]["f1"] - floor
    return results


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """The best model's F1 ÷ the baseline's, above 1 when dapeng is better."""
    best = max(results[k]["f1"] for k in MODELS)
    floor = results["lexical_overlap"]["f1"]
    return {"qa_best_vs_lexical_overlap_f1": best / floor if floor else None}


def env_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"threads": torch.get_num_threads(), "precision": "fp32", "torch": torch.__version__, "cpu": cpu,
            "cores": os.cpu_count(), "batch_size": BATCH, "load_average_at_end": os.getloadavg()[0],
            "note": "shared machine; questions/s measured under load"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK} questions of each split, 20 training steps")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-qa"),
                        help="where dapeng's models are trained (finished runs of the same config are reused)")
    args = parser.parse_args(argv)
    results = measure(args.quick, args.runs)
    print(json.dumps({"results": {"qa": results}, "ratios": ratios(results), "env": env_info()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
