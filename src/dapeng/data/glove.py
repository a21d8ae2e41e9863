"""GloVe 6B 50-d word vectors (catalog entry `glove-6b-50d`): embedding init and synonym tables."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch

from dapeng.errors import DataError

GLOVE = "glove-6b-50d"
GLOVE_DIM = 50


@lru_cache(maxsize=1)
def load_glove() -> tuple[dict[str, int], np.ndarray]:
    """Word → row and the (400000, 50) float32 vectors (memory-mapped), fetched and verified if needed."""
    from dapeng.data.catalog import fetch

    folder = fetch(GLOVE)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading the GloVe word index needs pyarrow", "pip install pyarrow") from None
    words = pq.read_table(folder / "glove_6B_index.parquet", columns=["index"]).column("index").to_pylist()
    vectors = np.load(folder / "glove_6B_50d_emb.npy", mmap_mode="r")
    if len(words) != vectors.shape[0]:
        raise DataError(
            f"{folder}: {len(words)} words for {vectors.shape[0]} vectors",
            "run `dapeng data fetch glove-6b-50d`",
        )
    return {w: i for i, w in enumerate(words)}, vectors


def glove_matrix(vocab: Mapping[str, int], num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of GloVe vectors for a tokenizer's vocabulary.

    Args:
        vocab: token → id (whole-word tokens; others are ignored).
        num_tokens: rows of the embedding matrix.

    Returns:
        vectors (num_tokens, 50) float32 (zeros where no word matched) and a bool mask of the rows found.
    """
    index, table = load_glove()
    out = np.zeros((num_tokens, GLOVE_DIM), dtype=np.float32)
    found = np.zeros(num_tokens, dtype=bool)
    rows = [(i, index[t]) for t, i in vocab.items() if i < num_tokens and t in index]
    if rows:
        ids, glove_rows = map(np.asarray, zip(*rows))
        order = np.argsort(glove_rows)  # read the memory map in order
        out[ids[order]] = table[glove_rows[order]]
        found[ids] = True
    return out, found


def frequent_words(n: int) -> list[str]:
    """GloVe's `n` most frequent words (its files list words by corpus frequency)."""
    index, _ = load_glove()
    return [w for w, row in index.items() if row < n]


def glove_neighbours(
    vocab: Mapping[str, int], num_tokens: int, k: int = 5, min_similarity: float = 0.6
) -> np.ndarray:
    """For each token id, the ids of its `k` nearest vocabulary words by GloVe cosine similarity.

    Returns:
        (num_tokens, k) int64, -1 where a token has no GloVe vector or fewer close neighbours.
    """
    vectors, found = glove_matrix(vocab, num_tokens)
    out = np.full((num_tokens, k), -1, dtype=np.int64)
    ids = np.flatnonzero(found)
    if len(ids) < 2:
        return out
    k_eff = min(k, len(ids) - 1)
    unit = torch.nn.functional.normalize(torch.from_numpy(vectors[ids]), dim=1)  # (V_found, 50)
    with torch.autocast("cpu", enabled=False):  # fp32 similarities, also when called inside a bf16 step
        _nearest(unit, ids, out, k_eff, min_similarity)
    return out


def _nearest(unit: torch.Tensor, ids: np.ndarray, out: np.ndarray, k: int, min_similarity: float) -> None:
    for start in range(0, len(ids), 4096):
        sims = unit[start : start + 4096] @ unit.T  # (chunk, V_found)
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = -1.0  # a word is not its own synonym
        top_sims, top = sims.topk(k, dim=1)
        picked = np.where(top_sims.numpy() >= min_similarity, ids[top.numpy()], -1)
        out[ids[start : start + 4096], :k] = picked
