"""The dataset catalog: seeded stratified splits, fetching, checksums, re-fetch of a corrupt cache."""

import gzip
import hashlib
import io
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from dapeng.data import catalog
from dapeng.data.catalog import DataFile, DatasetEntry, Origin, SplitSpec, Url, stratified_split
from dapeng.data.fetch import Installed, extract_member
from dapeng.errors import DataError, NotFoundError


def test_stratified_split_is_disjoint_complete_and_proportional():
    labels = ["a"] * 700 + ["b"] * 300
    rest, ev, te = stratified_split(labels, [0.1, 0.2], seed=3)
    assert sorted(rest + ev + te) == list(range(1000))
    assert len(ev) == 100 and len(te) == 200
    assert Counter(labels[i] for i in ev) == {"a": 70, "b": 30}
    assert Counter(labels[i] for i in te) == {"a": 140, "b": 60}


def test_stratified_split_is_seeded_and_takes_counts():
    labels = [str(i % 3) for i in range(90)]
    assert stratified_split(labels, [9], seed=1) == stratified_split(labels, [9], seed=1)
    assert stratified_split(labels, [9], seed=1) != stratified_split(labels, [9], seed=2)
    _, part = stratified_split(labels, [9], seed=1)
    assert Counter(labels[i] for i in part) == {"0": 3, "1": 3, "2": 3}


def test_split_recipe_is_written_down():
    assert catalog.get_entry("rotten-tomatoes").splits.describe() == "stratified eval 10%, test 10% (seed 0)"
    assert "official test set" in catalog.get_entry("fashion-mnist").splits.describe()


def test_unknown_dataset_suggests_close_names():
    with pytest.raises(NotFoundError, match="did you mean rotten-tomatoes"):
        catalog.get_entry("rotten-tomatoe")


def test_every_entry_has_license_checksums_and_a_source():
    for name in catalog.names():
        entry = catalog.get_entry(name)
        # a derived entry (captions made from another entry's images) names the entry it reads instead
        derived = entry.extra.get("derived_from")
        assert entry.license and (entry.origins or (not entry.files and derived in catalog.names()))
        assert all(len(f.sha256) == 64 and f.size > 0 for f in entry.files)
        for origin in entry.origins:
            assert set(origin.files) == {f.name for f in entry.files}


def _fake_entry(tmp_path: Path, payload: bytes, url_payload: bytes | None = None) -> DatasetEntry:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "data.bin").write_bytes(url_payload if url_payload is not None else payload)
    return DatasetEntry(
        name="fake",
        description="test entry",
        kind="text-classification",
        license="CC0",
        homepage="",
        files=(DataFile("data.bin", hashlib.sha256(payload).hexdigest(), len(payload)),),
        origins=(Origin({"data.bin": (Url((src / "data.bin").as_uri()), None)}),),
        loader=None,
        splits=SplitSpec(eval=0.1, test=0.1),
    )


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DAPENG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_fetch_caches_and_verifies(tmp_path, home, monkeypatch):
    monkeypatch.setitem(catalog.CATALOG, "fake", _fake_entry(tmp_path, b"hello"))
    folder = catalog.fetch("fake")
    assert folder == home / "datasets" / "fake"
    assert (folder / "data.bin").read_bytes() == b"hello"
    assert catalog.is_cached("fake")


def test_corrupt_cache_is_fetched_again(tmp_path, home, monkeypatch):
    monkeypatch.setitem(catalog.CATALOG, "fake", _fake_entry(tmp_path, b"hello"))
    folder = catalog.fetch("fake")
    (folder / "data.bin").write_bytes(b"garbage")
    catalog.fetch("fake")
    assert (folder / "data.bin").read_bytes() == b"hello"


def test_source_with_wrong_bytes_is_a_clear_error_and_leaves_nothing(tmp_path, home, monkeypatch):
    monkeypatch.setitem(catalog.CATALOG, "fake", _fake_entry(tmp_path, b"hello", url_payload=b"tampered"))
    with pytest.raises(DataError, match=r"checksum mismatch for .*fake/data.bin") as err:
        catalog.fetch("fake")
    assert "\n" not in str(err.value)
    assert list((home / "datasets" / "fake").iterdir()) == []


def test_missing_installed_package_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not installed"):
        Installed("no_such_package_dapeng").retrieve(tmp_path)


def test_extract_member_reads_zip_tar_folder_and_gunzips(tmp_path):
    body = b"x" * 100
    gz = gzip.compress(body)
    zpath = tmp_path / "a.whl"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("pkg/data/file.gz", gz)
    tpath = tmp_path / "a.tgz"
    with tarfile.open(tpath, "w:gz") as tf:
        info = tarfile.TarInfo("package/data/file.gz")
        info.size = len(gz)
        tf.addfile(info, io.BytesIO(gz))
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "sub" / "file.gz").write_bytes(gz)
    for archive, member in (
        (zpath, "pkg/data/file.gz"),
        (tpath, "package/data/file.gz"),
        (tmp_path / "dir", "sub/file.gz"),
    ):
        out = tmp_path / "out"
        extract_member(archive, member, out, decompress=True)
        assert out.read_bytes() == body
    with pytest.raises(DataError, match="nope not found in a.whl"):
        extract_member(zpath, "nope", tmp_path / "out")
