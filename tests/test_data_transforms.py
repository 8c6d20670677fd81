"""Preprocessing pipeline: atlas grid, percentile scaling, orientation, exact atlas placement, invertibility."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Invertd, ResizeWithPadOrCrop

from brainmm.data.datasets import Study
from brainmm.data.transforms import (
    PreprocessingParams,
    atlas_placement,
    build_preprocessing,
    paste_into_atlas,
)

ATLAS = (40, 40, 32)


def save(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def phantom(shape=(30, 34, 20), seed=0):
    """Blob with an asymmetric marker on a zero background (so the foreground box is known)."""
    rng = np.random.default_rng(seed)
    arr = np.zeros(shape, np.float32)
    arr[4:26, 5:30, 3:17] = rng.uniform(10, 100, (22, 25, 14))
    arr[4:8, 5:9, 3:6] = 500.0  # marker in the low corner
    return arr


@pytest.fixture()
def study(tmp_path):
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = (-15, -17, -10)
    t1 = save(tmp_path / "s_t1.nii.gz", phantom(seed=1), aff)
    t2 = save(tmp_path / "s_t2.nii.gz", phantom(seed=2), aff)
    lab = np.zeros((30, 34, 20), np.uint8)
    lab[10:15, 10:20, 5:9] = 2
    lab[11:13, 12:14, 6:8] = 3
    seg = save(tmp_path / "s_seg.nii.gz", lab, aff)
    return Study("s", {"t1": t1, "t2": t2}, label=seg)


def test_atlas_grid_and_scaling(study):
    out = build_preprocessing(None, with_label=True, atlas_size=ATLAS)(study)
    img = out["image"]
    assert tuple(img.shape) == (2, *ATLAS) and img.dtype == torch.float32
    assert out["modalities"] == ("t1", "t2") and tuple(out["label"].shape) == (1, *ATLAS)
    for c in range(2):
        assert float(img[c].min()) == 0.0 and float(img[c].max()) == pytest.approx(1.0)
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 2.0, 3.0}
    # the foreground box (22, 25, 14) is centred in the atlas grid
    assert list(out["foreground_start_coord"]) == [4, 5, 3] and list(out["foreground_end_coord"]) == [26, 30, 17]
    src, dst, size = atlas_placement((22, 25, 14), ATLAS)
    assert src == (0, 0, 0) and dst == (9, 7, 9) and size == (22, 25, 14)
    nz = torch.nonzero(img.sum(0))
    assert nz.min(0).values.tolist() == list(dst)


def test_channel_order_follows_requested_modalities(study):
    out = build_preprocessing(None, ["T2w", "flair", "t1"], atlas_size=ATLAS)(study)
    assert out["modalities"] == ("t2", "t1")
    ref = build_preprocessing(None, ["t1", "t2"], atlas_size=ATLAS)(study)
    torch.testing.assert_close(out["image"][0], ref["image"][1])
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps transform errors
        build_preprocessing(None, ["adc"], atlas_size=ATLAS)(study)
    cause = err.value.__cause__
    assert isinstance(cause, ValueError) and "none of the requested modalities" in str(cause)


def test_lps_input_becomes_ras(tmp_path):
    arr = phantom()
    ras = np.diag([1.0, 1.0, 1.0, 1.0])
    ras[:3, 3] = (-15, -17, -10)
    # The same physical image stored LPS: first two voxel axes flipped, affine adjusted.
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = (-15 + 29, -17 + 33, -10)
    a = save(tmp_path / "ras_t1.nii.gz", arr, ras)
    b = save(tmp_path / "lps_t1.nii.gz", np.ascontiguousarray(arr[::-1, ::-1]), lps)
    assert nib.aff2axcodes(nib.load(b).affine) == ("L", "P", "S")
    pipe = build_preprocessing(None, ["t1"], atlas_size=ATLAS)
    out_a = pipe(Study("a", {"t1": a}))
    out_b = pipe(Study("b", {"t1": b}))
    assert nib.aff2axcodes(out_b["image"].affine.numpy()) == ("R", "A", "S")
    torch.testing.assert_close(out_a["image"].as_tensor(), out_b["image"].as_tensor())


def test_invert_label_returns_original_grid(study):
    pipe = build_preprocessing(None, with_label=True, atlas_size=ATLAS, spacing=(1.5, 1.5, 1.5))
    out = pipe(study)
    assert tuple(out["label"].shape[1:]) == ATLAS
    restored = Invertd("label", transform=pipe, orig_keys="label", nearest_interp=True)(out)
    assert tuple(restored["label"].shape) == (1, 30, 34, 20)
    # at 1 mm the round trip is exact
    pipe1 = build_preprocessing(None, with_label=True, atlas_size=ATLAS)
    back = Invertd("label", transform=pipe1, orig_keys="label", nearest_interp=True)(pipe1(study))
    np.testing.assert_array_equal(back["label"][0].numpy(), np.asanyarray(nib.load(study.label).dataobj))


@pytest.mark.parametrize("shape", [(22, 25, 14), (41, 40, 33), (43, 39, 31), (40, 40, 32), (1, 45, 60)])
def test_atlas_placement_matches_monai(shape):
    x = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(1, *shape) + 1
    y = ResizeWithPadOrCrop(ATLAS, method="symmetric")(x).as_tensor().numpy()
    src, dst, size = atlas_placement(shape, ATLAS)
    box = x.numpy()[(slice(None), *(slice(s, s + n) for s, n in zip(src, size, strict=True)))]
    np.testing.assert_array_equal(paste_into_atlas(box, dst, ATLAS), y)


def test_params():
    p = PreprocessingParams.from_any({"spacing": [1, 1, 1], "atlas_size": [240, 240, 155], "architecture": "x"})
    assert p == PreprocessingParams() and p.digest() == PreprocessingParams().digest()
    assert PreprocessingParams.from_any(None, spacing=(2, 2, 2)).digest() != p.digest()
    with pytest.raises(ValueError, match="intensity method 'zscore'"):
        PreprocessingParams(intensity={"method": "zscore"})
    with pytest.raises(ValueError, match="spacing"):
        PreprocessingParams(spacing=(1, 1))
    try:
        from brainmm.models._pretrained import PretrainedCfg
    except Exception:  # brainmm.models is optional for the data layer
        pytest.skip("brainmm.models not importable")
    cfg = PretrainedCfg(spacing=(1.2, 1.2, 1.2), atlas_size=(64, 64, 48), modalities=("t2", "t1"))
    q = PreprocessingParams.from_any(cfg)
    assert q.spacing == (1.2, 1.2, 1.2) and q.atlas_size == (64, 64, 48) and q.intensity["lower"] == 5
    assert PreprocessingParams.from_any(cfg.to_dict()) == q
