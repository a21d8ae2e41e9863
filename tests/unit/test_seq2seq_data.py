"""DDTP data: Translation indexes joined on Description-md5, splits by package without duplicates, pair files."""

from __future__ import annotations

import json

import pytest

from dapeng.data.catalog import canonical_split, drop_seen, get_entry
from dapeng.data.datasets import ddtp_pairs
from dapeng.data.fetch import join_translations
from dapeng.data.readers import read_pairs, read_records
from dapeng.errors import DataError

EN = """Package: alpha
Description-md5: 11111111111111111111111111111111
Description-en: fast text editor
 Alpha edits text.
 .
 It is fast.

Package: beta
Description-md5: 22222222222222222222222222222222
Description-en: image viewer
 Beta shows images.

Package: gamma
Description-md5: 33333333333333333333333333333333
Description-en: music player
"""
FR = """Package: beta
Description-md5: 22222222222222222222222222222222
Description-fr: visionneuse d'images
 Beta affiche des images.

Package: alpha
Description-md5: 11111111111111111111111111111111
Description-fr: éditeur de texte rapide
 Alpha édite du texte.
 .
 Il est rapide.

Package: stale
Description-md5: 99999999999999999999999999999999
Description-fr: une traduction sans original
"""


def _lists(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en").write_text(EN)
    (lists / "deb.debian.org_debian_dists_bookworm_main_i18n_Translation-fr").write_text(FR)
    return lists


def test_translations_join_english_on_description_md5(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    join_translations(_lists(tmp_path), ["fr"], out)
    rows = [json.loads(line) for line in (out / "ddtp-en-fr.jsonl").read_text().splitlines()]
    # sorted by package; the translation whose md5 no English description has is dropped
    assert [r["package"] for r in rows] == ["alpha", "beta"]
    alpha = rows[0]
    assert alpha["en"] == {"synopsis": "fast text editor", "paragraphs": ["Alpha edits text.", "It is fast."]}
    assert alpha["fr"] == {"synopsis": "éditeur de texte rapide", "paragraphs": ["Alpha édite du texte.",
                                                                                "Il est rapide."]}
    english = (out / "ddtp-en.jsonl").read_text().splitlines()
    assert len(english) == 3
    pairs = ddtp_pairs(rows, "fr")
    assert ("It is fast.", "Il est rapide.") in [(p["text"], p["target"]) for p in pairs]
    assert all(p["package"] in ("alpha", "beta") for p in pairs)


def test_paragraphs_are_paired_only_when_both_sides_have_as_many():
    row = {"package": "p", "md5": "m", "en": {"synopsis": "a tool", "paragraphs": ["One.", "Two."]},
           "fr": {"synopsis": "un outil", "paragraphs": ["Un et deux."]}}
    assert [(p["text"], p["target"]) for p in ddtp_pairs([row], "fr")] == [("a tool", "un outil")]


def _records():
    # 60 packages of 3 segments; every package repeats one boilerplate paragraph
    records = []
    for p in range(60):
        records += [{"text": f"synopsis {p}", "target": f"s {p}", "package": f"pkg{p}"},
                    {"text": f"paragraph {p}", "target": f"p {p}", "package": f"pkg{p}"},
                    {"text": "This package contains the documentation.", "target": "doc", "package": f"pkg{p}"}]
    return records


def test_the_ddtp_split_keeps_packages_whole_and_drops_duplicates_across_splits():
    spec = get_entry("ddtp-en-fr").splits
    assert spec.group == "package" and spec.dedupe == "text"
    records = _records()
    parts = [[records[i] for i in ix] for ix in canonical_split(records, spec, [5, 10])]
    packages = [{r["package"] for r in part} for part in parts]
    assert packages[0].isdisjoint(packages[1]) and packages[0].isdisjoint(packages[2])
    assert packages[1].isdisjoint(packages[2])
    assert sum(len(p) for p in packages) == 60
    train, eval_, test = drop_seen(parts, "text")
    boilerplate = "This package contains the documentation."
    assert sum(r["text"] == boilerplate for r in train) == 45  # within a part duplicates stay
    assert not any(r["text"] == boilerplate for r in eval_ + test)
    texts = [{r["text"] for r in part} for part in (train, eval_, test)]
    assert texts[0].isdisjoint(texts[1]) and texts[0].isdisjoint(texts[2]) and texts[1].isdisjoint(texts[2])
    assert len(eval_) == 10 and len(test) == 20


def test_tsv_and_jsonl_pairs_are_read_with_the_named_columns(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("en\tfr\tid\nhello\tbonjour\t1\nthank you\tmerci\t2\n")
    rows = read_records(tsv, source_column="en", target_column="fr")
    assert [(r["text"], r["target"], r["id"]) for r in rows] == [("hello", "bonjour", "1"), ("thank you", "merci", "2")]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"en": "hello", "fr": "bonjour"}\n')
    assert read_pairs(jsonl, "en", "fr")[0]["target"] == "bonjour"


def test_a_bad_tsv_row_is_an_error_naming_file_and_line(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("en\tfr\nhello\tbonjour\nthank you\t \n")
    with pytest.raises(DataError, match=r"pairs\.tsv:3: empty"):
        read_pairs(tsv, "en", "fr")
    tsv.write_text("en\tfr\nhello\tbonjour\nthank you\n")
    with pytest.raises(DataError, match=r"pairs\.tsv:3: row has 1 fields"):
        read_pairs(tsv, "en", "fr")
    tsv.write_text("en\tfr\nhello\tbonjour\n")
    with pytest.raises(DataError, match=r"pairs\.tsv:2: no target column 'de'"):
        read_pairs(tsv, "en", "de")
