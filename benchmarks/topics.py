"""Topic models on State of the Union passages: dapeng's ProdLDA against scikit-learn's LDA, 20 topics each.

    python benchmarks/topics.py              # the canonical splits in full
    python benchmarks/topics.py --quick      # 500 passages a split, a few training steps (a smoke run)

dapeng's model is `examples/sotu-prodlda.yaml`, trained by `dapeng.runner.train` into `--runs` (a
finished run whose config is the same is reused; its checkpoint is the one with the best NPMI on the
eval split, whose addresses are neither trained on nor the test reference). The baseline is scikit-learn's
`LatentDirichletAllocation` (batch variational Bayes, 20 topics, priors 1/K, `--lda-iter` passes,
seed 0), fitted on the training passages' counts over the *same* vocabulary (the ProdLDA task's
own CountVectorizer, learned on the training split).

Both are scored by the same functions (`dapeng.tasks.topic_model`): `npmi` is the mean over topics
of the NPMI of each topic's top-10 word pairs by document co-occurrence in the held-out test
passages (whole addresses the models never saw; a pair that never co-occurs scores −1), and
`diversity` the share of unique words among all topics' top 25. ProdLDA ranks words by its
decoder weights β, LDA by its topic-word pseudo-counts (`components_`).

The last line of stdout is one JSON object: {"results": {"sotu": {"prodlda": {...}, "lda": {...}}},
"ratios": {"prodlda_vs_lda_npmi": ..., "prodlda_vs_lda_diversity": ...}, "env": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dapeng.data.catalog import load_dataset
from dapeng.tasks.topic_model import npmi_coherence, top_words, topic_diversity

EXAMPLE = "sotu-prodlda"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOPICS = 20
QUICK = 500


def log(msg: str) -> None:
    print(f"[topics {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def trained_run(runs: Path, quick: bool) -> tuple[Path, float | None]:
    """The run directory of the example (trained now unless a finished run of the same config is there)
    and the training time in seconds (None when reused)."""
    from dapeng.config import load_config
    from dapeng.runner import train

    overrides = ["train.max_steps=20", "train.epochs=1", f"data.limit={QUICK}"] if quick else []
    config = load_config(EXAMPLES / f"{EXAMPLE}.yaml", overrides)
    out = runs / (f"{EXAMPLE}-quick" if quick else EXAMPLE)
    saved = out / "config.yaml"
    if (out / "model" / "dapeng.json").is_file() and saved.is_file() and load_config(saved) == config:
        log(f"reusing {out}")
        return out, None
    if out.exists():
        import shutil

        shutil.rmtree(out)
    log(f"training into {out}")
    start = time.perf_counter()
    train(config, out, progress=False)
    return out, time.perf_counter() - start


def scores(topic_word: Any, presence: Any) -> dict[str, Any]:
    """NPMI (top 10, over `presence`) and diversity (top 25) of a (K, V) topic-word matrix."""
    per_topic = npmi_coherence(top_words(topic_word, 10), presence)
    return {"npmi": sum(per_topic) / len(per_topic), "npmi_per_topic": per_topic,
            "diversity": topic_diversity(top_words(topic_word, 25))}


def named_topics(topic_word: Any, vocabulary: Sequence[str], n: int = 8) -> list[str]:
    return [" ".join(vocabulary[w] for w in row) for row in top_words(topic_word, n)]


def lda(train_counts: Any, iterations: int, seed: int = 0) -> tuple[Any, float]:
    """scikit-learn LDA with 20 topics fitted on the training counts; (topic-word pseudo-counts, seconds)."""
    from sklearn.decomposition import LatentDirichletAllocation

    model = LatentDirichletAllocation(n_components=TOPICS, learning_method="batch", max_iter=iterations,
                                      random_state=seed)
    start = time.perf_counter()
    model.fit(train_counts)
    return model.components_, time.perf_counter() - start


def env_info(threads: int) -> dict[str, Any]:
    import sklearn
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"threads": threads, "precision": "fp32", "torch": torch.__version__, "sklearn": sklearn.__version__,
            "cpu": cpu, "cores": os.cpu_count(), "load_average_at_end": os.getloadavg()[0],
            "note": "shared machine: seconds are measured under load"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK} passages a split, 20 training steps")
    parser.add_argument("--threads", type=int, default=1, help="threads for training and for LDA")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-topics"),
                        help="where ProdLDA is trained (a finished run of the same config is reused)")
    parser.add_argument("--lda-iter", type=int, default=None, help="LDA passes over the data (default 20; quick 5)")
    args = parser.parse_args(argv)
    import torch
    from threadpoolctl import threadpool_limits

    import dapeng

    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        run, seconds = trained_run(args.runs, args.quick)
        pipe = dapeng.load(run, precision="fp32")
        task = pipe.task
        splits = load_dataset("sotu")
        if args.quick:
            splits = {k: v[:QUICK] for k, v in splits.items()}
        texts = {k: [r["text"] for r in v] for k, v in splits.items()}
        reference = task.doc_term(texts["test"])
        log(f"{len(texts['train'])} train / {len(texts['test'])} test passages, vocabulary {len(task.vocabulary)}")

        beta = pipe.model.topic_words()
        facts = json.loads((run / "metrics.json").read_text())
        prodlda: dict[str, Any] = {**scores(beta, reference), "topics": named_topics(beta, task.vocabulary),
                                   "test_perplexity": facts["test"].get("perplexity"),
                                   "trained_steps": facts["train"].get("steps")}
        if seconds is not None:
            prodlda["train_seconds"] = seconds
        log(f"prodlda: npmi {prodlda['npmi']:.4f}, diversity {prodlda['diversity']:.3f}")

        iterations = args.lda_iter or (5 if args.quick else 20)
        components, lda_seconds = lda(task.doc_term(texts["train"]), iterations)
        baseline = {**scores(components, reference), "topics": named_topics(components, task.vocabulary),
                    "iterations": iterations, "train_seconds": lda_seconds}
        log(f"lda: npmi {baseline['npmi']:.4f}, diversity {baseline['diversity']:.3f}")

    results = {"sotu": {"prodlda": prodlda, "lda": baseline,
                        "reference": {"documents": reference.shape[0], "vocabulary": reference.shape[1]}}}
    # NPMI lies in [-1, 1]: a ratio only reads as "better" while the baseline's is positive
    ratios = {
        "prodlda_vs_lda_npmi": prodlda["npmi"] / baseline["npmi"] if baseline["npmi"] > 0 else None,
        "prodlda_vs_lda_diversity": prodlda["diversity"] / baseline["diversity"],
    }
    results["sotu"]["prodlda"]["npmi_minus_lda"] = prodlda["npmi"] - baseline["npmi"]
    print(json.dumps({"results": results, "ratios": ratios, "env": env_info(args.threads)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
