"""Label schemes (BraTS 2021 vs 2023 regions, integer classes) and the segmentation metrics' empty-mask policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from brainmm.adapters.labels import check_label_values, get_label_scheme
from brainmm.adapters.metrics import format_metric_table, region_metrics, summarise


def _label(et: int) -> torch.Tensor:
    """(1, 1, 6, 1, 1): background, NETC, SNFH, ET, ET, SNFH."""
    return torch.tensor([0, 1, 2, et, et, 2]).view(1, 1, 6, 1, 1)


@pytest.mark.parametrize("scheme_name, et", [("brats2021", 4), ("brats2023", 3), ("brats-ped", 3)])
def test_brats_regions(scheme_name, et):
    scheme = get_label_scheme(scheme_name)
    assert scheme.names == ("TC", "WT", "ET") and scheme.sigmoid
    target = scheme.to_target(_label(et))[0, :, :, 0, 0]
    assert target.tolist() == [[0, 1, 0, 1, 1, 0],   # TC = NETC | ET
                               [0, 1, 1, 1, 1, 1],   # WT = everything
                               [0, 0, 0, 1, 1, 0]]   # ET: not empty
    # Regions -> label map gives back the original values.
    assert torch.equal(scheme.masks_to_labels(scheme.to_target(_label(et))).long(), _label(et))


def test_2021_mapping_on_2023_data_is_refused():
    """The official code read BraTS 2023 labels (ET = 3) with the 2021 mapping (ET = 4): its ET channel was empty."""
    wrong = get_label_scheme("brats2021")
    assert wrong.to_target(_label(3))[0, 2].sum() == 0  # what the official mapping produces
    with pytest.raises(ValueError, match="use --labels brats2023"):
        check_label_values([0, 1, 2, 3], wrong, source="BraTS-GLI-00000-000-seg.nii.gz")
    with pytest.raises(ValueError, match="use --labels brats2021"):
        check_label_values([0, 1, 2, 4], get_label_scheme("brats2023"), source="BraTS2021_00000_seg.nii.gz")
    check_label_values([0, 1, 2, 3], get_label_scheme("brats2023"), source="ok")


def test_integer_classes():
    scheme = get_label_scheme("classes:3")
    assert scheme.kind == "classes" and scheme.num_channels == 3 and scheme.foreground_names == ("class1", "class2")
    lab = torch.tensor([0, 1, 2, 2]).view(1, 1, 4, 1, 1)
    onehot = scheme.to_onehot(lab)
    assert onehot.shape == (1, 3, 4, 1, 1) and onehot.sum(1).eq(1).all()
    logits = torch.log(onehot + 1e-3)
    assert torch.equal(scheme.masks_to_labels(scheme.logits_to_masks(logits)).long(), lab)
    assert get_label_scheme("binary").name == "classes:2"
    with pytest.raises(ValueError, match="classes:6"):
        check_label_values([0, 5], scheme, source="x")
    with pytest.raises(ValueError, match="Unknown label scheme 'brats2022'"):
        get_label_scheme("brats2022")


def _cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def test_metrics_empty_mask_policy():
    shape = (20, 20, 10)
    a = _cube(shape, (2, 2, 2), (8, 8, 6))
    b = _cube(shape, (3, 2, 2), (9, 8, 6))  # shifted by one voxel along H
    empty = np.zeros(shape, bool)
    pred = np.stack([a, empty, empty, a])
    ref = np.stack([b, empty, a, empty])
    m = region_metrics(pred, ref, ["overlap", "both_empty", "pred_empty", "ref_empty"], spacing=(2.0, 1.0, 1.0))
    assert m["overlap"]["dice"] == pytest.approx(2 * 5 * 6 * 4 / (2 * 6 * 6 * 4))
    assert m["overlap"]["hd95"] == pytest.approx(2.0)  # one voxel of 2 mm
    assert m["both_empty"] == {"dice": 1.0, "hd95": 0.0}
    assert m["pred_empty"]["dice"] == 0.0 and math.isnan(m["pred_empty"]["hd95"])
    assert m["ref_empty"]["dice"] == 0.0 and math.isnan(m["ref_empty"]["hd95"])
    capped = region_metrics(pred, ref, ["overlap", "both_empty", "pred_empty", "ref_empty"], hd95_empty="max")
    assert capped["pred_empty"]["hd95"] == pytest.approx(math.sqrt(20**2 + 20**2 + 10**2))
    rows = [{"study_id": "s", **{f"dice_{k}": v["dice"] for k, v in m.items()},
             **{f"hd95_{k}": v["hd95"] for k, v in m.items()}}]
    summary = summarise(rows, list(m))
    assert summary["pred_empty"]["hd95_undefined"] == 1 and math.isnan(summary["pred_empty"]["hd95"])
    assert summary["mean"]["hd95"] == pytest.approx(1.0)  # mean over the defined regions (2 mm and 0 mm)
    assert "both_empty" in format_metric_table(summary)
    with pytest.raises(ValueError, match="hd95_empty"):
        region_metrics(pred, ref, list(m), hd95_empty="inf")
