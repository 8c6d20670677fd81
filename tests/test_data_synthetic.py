"""Synthetic multi-parametric phantoms: determinism, anatomy/contrast plausibility, BraTS-style files on disk."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brainmm.data.modalities import MODALITIES
from brainmm.data.synthetic import CLASS_NAMES, TISSUES, synthesize_study, write_synthetic_dataset

SHAPE = (48, 48, 32)
T = {name: i for i, name in enumerate(TISSUES)}


@pytest.fixture(scope="module")
def tumour():
    return synthesize_study(3, SHAPE, kind="tumour", missing_prob=0.0)


@pytest.fixture(scope="module")
def stroke():
    return synthesize_study(4, SHAPE, kind="stroke", missing_prob=0.0)


def _mean(study, modality, tissue):
    mask = (study.tissue == T[tissue]) & (study.label == 0) & (study.lesion == 0)
    # erode so partial-volume blur at tissue borders does not dominate thin structures
    core = ndimage.binary_erosion(mask)
    return float(study.images[modality][core if core.sum() > 20 else mask].mean())


def test_deterministic_in_seed():
    a = synthesize_study(7, (32, 32, 24))
    b = synthesize_study(7, (32, 32, 24))
    c = synthesize_study(8, (32, 32, 24))
    assert a.kind == b.kind and a.modalities == b.modalities
    for m in a.modalities:
        np.testing.assert_array_equal(a.images[m], b.images[m])
    np.testing.assert_array_equal(a.label, b.label)
    common = set(a.modalities) & set(c.modalities)
    assert common and any(not np.array_equal(a.images[m], c.images[m]) for m in common)


def test_types_shapes_affine(tumour):
    assert tumour.modalities == MODALITIES
    for img in tumour.images.values():
        assert img.dtype == np.float32 and img.shape == SHAPE and np.isfinite(img).all() and img.min() >= 0
    assert tumour.label.dtype == np.uint8 and tumour.lesion.dtype == np.uint8
    assert np.allclose(np.diag(tumour.affine)[:3], 1.0) and np.abs(tumour.affine[:3, 3]).min() > 0.1
    s = synthesize_study(1, (32, 32, 24), spacing=(1.5, 1.5, 2.0), kind="healthy")
    assert np.allclose(np.diag(s.affine)[:3], (1.5, 1.5, 2.0))


@pytest.mark.parametrize("seed", range(12))
def test_at_least_two_modalities_present(seed):
    s = synthesize_study(seed, (16, 16, 16), missing_prob=0.95)
    assert len(s.modalities) >= 2
    assert list(s.modalities) == [m for m in MODALITIES if m in s.modalities]  # canonical order


def test_missing_modalities_do_not_change_others():
    full = synthesize_study(5, (24, 24, 16), missing_prob=0.0)
    part = synthesize_study(5, (24, 24, 16), missing_prob=0.6)
    assert len(part.modalities) < len(MODALITIES)
    for m in part.modalities:
        np.testing.assert_array_equal(full.images[m], part.images[m])


def test_contrast_orderings(tumour, stroke):
    for s in (tumour, stroke):
        assert _mean(s, "t1", "wm") > _mean(s, "t1", "gm") > _mean(s, "t1", "csf")
        assert _mean(s, "t2", "csf") > _mean(s, "t2", "gm") > _mean(s, "t2", "wm")
        assert _mean(s, "flair", "csf") < _mean(s, "flair", "wm")
        assert _mean(s, "adc", "csf") > _mean(s, "adc", "wm")
        assert _mean(s, "mra", "vessel") > 1.5 * _mean(s, "mra", "wm")
        assert _mean(s, "t1", "skull") < _mean(s, "t1", "wm")
    lesion = stroke.lesion > 0
    assert lesion.sum() > 50
    normal_wm = (stroke.tissue == T["wm"]) & ~lesion
    assert stroke.images["adc"][lesion].mean() < 0.7 * stroke.images["adc"][normal_wm].mean()
    assert stroke.images["dwi"][lesion].mean() > 1.4 * stroke.images["dwi"][normal_wm].mean()
    et = tumour.label == 3
    wm = (tumour.tissue == T["wm"]) & (tumour.label == 0)
    assert tumour.images["t1c"][et].mean() > tumour.images["t1c"][wm].mean()
    assert tumour.images["flair"][tumour.label == 2].mean() > tumour.images["flair"][wm].mean()


def test_tumour_labels(tumour):
    lab = tumour.label
    assert set(np.unique(lab)) <= {0, 1, 2, 3}
    assert {1, 2, 3} <= set(np.unique(lab))
    netc, et = lab == 1, lab == 3
    # the necrotic core is enclosed by the enhancing rim, and the core by oedema-or-rim
    assert not (ndimage.binary_dilation(netc) & ~(netc | et)).any()
    assert not (ndimage.binary_dilation(netc | et) & (lab == 0) & (tumour.tissue == T["wm"])).any() or \
        (lab == 2).sum() > et.sum()
    brain = np.isin(tumour.tissue, [T["csf"], T["gm"], T["wm"], T["vessel"]])
    assert brain[lab > 0].all()
    assert not tumour.lesion.any()


def test_kinds():
    healthy = synthesize_study(2, (24, 24, 16), kind="healthy")
    assert not healthy.label.any() and not healthy.lesion.any() and healthy.class_index == 0
    assert synthesize_study(9, (16, 16, 16)).kind in CLASS_NAMES


@pytest.mark.parametrize("kwargs", [{"kind": "glioma"}, {"shape": (4, 4, 4)}, {"missing_prob": 1.5},
                                    {"spacing": (1, 0, 1)}, {"modalities": ("t1", "t5")}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        synthesize_study(0, **{"shape": (16, 16, 16), **kwargs})


def test_write_dataset(tmp_path):
    out = write_synthetic_dataset(tmp_path / "syn", 3, shape=(24, 24, 16), seed=1, missing_prob=0.5)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["params"]["n_studies"] == 3 and meta["params"]["shape"] == [24, 24, 16]
    rows = (out / "labels.csv").read_text().splitlines()
    assert rows[0] == "study_id,class" and rows[1:] == [f"BraTS-SYN-{i:05d}-000,{k}" for i, k in
                                                        enumerate(CLASS_NAMES)]
    rec = meta["studies"][1]
    s = synthesize_study(rec["seed"], (24, 24, 16), kind=rec["class"], missing_prob=0.5)
    assert list(s.modalities) == rec["modalities"]
    folder = out / rec["study_id"]
    names = sorted(p.name for p in folder.iterdir())
    assert f"{rec['study_id']}-seg.nii.gz" in names
    assert len(names) == len(rec["modalities"]) + 1
    if "t1" in s.images:
        img = nib.load(folder / f"{rec['study_id']}-t1n.nii.gz")
        np.testing.assert_allclose(img.affine, s.affine)
        assert img.get_data_dtype() == np.int16
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.rint(s.images["t1"]))
    seg = nib.load(folder / f"{rec['study_id']}-seg.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(seg.dataobj), s.label)
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    exact = write_synthetic_dataset(tmp_path / "f32", 1, shape=(24, 24, 16), seed=1, image_dtype="float32")
    s0 = synthesize_study(meta["studies"][0]["seed"], (24, 24, 16), kind="healthy", missing_prob=0.2)
    m0 = s0.modalities[0]
    from brainmm.data.datasets import BRATS2023_SUFFIXES

    path = exact / "BraTS-SYN-00000-000" / f"BraTS-SYN-00000-000-{BRATS2023_SUFFIXES[m0]}.nii.gz"
    np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), s0.images[m0])


def test_write_dataset_idempotent_and_guarded(tmp_path):
    out = write_synthetic_dataset(tmp_path, 2, shape=(16, 16, 16), seed=0)
    files = sorted(out.rglob("*.nii.gz"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    write_synthetic_dataset(tmp_path, 2, shape=(16, 16, 16), seed=0)
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_dataset(tmp_path, 2, shape=(16, 16, 16), seed=1)
    write_synthetic_dataset(tmp_path, 1, shape=(16, 16, 16), seed=1, overwrite=True)
    assert len(list(tmp_path.glob("BraTS-SYN-*"))) == 1
