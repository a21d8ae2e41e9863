"""Data for sequence labelling: Brown's universal tagset, canonical splits, CoNLL and JSONL readers."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from dapeng.config import DataConfig, load_config
from dapeng.data import load_splits
from dapeng.data.catalog import get_entry, grouped_split, load_dataset
from dapeng.data.readers import read_conll, read_jsonl, read_records
from dapeng.data.tagsets import (
    _BROWN_BY_CLASS,
    BROWN_BASE_TAGS,
    UNIVERSAL_TAGS,
    to_universal,
    ud_to_universal,
)
from dapeng.errors import ConfigError, DataError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- Brown -> universal


@pytest.mark.parametrize(
    ("tag", "universal"),
    [
        ("NN", "NOUN"), ("NN-TL", "NOUN"), ("NN-TL-HL", "NOUN"), ("np-tl", "NOUN"), ("NN$", "NOUN"),
        ("NNS$-TL-HL", "NOUN"), ("NR-TL", "NOUN"), ("PN", "NOUN"), ("CD$", "NOUN"),
        ("VBD-HL", "VERB"), ("BEDZ*", "VERB"), ("MD*", "VERB"), ("HV+TO", "VERB"), ("VB+PPO", "VERB"),
        ("PPS+BEZ", "PRT"), ("PPSS+MD", "PRT"), ("EX+BEZ", "PRT"), ("EX", "PRT"), ("TO", "PRT"),
        ("RP", "PRT"), ("UH", "PRT"), ("ABN", "PRT"), ("PPSS+BER-N", "PRT"),
        ("*", "ADV"), ("*-HL", "ADV"), ("QL", "ADV"), ("WRB", "ADV"),
        ("FW-NN", "X"), ("FW-*", "X"), ("FW-IN+AT-TL", "X"), ("NIL", "X"), ("WDT+BER+PP", "X"),
        ("PP$", "DET"), ("WP$", "DET"), ("AT", "DET"), ("ABX", "DET"), ("WDT", "DET"),
        ("PP$$", "PRON"), ("PPSS", "PRON"), ("WPS", "PRON"),
        ("CS", "ADP"), ("IN-TL", "ADP"), ("IN+PPO", "ADP"),
        ("AP", "ADJ"), ("OD", "ADJ"), ("JJT", "ADJ"),
        ("CD", "NUM"), ("CC", "CONJ"), ("---HL", "."), ("``", "."), ("(", "."),
    ],
)
def test_brown_to_universal_known_cases(tag, universal):
    assert to_universal(tag) == universal


def test_brown_table_is_well_formed_and_unknown_tags_are_errors():
    listed = [t for tags in _BROWN_BY_CLASS.values() for t in tags]
    assert len(listed) == len(set(listed)) == len(BROWN_BASE_TAGS)  # no tag listed under two classes
    assert set(_BROWN_BY_CLASS) == set(UNIVERSAL_TAGS)
    with pytest.raises(DataError, match="'NOUN-TL' is not a Brown corpus tag"):
        to_universal("NOUN-TL")


@pytest.fixture(scope="module")
def brown():
    return load_dataset("brown-pos")


@pytest.mark.data
def test_every_brown_tag_maps_and_counts_are_nltks(brown):
    counts = Counter(t for part in brown.values() for r in part for t in r["tags"])
    assert len(counts) == 472 and sum(counts.values()) == 1_161_192
    universal = Counter()
    for tag, n in counts.items():
        universal[to_universal(tag)] += n
    # nltk.corpus.brown.tagged_words(tagset="universal"), counted over the whole corpus
    assert universal == {
        "NOUN": 275558, "VERB": 182750, ".": 147565, "ADP": 144766, "DET": 137019, "ADJ": 83721,
        "ADV": 56239, "PRON": 49334, "CONJ": 38151, "PRT": 29829, "NUM": 14874, "X": 1386,
    }


@pytest.mark.parametrize(
    ("upos", "ptb", "universal"),
    [
        ("PROPN", "NNP", "NOUN"), ("AUX", "MD", "VERB"), ("CCONJ", "CC", "CONJ"), ("SCONJ", "IN", "ADP"),
        ("PART", "TO", "PRT"), ("PART", "POS", "PRT"), ("PART", "RB", "ADV"), ("PUNCT", ".", "."),
        ("SYM", "$", "."), ("INTJ", "UH", "PRT"), ("PRON", "PRP$", "DET"), ("PRON", "PRP", "PRON"),
        ("PRON", "EX", "PRT"), ("PRON", "WDT", "DET"), ("PRON", "NN", "NOUN"), ("ADP", "RP", "PRT"),
        ("DET", "PDT", "PRT"), ("SCONJ", "WRB", "ADV"), ("X", "LS", "NUM"), ("NUM", "CD", "NUM"),
        ("ADJ", None, "ADJ"), ("X", "FW", "X"),
    ],
)
def test_ud_to_universal(upos, ptb, universal):
    assert ud_to_universal(upos, ptb) == universal


def test_ud_to_universal_rejects_unknown_tags():
    with pytest.raises(DataError, match="'NN' is not a UD part-of-speech tag"):
        ud_to_universal("NN")


# ---------------------------------------------------------------- canonical splits


def test_grouped_split_keeps_groups_whole_and_is_seeded():
    groups = [f"d{i // 3}" for i in range(60)]  # 20 groups of 3 records
    strata = ["a" if i < 30 else "b" for i in range(60)]
    rest, eval_, test = grouped_split(groups, strata, [0.2, 0.2], seed=1)
    assert sorted(rest + eval_ + test) == list(range(60))
    parts = [{groups[i] for i in p} for p in (rest, eval_, test)]
    assert [len(p) for p in parts] == [12, 4, 4]  # fractions count groups
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert Counter(strata[i] for i in test) == {"a": 6, "b": 6}  # two groups of each stratum
    assert grouped_split(groups, strata, [0.2, 0.2], seed=1) == [rest, eval_, test]
    assert grouped_split(groups, strata, [0.2, 0.2], seed=2) != [rest, eval_, test]


@pytest.mark.data
def test_brown_split_is_by_document_stratified_by_genre_and_pinned(brown):
    docs = {part: {r["doc"] for r in records} for part, records in brown.items()}
    assert {k: len(v) for k, v in docs.items()} == {"train": 400, "eval": 50, "test": 50}
    assert not (docs["train"] & docs["test"] or docs["train"] & docs["eval"] or docs["eval"] & docs["test"])
    assert sum(len(v) for v in brown.values()) == 57340
    genres = {r["doc"]: r["genre"] for records in brown.values() for r in records}
    per_genre = Counter(genres.values())
    in_test = Counter(genres[d] for d in docs["test"])
    for genre, n in per_genre.items():  # largest remainder: within one document of 10%
        assert abs(in_test[genre] - n / 10) < 1, genre
    # the canonical split is part of the benchmark's definition: it must not drift
    assert sorted(docs["test"])[:6] == ["ca08", "ca19", "ca34", "ca38", "cb14", "cb18"]
    assert brown["test"][0]["doc"] == "cj69" and len(brown["test"]) == 5691
    assert "records with the same 'doc' stay in one part" in get_entry("brown-pos").splits.describe()


@pytest.mark.data
def test_brown_limit_samples_sentences_not_documents():
    splits = load_splits(DataConfig(dataset="brown-pos", limit=40))
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (40, 40, 40)


@pytest.mark.data
def test_wnut16_split_is_seeded_and_keeps_repeated_tweets_in_one_part():
    first, again = load_dataset("wnut16-ner"), load_dataset("wnut16-ner")
    assert first == again
    assert {k: len(v) for k, v in first.items()} == {"train": 1910, "eval": 239, "test": 245}
    texts = {k: {tuple(r["tokens"]) for r in v} for k, v in first.items()}
    assert not (texts["train"] & texts["test"] or texts["train"] & texts["eval"])
    assert all(len(r["tokens"]) == len(r["tags"]) for v in first.values() for r in v)


# ---------------------------------------------------------------- CoNLL


CONLL2003 = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER

-DOCSTART- -X- -X- O

Hi UH B-INTJ O
"""


def test_conll_columns_documents_and_sources(tmp_path):
    f = write(tmp_path / "train.conll", CONLL2003)
    records = read_conll(f, token_column=0, tag_column=3)
    assert [r["tokens"] for r in records] == [["EU", "rejects", "German"], ["Peter"], ["Hi"]]
    assert [r["tags"] for r in records] == [["B-ORG", "O", "B-MISC"], ["B-PER"], ["O"]]
    assert [r["doc"] for r in records] == [0, 0, 1]
    assert records[1]["_source"] == f"{f}:7"
    assert read_conll(f) == records  # -1: the last column
    assert read_conll(f, tag_column=1)[0]["tags"] == ["NNP", "VBZ", "JJ"]


def test_conllu_comments_and_multiword_lines(tmp_path):
    rows = [
        "# sent_id = 1",
        "# text = Del cielo.",
        "1-2\tDel\t_\t_\t_\t_\t_\t_\t_\t_",
        "1\tDe\tde\tADP\t_\t_\t3\tcase\t_\t_",
        "2\tel\tel\tDET\t_\t_\t3\tdet\t_\t_",
        "3\tcielo\tcielo\tNOUN\t_\t_\t0\troot\t_\t_",
        "4\t.\t.\tPUNCT\t_\t_\t3\tpunct\t_\t_",
        "",
    ]
    f = write(tmp_path / "es.conllu", "\n".join(rows))
    (record,) = read_conll(f, token_column=1, tag_column=3)
    assert record["tokens"] == ["De", "el", "cielo", "."]
    assert record["tags"] == ["ADP", "DET", "NOUN", "PUNCT"]


def test_conll_hashtag_tokens_are_tokens(tmp_path):
    f = write(tmp_path / "tweets.conll", "#nowplaying\tO\nAdele\tB-person\n\n#\tO\n")
    assert [r["tokens"] for r in read_conll(f)] == [["#nowplaying", "Adele"], ["#"]]


def test_conll_unlabelled_input_for_prediction(tmp_path):
    f = write(tmp_path / "raw.conll", "John\nruns\n\nHi\n")
    assert read_conll(f, require_label=False) == [
        {"tokens": ["John", "runs"], "_source": f"{f}:1"},
        {"tokens": ["Hi"], "_source": f"{f}:4"},
    ]


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("John B-PER\nruns\n", {}, r"raw\.conll:2: 1 column, too few for the token in column 0 and the tag in column -1"),
        (CONLL2003, {"tag_column": 4}, r"raw\.conll:3: 4 columns, too few for .* the tag in column 4"),
        ("John B-PER\nruns\n\nHi\n", {"require_label": False},
         r"raw\.conll:2: no tag \(column -1\) in a sentence whose other lines have one"),
        ("John\t_\nruns\tO\n", {}, r"raw\.conll:1: empty tag '_' in column -1"),
        ("\n\n", {}, r"raw\.conll: no sentences found"),
    ],
)
def test_conll_bad_rows_name_file_and_line(tmp_path, text, kwargs, message):
    f = write(tmp_path / "raw.conll", text)
    with pytest.raises(DataError, match=message) as err:
        read_conll(f, **kwargs)
    assert "\n" not in str(err.value) and err.value.hint  # one line: what is wrong — what to do


def test_config_token_and_tag_columns_reach_the_reader(tmp_path):
    write(tmp_path / "train.conll", CONLL2003 + "\n" + "\n".join(f"w{i} X X O\n" for i in range(20)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "task: token-classification\n"
        "data: {train: train.conll, token_column: 0, tag_column: 1}\n"
        "model: {name: lstm}\n"
    )
    splits = load_splits(load_config(cfg).data)
    records = splits.train + splits.eval + splits.test
    assert {t for r in records for t in r["tags"]} == {"NNP", "VBZ", "JJ", "UH", "X"}
    with pytest.raises(ConfigError, match="data.tag_column"):
        load_config(cfg, ["data.tag_column=ner"])


def test_user_conll_split_keeps_documents_whole(tmp_path):
    docs = "".join("-DOCSTART- O\n\n" + "".join(f"d{d}s{s} O\n\n" for s in range(5)) for d in range(20))
    f = write(tmp_path / "docs.conll", docs)
    splits = load_splits(DataConfig(train=f, eval_fraction=0.1, test_fraction=0.1))
    parts = [{r["doc"] for r in part} for part in (splits.train, splits.eval, splits.test)]
    assert [len(p) for p in parts] == [16, 2, 2] and [len(p) for p in (splits.train, splits.eval, splits.test)] == [80, 10, 10]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


# ---------------------------------------------------------------- JSONL tokens


def test_jsonl_tokens_and_tags(tmp_path):
    f = write(tmp_path / "t.jsonl", json.dumps({"tokens": ["John", "runs"], "tags": ["B-PER", "O"]}) + "\n")
    (record,) = read_records(f)
    assert record["tokens"] == ["John", "runs"] and record["tags"] == ["B-PER", "O"]
    unlabelled = write(tmp_path / "u.jsonl", json.dumps({"tokens": ["Hi"]}) + "\n")
    assert read_jsonl(unlabelled, require_label=False)[0]["tokens"] == ["Hi"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"tokens": ["a", "b"], "tags": ["O"]}, r"t\.jsonl:2: 2 tokens but 1 tags"),
        ({"tokens": "John runs", "tags": ["O"]}, r't\.jsonl:2: "tokens" must be a non-empty list of strings, got a str'),
        ({"tokens": [], "tags": []}, r"t\.jsonl:2: .* got an empty list"),
        ({"tokens": ["a", 3], "tags": ["O", "O"]}, r"t\.jsonl:2: token 1 is 3, not a non-empty string"),
        ({"tokens": ["a", "b"], "tags": ["O", None]}, r"t\.jsonl:2: tag 1 \(of token 'b'\) is null"),
        ({"tokens": ["a", "b"]}, r't\.jsonl:2: no "tags" for the 2 tokens'),
        ({"tokens": ["a"], "tags": "O"}, r"t\.jsonl:2: 1 tokens but a str"),
    ],
)
def test_jsonl_bad_tagging_rows_name_file_and_line(tmp_path, record, message):
    good = json.dumps({"tokens": ["ok"], "tags": ["O"]})
    f = write(tmp_path / "t.jsonl", good + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        read_jsonl(f)
