"""Preprocessed cache (build/load/staleness/atomicity/DDP split) and the pre-training crop dataset."""

from __future__ import annotations

import json
import threading

import nibabel as nib
import numpy as np
import pytest
import torch

from brainmm.data.cache import MultiModalCropDataset, PreprocessedCache
from brainmm.data.datasets import discover_studies
from brainmm.data.modalities import MODALITIES
from brainmm.data.synthetic import write_synthetic_dataset
from brainmm.data.transforms import build_preprocessing

ATLAS = (40, 40, 32)
CROP = (16, 16, 16)
# The phantoms have a Rician-noise background; a threshold on the scaled intensity gives a real foreground box.
PARAMS = {"atlas_size": ATLAS, "foreground_threshold": 0.25}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn"), 4, shape=(36, 36, 24), seed=3, missing_prob=0.4)


@pytest.fixture()
def studies(data_dir):
    return discover_studies(data_dir)


def test_build_then_load_matches_direct_preprocessing(tmp_path, studies):
    cache = PreprocessedCache(tmp_path / "c", PARAMS)
    stats = cache.build(studies)
    assert (stats.built, stats.reused) == (len(studies), 0)
    pipe = build_preprocessing(PARAMS)
    for s in studies:
        arr, meta = cache.load(s.study_id)
        assert isinstance(arr, np.memmap) and arr.dtype == np.float16 and arr.shape[0] == len(s.modalities)
        assert meta["modalities"] == list(s.modalities) and meta["study_id"] == s.study_id
        assert tuple(arr.shape[1:]) <= ATLAS
        direct = pipe(s)["image"].numpy()
        full, _ = cache.load_atlas(s)
        assert full.shape == direct.shape
        np.testing.assert_allclose(full, direct, atol=1e-3)  # float16 of values in [0, 1]
        assert meta["original_shape"] == [36, 36, 24]
        np.testing.assert_allclose(meta["original_affine"], nib.load(s.images[s.modalities[0]]).affine)
    # a new cache object (another process) finds entries by study id
    other = PreprocessedCache(tmp_path / "c", PARAMS)
    assert other.study_ids() == sorted(s.study_id for s in studies)
    np.testing.assert_array_equal(other.load(studies[0].study_id)[0], cache.load(studies[0])[0])


def test_second_build_reuses_and_stale_entry_is_rebuilt(tmp_path, studies):
    cache = PreprocessedCache(tmp_path, PARAMS)
    cache.build(studies)
    files = sorted(tmp_path.glob("*.npy"))
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    stats = cache.build(studies)
    assert (stats.built, stats.reused) == (0, len(studies))
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    # change one source file (new content, newer mtime): only that entry is rebuilt
    s = studies[1]
    mod = s.modalities[0]
    img = nib.load(s.images[mod])
    changed = np.asanyarray(img.dataobj)[::-1].copy()
    nib.save(nib.Nifti1Image(changed, img.affine), s.images[mod])
    assert not cache.is_fresh(s)
    stats = PreprocessedCache(tmp_path, PARAMS).build(studies)
    assert (stats.built, stats.reused) == (1, len(studies) - 1)
    np.testing.assert_allclose(cache.load_atlas(s)[0], build_preprocessing(PARAMS)(s)["image"].numpy(), atol=1e-3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert len(list(tmp_path.glob("*.json"))) == len(studies)


def test_entry_names_deterministic_and_param_dependent(tmp_path, studies):
    a = PreprocessedCache(tmp_path, PARAMS)
    b = PreprocessedCache(tmp_path, PARAMS)
    c = PreprocessedCache(tmp_path, {**PARAMS, "spacing": (2.0, 2.0, 2.0)})
    s = studies[0]
    assert a.entry_name(s) == b.entry_name(s) != c.entry_name(s)
    assert a.entry_name(s).startswith(s.study_id + "-")


def test_label_cache_and_workers(tmp_path, studies):
    cache = PreprocessedCache(tmp_path, PARAMS, with_label=True)
    stats = cache.build(studies, num_workers=2)
    assert stats.built == len(studies)
    pipe = build_preprocessing(PARAMS, with_label=True)
    s = studies[1]  # the tumour study (kinds cycle healthy, tumour, stroke)
    label = cache.load_label(s)
    meta = cache.load_meta(s)
    assert label.dtype == np.uint8 and label.shape == tuple(meta["shape"][1:])
    from brainmm.data.transforms import paste_into_atlas

    full = paste_into_atlas(np.asarray(label)[None], meta["atlas_offset"], ATLAS)[0]
    np.testing.assert_array_equal(full, pipe(s)["label"][0].numpy().astype(np.uint8))
    assert set(np.unique(full)) >= {0, 3}


def test_distributed_build_splits_work(tmp_path, studies):
    results = {}

    def run(rank):
        results[rank] = PreprocessedCache(tmp_path, PARAMS).build(studies, rank=rank, world_size=2, timeout=60,
                                                                  poll_interval=0.05)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0].built == results[1].built == len(studies) // 2
    assert results[0].waited == results[1].waited == len(studies) // 2
    owners = sorted(json.loads(p.read_text())["study_id"] for p in tmp_path.glob("*.json"))
    assert owners == sorted(s.study_id for s in studies)


def test_wait_ready_times_out(tmp_path, studies):
    cache = PreprocessedCache(tmp_path, PARAMS)
    with pytest.raises(TimeoutError, match=r"still missing .*rank 1"):
        cache.build(studies, rank=0, world_size=2, timeout=0.2, poll_interval=0.05)


def test_errors(tmp_path, studies):
    cache = PreprocessedCache(tmp_path, PARAMS)
    with pytest.raises(FileNotFoundError, match="run cache.build"):
        cache.load("nope")
    with pytest.raises(ValueError, match="rank"):
        cache.build(studies, rank=2, world_size=2)
    with pytest.raises(ValueError, match="atlas_size"):
        PreprocessedCache(tmp_path, {"atlas_size": None})


# ------------------------------------------------------------------------------------------------- crop dataset


@pytest.fixture()
def built(tmp_path, studies):
    cache = PreprocessedCache(tmp_path, PARAMS)
    cache.build(studies)
    return cache


def test_crop_sample_contents(built, studies):
    ds = MultiModalCropDataset(built, studies, CROP, seed=1, samples_per_study=2)
    assert len(ds) == 2 * len(studies)
    for i in range(len(ds)):
        s = studies[i // 2]
        x = ds[i]
        assert x["study_id"] == s.study_id
        assert x["image"].shape == (len(MODALITIES), *CROP) and x["image"].dtype == torch.float32
        assert x["present"].tolist() == [m in s.images for m in MODALITIES]
        assert not x["image"][~x["present"]].any()
        assert x["image"][x["present"]].abs().sum() > 0
        o = x["origin"]
        assert o.dtype == torch.int64 and (o >= 0).all()
        assert all(int(o[k]) + CROP[k] <= ATLAS[k] for k in range(3))
        # the crop is exactly the atlas-grid window at `origin`
        full, meta = built.load_atlas(s)
        win = full[(slice(None), *(slice(int(o[k]), int(o[k]) + CROP[k]) for k in range(3)))]
        idx = [MODALITIES.index(m) for m in meta["modalities"]]
        np.testing.assert_array_equal(x["image"][idx].numpy(), win)


def test_crops_deterministic_per_epoch(built, studies):
    a = MultiModalCropDataset(built, studies, CROP, seed=5)
    b = MultiModalCropDataset(PreprocessedCache(built.root, PARAMS), [s.study_id for s in studies], CROP, seed=5)
    assert torch.equal(a[2]["image"], b[2]["image"]) and torch.equal(a[2]["origin"], b[2]["origin"])
    origins0 = [a[i]["origin"] for i in range(len(a))]
    a.set_epoch(1)
    origins1 = [a[i]["origin"] for i in range(len(a))]
    assert any(not torch.equal(p, q) for p, q in zip(origins0, origins1, strict=True))
    a.set_epoch(0)
    assert all(torch.equal(a[i]["origin"], origins0[i]) for i in range(len(a)))
    # independent of the loader's worker count: a DataLoader with workers gives the same batches
    loader = torch.utils.data.DataLoader(a, batch_size=2, num_workers=2)
    batch = next(iter(loader))
    assert torch.equal(batch["origin"][1], origins0[1]) and batch["study_id"][0] == studies[0].study_id


def test_crop_full_atlas_origin_is_crop_start(tmp_path, studies):
    # without a foreground crop and with an atlas equal to the volume, the cache box is the whole atlas grid
    params = {"atlas_size": (36, 36, 24), "foreground_crop": False}
    cache = PreprocessedCache(tmp_path, params)
    cache.build(studies[:1])
    meta = cache.load_meta(studies[0])
    assert meta["atlas_offset"] == [0, 0, 0] and meta["shape"][1:] == [36, 36, 24]
    ds = MultiModalCropDataset(cache, studies[:1], CROP)
    x = ds[0]
    arr, _ = cache.load(studies[0])
    o = x["origin"].tolist()
    first = MODALITIES.index(meta["modalities"][0])
    np.testing.assert_array_equal(x["image"][first].numpy(),
                                  arr[0, o[0]:o[0] + 16, o[1]:o[1] + 16, o[2]:o[2] + 16].astype(np.float32))
    with pytest.raises(ValueError, match="exceeds the atlas grid"):
        MultiModalCropDataset(cache, studies[:1], (48, 16, 16))
