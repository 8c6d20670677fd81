"""Manifest readers (BraTS 2021/2023, BIDS, BrainMVP json, CSV/JSON tables) and auto-detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from brainmm.data.datasets import (
    Study,
    discover_studies,
    from_bids,
    from_brainmvp_json,
    from_brats_folder,
    from_table,
    modality_from_filename,
)


def touch(path: Path) -> Path:
    # The readers only parse names; empty files are enough.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def make_brats2021(root: Path, ids=("00001", "00000")) -> Path:
    for i in ids:
        sid = f"BraTS2021_{i}"
        for suffix in ("flair", "t1", "t1ce", "t2", "seg"):
            touch(root / sid / f"{sid}_{suffix}.nii.gz")
    return root


def make_brats2023(root: Path) -> Path:
    for sid, suffixes in {"BraTS-GLI-00000-000": ("t1n", "t1c", "t2w", "t2f", "seg"),
                          "BraTS-SYN-00003-000": ("t1n", "mra", "pd", "dwi", "adc")}.items():
        for suffix in suffixes:
            touch(root / sid / f"{sid}-{suffix}.nii.gz")
    return root


def test_brats2021(tmp_path):
    studies = from_brats_folder(make_brats2021(tmp_path))
    assert [s.study_id for s in studies] == ["BraTS2021_00000", "BraTS2021_00001"]
    s = studies[0]
    assert s.modalities == ("flair", "t1", "t1c", "t2")
    assert s.images["t1c"].name == "BraTS2021_00000_t1ce.nii.gz"
    assert s.label.name == "BraTS2021_00000_seg.nii.gz" and s.class_label is None


def test_brats2023_extra_suffixes_and_classes(tmp_path):
    make_brats2023(tmp_path)
    (tmp_path / "labels.csv").write_text("study_id,class\nBraTS-SYN-00003-000,stroke\nunknown,x\n")
    touch(tmp_path / "BraTS-GLI-00000-000" / ".BraTS-GLI-00000-000-t1n.tmp123.nii.gz")  # partial write: ignored
    (tmp_path / "BraTS-GLI-00000-000" / "notes.txt").write_text("not an image")
    a, b = from_brats_folder(tmp_path)
    assert a.modalities == ("flair", "t1", "t1c", "t2") and a.label is not None and a.class_label is None
    assert b.modalities == ("t1", "mra", "pd", "dwi", "adc") and b.label is None and b.class_label == "stroke"


def test_brats_nested_and_unknown_suffix(tmp_path):
    make_brats2021(tmp_path / "TrainingData", ids=("00002",))
    assert [s.study_id for s in from_brats_folder(tmp_path)] == ["BraTS2021_00002"]
    touch(tmp_path / "TrainingData" / "BraTS2021_00002" / "BraTS2021_00002_t5.nii.gz")
    with pytest.raises(ValueError, match=r"Unknown modality suffix 't5'.*BraTS2021_00002_t5\.nii\.gz.*Allowed"):
        from_brats_folder(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="No BraTS studies"):
        from_brats_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="No BraTS studies"):
        discover_studies(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_studies(tmp_path / "nope")


def test_bids_with_and_without_sessions(tmp_path):
    touch(tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    touch(tmp_path / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz")
    touch(tmp_path / "sub-01" / "anat" / "sub-01_ce-gadolinium_T1w.nii.gz")
    touch(tmp_path / "sub-01" / "anat" / "sub-01_T2starw.nii.gz")  # unsupported contrast: skipped
    touch(tmp_path / "sub-01" / "dwi" / "sub-01_dwi.nii.gz")
    touch(tmp_path / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T2w.nii.gz")
    touch(tmp_path / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_PDw.nii.gz")
    touch(tmp_path / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_angio.nii.gz")
    touch(tmp_path / "derivatives" / "x" / "sub-01_T1w.nii.gz")
    studies = from_bids(tmp_path)
    assert [s.study_id for s in studies] == ["sub-01", "sub-02_ses-1", "sub-02_ses-2"]
    assert studies[0].modalities == ("flair", "t1", "t1c", "dwi")
    assert studies[1].modalities == ("t2", "pd") and studies[2].modalities == ("mra",)
    assert [s.study_id for s in discover_studies(tmp_path)] == [s.study_id for s in studies]


def test_brainmvp_json(tmp_path):
    entries = [
        {"image": ["IXI/IXI002-Guys-0828-T1.nii.gz", "IXI/IXI002-Guys-0828-T2.nii.gz",
                   "IXI/IXI002-Guys-0828-MRA.nii.gz", "IXI/IXI002-Guys-0828-PD.nii.gz"]},
        {"image": ["/abs/UCSF-PDGM-0004_T1c_bias.nii.gz", "/abs/UCSF-PDGM-0004_ADC.nii.gz",
                   "/abs/UCSF-PDGM-0004_DWI_bias.nii.gz"], "label": "/abs/UCSF-PDGM-0004_tumor_segmentation.nii.gz"},
        {"image": ["b/x1.nii.gz", "b/x2.nii.gz"], "modality": ["FLAIR", "T1"], "id": "case-b"},
    ]
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"training": entries}))
    studies = from_brainmvp_json(path)
    by_id = {s.study_id: s for s in studies}
    assert [s.study_id for s in studies] == sorted(by_id) == ["IXI002-Guys-0828", "UCSF-PDGM-0004", "case-b"]
    ixi = by_id["IXI002-Guys-0828"]
    assert ixi.modalities == ("t1", "t2", "mra", "pd")
    assert ixi.images["t1"] == tmp_path / "IXI" / "IXI002-Guys-0828-T1.nii.gz"  # relative to the json's folder
    assert by_id["UCSF-PDGM-0004"].modalities == ("t1c", "dwi", "adc")
    assert by_id["UCSF-PDGM-0004"].label == Path("/abs/UCSF-PDGM-0004_tumor_segmentation.nii.gz")
    assert by_id["case-b"].images["flair"].name == "x1.nii.gz"
    root = tmp_path / "data"
    assert from_brainmvp_json(path, data_root=root)[0].images["t1"].parent == root / "IXI"
    assert [s.study_id for s in discover_studies(path)] == [s.study_id for s in studies]
    # a plain list works too
    path.write_text(json.dumps(entries[:1]))
    assert len(from_brainmvp_json(path)) == 1


def test_brainmvp_json_unknown_modality(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"image": ["a/scan_0001.nii.gz", "a/scan_t1.nii.gz"]}]))
    with pytest.raises(ValueError, match="cannot infer the modality of scan_0001.nii.gz"):
        from_brainmvp_json(path)


def test_csv_table_relative_paths(tmp_path):
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "studies.csv"
    path.write_text("study_id,T1w,t1ce,FLAIR,label,class,age\n"
                    "b,img/b_t1.nii.gz,,img/b_flair.nii.gz,img/b_seg.nii.gz,tumour,50\n"
                    "a,/abs/a_t1.nii.gz,/abs/a_t1c.nii.gz,,,healthy,40\n")
    a, b = from_table(path)
    assert a.study_id == "a" and a.modalities == ("t1", "t1c") and a.label is None and a.class_label == "healthy"
    assert b.modalities == ("flair", "t1") and b.images["t1"] == tmp_path / "m" / "img" / "b_t1.nii.gz"
    assert b.label == tmp_path / "m" / "img" / "b_seg.nii.gz" and b.class_label == "tumour"
    assert [s.study_id for s in discover_studies(path)] == ["a", "b"]


def test_json_table_and_errors(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"study_id": "s1", "t2": "x.nii.gz", "adc": "y.nii.gz"}]))
    (s,) = discover_studies(path)
    assert s.modalities == ("t2", "adc") and s.images["t2"] == tmp_path / "x.nii.gz"
    bad = tmp_path / "bad.csv"
    bad.write_text("name,t1\nx,a.nii.gz\n")
    with pytest.raises(ValueError, match="'study_id' column"):
        from_table(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text("study_id,t1\nx,a.nii.gz\nx,b.nii.gz\n")
    with pytest.raises(ValueError, match="occurs twice"):
        from_table(dup)
    with pytest.raises(ValueError, match="expected a directory"):
        discover_studies(touch(tmp_path / "x.txt"))


def test_study_canonicalises():
    s = Study("x", {"T2w": "b.nii.gz", "t1ce": "a.nii.gz"})
    assert s.modalities == ("t1c", "t2") and isinstance(s.images["t2"], Path)
    assert s.to_dict() == {"study_id": "x", "t1c": "a.nii.gz", "t2": "b.nii.gz"}
    with pytest.raises(ValueError, match="two files for modality 't1c'"):
        Study("x", {"t1c": "a", "t1ce": "b"})
    with pytest.raises(ValueError, match="Unknown modality"):
        Study("x", {"t7": "a"})
    with pytest.raises(ValueError, match="no images"):
        Study("x", {})


@pytest.mark.parametrize("name,expected", [
    ("BraTS2021_00000_t1ce.nii.gz", "t1c"), ("BraTS-GLI-00000-000-t2f.nii.gz", "flair"),
    ("IXI002-Guys-0828-MRA.nii.gz", "mra"), ("UCSF-PDGM-0004_FLAIR_bias.nii.gz", "flair"),
    ("case_t1_gd.nii", "t1c"), ("sub-01_T2w.nii.gz", "t2"), ("x_seg.nii.gz", None),
])
def test_modality_from_filename(name, expected):
    assert modality_from_filename(name) == expected


# ------------------------------------------------------------------------------------------------- check_studies


def _nifti(path: Path, data, affine=None) -> Path:
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


def test_check_studies_catches_problems(tmp_path):
    import numpy as np

    from brainmm.data.check import check_studies

    rng = np.random.default_rng(0)
    vol = rng.random((20, 20, 12)).astype(np.float32)

    def study(sid, **files):
        return Study(sid, {m: _nifti(tmp_path / f"{sid}_{m}.nii.gz", d, a) for m, (d, a) in files.items()})

    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    nan = vol.copy()
    nan[1, 2, 3] = np.nan
    unreadable = tmp_path / "broken_t2.nii.gz"
    unreadable.write_bytes(b"not a nifti file")
    seg = _nifti(tmp_path / "good_seg.nii.gz", np.zeros((20, 20, 10), np.uint8))
    studies = [
        study("good", t1=(vol, None), t2=(vol * 2, None)),
        study("shape", t1=(vol, None), t2=(vol[:, :, :10], None)),
        study("affine", t1=(vol, None), flair=(vol, shifted)),
        study("nan", t1=(nan, None), t2=(vol, None)),
        study("empty", t1=(vol, None), adc=(np.zeros_like(vol), None)),
        study("fourd", t1=(vol, None), dwi=(np.stack([vol, vol], -1), None)),
        Study("unreadable", {"t1": tmp_path / "good_t1.nii.gz", "t2": unreadable}),
        Study("missing", {"t1": tmp_path / "nope_t1.nii.gz"}),
        Study("badlabel", {"t1": tmp_path / "good_t1.nii.gz"}, label=seg, class_label="healthy"),
    ]
    report = check_studies(studies, crop_size=(16, 16, 16))
    assert not report.ok
    by_study = {s.study_id: [p for p in report.problems if p.startswith(s.study_id + ":")] for s in studies}
    assert by_study["good"] == []
    assert "shape (20, 20, 10) differs from t1 (20, 20, 12)" in by_study["shape"][0]
    assert "t1 " in by_study["affine"][0] and "affine differs from flair by up to 0.5" in by_study["affine"][0]
    assert "1 non-finite values" in by_study["nan"][0]
    assert "empty volume" in by_study["empty"][0] and "adc" in by_study["empty"][0]
    assert "4-D image of shape (20, 20, 12, 2)" in by_study["fourd"][0]
    assert "unreadable by nibabel" in by_study["unreadable"][0] and "broken_t2.nii.gz" in by_study["unreadable"][0]
    assert "file not found" in by_study["missing"][0]
    assert "label" in by_study["badlabel"][0] and "shape (20, 20, 10)" in by_study["badlabel"][0]
    # every volume is 12 voxels deep: smaller than the crop, fixed by atlas padding -> warning only
    assert any(w.startswith("good:") and "zero padding" in w for w in report.warnings)
    assert report.modality_counts["t1"] == 9 and report.modality_counts["pd"] == 0
    table = report.format_table()
    assert "FAILED" in table and "t1" in table and "problems: " in table and "healthy 1" in table
    ok = check_studies(studies[:1], crop_size=(8, 8, 8), num_workers=2)
    assert ok.ok and not ok.warnings and ok.format_table().endswith("OK")
    assert not check_studies(studies[:1], crop_size=(300, 8, 8)).ok  # crop larger than the atlas grid


def test_check_synthetic_dataset_is_clean(tmp_path):
    from brainmm.data.check import check_studies
    from brainmm.data.synthetic import write_synthetic_dataset

    studies = discover_studies(write_synthetic_dataset(tmp_path, 3, shape=(24, 24, 16)))
    report = check_studies(studies, crop_size=(16, 16, 16))
    assert report.ok and not report.warnings and report.n_labels == 3, report.format_table()
    assert report.class_counts == {"healthy": 1, "tumour": 1, "stroke": 1}
