"""Template filling of missing modalities: exact windows in the atlas grid, resampling through affines, dropout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainmm.adapters.missing import ModalityDropout, TemplateBank, modality_subsets, resample_to_grid


def _bank(atlas=(12, 10, 8)) -> TemplateBank:
    g = torch.Generator().manual_seed(0)
    tpl = {"flair": torch.rand(*atlas, generator=g), "t1": torch.rand(*atlas, generator=g)}
    return TemplateBank(["t1", "flair", "t2"], tpl, atlas, source="test")


def test_window_is_an_exact_slice_and_zero_outside():
    bank = _bank()
    vol = bank.volumes.astype(np.float32)
    w = bank.window((2, 3, 1), (4, 5, 6))
    assert np.array_equal(w, vol[:, 2:6, 3:8, 1:7])
    w = bank.window((-2, 8, 0), (4, 4, 8))  # partly outside the grid
    assert np.array_equal(w[:, 2:, :2], vol[:, :2, 8:10, :]) and not w[:, :2].any() and not w[:, :, 2:].any()
    assert bank.missing_templates == ("t2",) and not bank.volumes[2].any()


def test_fill_replaces_only_absent_channels():
    bank = _bank()
    image = np.full((3, 4, 4, 4), 7.0, np.float32)
    out = bank.fill(image, [True, False, False], (1, 1, 1))
    assert (out[0] == 7).all()
    assert np.array_equal(out[1:], bank.window((1, 1, 1), (4, 4, 4))[1:])
    assert (image == 7).all()  # input untouched


def test_templates_of_another_grid_are_centre_placed():
    atlas = (12, 10, 8)
    small = _bank((8, 6, 8))
    big = TemplateBank(["t1", "flair", "t2"], small.export(), atlas)
    # symmetric pad: (12 - 8) // 2 = 2, (10 - 6) // 2 = 2, 0
    assert np.array_equal(big.volumes[:, 2:10, 2:8, :], small.volumes)


def test_resample_through_affines_matches_exact_windows():
    bank = _bank()
    atlas_affine = np.array([[1.0, 0, 0, -6], [0, 1, 0, -5], [0, 0, 1, 3], [0, 0, 0, 1]])
    # A crop starting at atlas voxel (2, 3, 1): same spacing, shifted origin.
    crop_affine = atlas_affine.copy()
    crop_affine[:3, 3] += atlas_affine[:3, :3] @ np.array([2, 3, 1])
    got = bank.resample(crop_affine, atlas_affine, (4, 5, 6)).numpy()
    assert np.allclose(got, bank.window((2, 3, 1), (4, 5, 6)), atol=1e-5)
    # An LPS-oriented grid of the same voxels: the first two axes flipped.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [11, 9]  # voxel i -> 11 - i, j -> 9 - j
    lps_affine = atlas_affine @ flip
    got = bank.resample(lps_affine, atlas_affine, (12, 10, 8)).numpy()
    assert np.allclose(got, bank.volumes[:, ::-1, ::-1, :].astype(np.float32), atol=1e-5)
    # Identity.
    vol = torch.rand(1, 5, 4, 3)
    assert torch.allclose(resample_to_grid(vol, np.eye(4), np.eye(4), (5, 4, 3)), vol, atol=1e-6)


def test_modality_dropout_is_seeded_and_keeps_one():
    drop = ModalityDropout(0.9)
    present = np.array([True, True, False, True])
    a = [drop(present, np.random.default_rng([0, 1, i])) for i in range(50)]
    b = [drop(present, np.random.default_rng([0, 1, i])) for i in range(50)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(k.sum() >= 1 and not (k & ~present).any() for k in a)
    assert any(k.sum() < present.sum() for k in a)
    assert np.array_equal(ModalityDropout(0.0)(present, np.random.default_rng(0)), present)
    with pytest.raises(ValueError, match="dropout probability"):
        ModalityDropout(1.0)


def test_modality_subsets():
    subs = modality_subsets(["t1", "t2", "flair"])
    assert len(subs) == 7 and subs[0] == ("t1", "t2", "flair") and ("t2",) in subs
