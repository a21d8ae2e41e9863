"""Batched augmentation: each op does what it says, keeps shapes, and leaves what it must alone."""

import numpy as np
import pytest
import torch

from dapeng.data import glove
from dapeng.data.augment import (
    ImageAugment,
    TextAugment,
    random_affine,
    random_crop,
    random_erasing,
    random_flip,
)

torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a busy 2-core box


def images(b=6, c=2, h=8, w=8):
    return torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)


def test_crop_without_padding_is_identity_and_with_padding_is_a_shifted_window():
    x = images()
    assert torch.equal(random_crop(x, 0), x)
    gen = torch.Generator().manual_seed(0)
    y = random_crop(x, 2, fill=-1.0, generator=gen)
    assert y.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    for i in range(len(x)):
        windows = [padded[i, :, a : a + 8, b : b + 8] for a in range(5) for b in range(5)]
        assert any(torch.equal(y[i], win) for win in windows)


def test_flip_with_p1_flips_all():
    x = images()
    assert torch.equal(random_flip(x, -1, p=1.0), x.flip(-1))
    assert torch.equal(random_flip(x, -2, p=0.0), x)


def test_affine_with_no_change_is_identity():
    x = torch.rand(3, 1, 10, 10)
    assert torch.allclose(random_affine(x), x, atol=1e-5)
    rotated = random_affine(x, degrees=30.0, fill=0.5, generator=torch.Generator().manual_seed(1))
    assert rotated.shape == x.shape and not torch.allclose(rotated, x)


def test_erasing_blanks_a_rectangle_only_when_drawn():
    x = torch.ones(4, 3, 16, 16)
    assert torch.equal(random_erasing(x, p=0.0), x)
    y = random_erasing(x, p=1.0, value=0.0, generator=torch.Generator().manual_seed(0))
    erased = (y == 0).all(1)  # (B, H, W): all channels blanked together
    assert erased.flatten(1).any(1).all()
    for mask in erased:
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # a solid rectangle


def test_image_augment_keeps_shape_and_channels_last():
    aug = ImageAugment(crop_padding=2, hflip=True, degrees=10, erasing=0.5)
    x = torch.rand(4, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    y = aug(x, fill=torch.zeros(3))
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert not ImageAugment().active and aug.active


def test_token_dropout_spares_padding_and_protected_ids():
    ids = torch.tensor([[2, 10, 11, 12, 13, 3, 0, 0]] * 200)
    mask = ids != 0
    out = TextAugment(dropout=0.5, unk_id=1, protected=(0, 2, 3))(ids, mask)
    assert torch.equal(out[:, [0, 5, 6, 7]], ids[:, [0, 5, 6, 7]])
    dropped = (out[:, 1:5] == 1).float().mean().item()
    assert 0.4 < dropped < 0.6


def test_token_swap_permutes_within_a_row():
    ids = torch.arange(10, 30).reshape(2, 10)
    out = TextAugment(swap=0.5, protected=())(
        ids, torch.ones_like(ids, dtype=torch.bool), torch.Generator().manual_seed(0)
    )
    assert not torch.equal(out, ids)
    assert torch.equal(out.sort(1).values, ids)
    moved = (out != ids).nonzero()[:, 1]
    assert ((out - ids).abs()[out != ids] == 1).all() and len(moved) % 2 == 0  # only neighbours swapped


def test_synonym_replacement_uses_the_table():
    table = torch.full((20, 2), -1, dtype=torch.long)
    table[5] = torch.tensor([7, 8])
    ids = torch.tensor([[5, 6, 5, 6]])
    out = TextAugment(synonym=1.0, neighbours=table)(ids, torch.ones_like(ids, dtype=torch.bool))
    assert set(out[0, [0, 2]].tolist()) <= {7, 8} and out[0, [1, 3]].tolist() == [6, 6]


def test_glove_neighbours_from_vectors(monkeypatch):
    words = {"good": 0, "great": 1, "bad": 2, "awful": 3, "chair": 4}
    vectors = np.zeros((5, 50), dtype=np.float32)
    vectors[0, :2] = [1.0, 0.1]
    vectors[1, :2] = [1.0, 0.2]
    vectors[2, :2] = [-1.0, 0.1]
    vectors[3, :2] = [-1.0, 0.2]
    vectors[4, 2] = 1.0
    monkeypatch.setattr(glove, "load_glove", lambda: (words, vectors))
    vocab = {"[PAD]": 0, "good": 1, "great": 2, "bad": 3, "awful": 4, "chair": 5, "zzz": 6}
    table = glove.glove_neighbours(vocab, 7, k=1, min_similarity=0.5)
    assert table[:, 0].tolist() == [-1, 2, 1, 4, 3, -1, -1]
    matrix, found = glove.glove_matrix(vocab, 7)
    assert found.tolist() == [False, True, True, True, True, True, False]
    assert np.array_equal(matrix[5], vectors[4])


@pytest.mark.parametrize("p", [0.0])
def test_inactive_text_augment(p):
    assert not TextAugment(dropout=p).active
