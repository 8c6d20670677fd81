"""Numerical parity with the official BrainMVP networks, through the official-checkpoint converter."""

from __future__ import annotations

import pytest
import torch

import brainmm
from brainmm.convert import convert_official, convert_state_dict, load_official_checkpoint

from .conftest import official_state_dict

FIXTURE_ARCH = {"mmvp_uniformer": "uniformer", "mmvp_unet": "unet"}


@pytest.fixture(scope="module")
def converted(official_checkpoints, tmp_path_factory) -> dict[str, str]:
    out = {}
    for arch, ckpt in official_checkpoints.items():
        folder = tmp_path_factory.mktemp(arch)
        convert_official(ckpt, folder, arch=arch)
        out[arch] = str(folder)
    return out


def _compare(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    if actual.shape != expected.shape and actual.numel() > 65536:  # large feature maps are stored subsampled
        actual = actual[:, :, ::2, ::2, ::2]
    assert actual.shape == expected.shape, what
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual - expected).abs().max() / scale
    assert err < rtol, f"{what}: max error {err:.2e} of the reference's max magnitude"


@pytest.mark.parametrize("arch", ["mmvp_uniformer", "mmvp_unet"])
def test_official_features_and_reconstruction(arch, converted, reference_outputs):
    fx = FIXTURE_ARCH[arch]
    model = brainmm.create_model(f"local-dir:{converted[arch]}").eval()
    assert model.load_report.initialised == [] and model.load_report.ignored == []
    decoder = brainmm.load_decoder(f"local-dir:{converted[arch]}", model).eval()
    x = reference_outputs["input"]
    with torch.no_grad():
        maps = model.forward_intermediates(x)
        recon = decoder(maps[-1])
    assert len(maps) == 4
    for i, fmap in enumerate(maps, start=1):
        _compare(fmap, reference_outputs[f"{fx}.features.{i}"], f"{arch} stage {i}")
        _compare(fmap.mean(dim=(2, 3, 4)), reference_outputs[f"{fx}.features.{i}.channel_mean"], f"{arch} mean {i}")
        assert fmap.shape[1] == model.feature_info[i - 1]["num_chs"]
        assert x.shape[-1] // fmap.shape[-1] == model.feature_info[i - 1]["reduction"]
    _compare(recon, reference_outputs[f"{fx}.reconstruction"], f"{arch} reconstruction")


def test_uniformer_has_official_parameter_count():
    model = brainmm.create_model("mmvp_uniformer")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 22.04e6) < 0.1e6, n  # the paper's 22.04 M


@pytest.mark.parametrize("arch", ["mmvp_uniformer", "mmvp_unet"])
def test_converter_maps_every_key(arch, official_checkpoints):
    sd, meta = load_official_checkpoint(official_checkpoints[arch])
    assert not any(k.startswith("module.") for k in sd)
    res = convert_state_dict(sd, arch)
    assert res.unmapped == []
    assert sorted(res.templates) == sorted(brainmm.MODALITIES)
    model = brainmm.create_model(arch)
    assert set(res.encoder) == set(model.state_dict())
    decoder = model.build_reconstruction_decoder()
    assert set(res.decoder) == set(decoder.state_dict())
    accounted = len(res.encoder) + len(res.decoder) + len(res.dropped) + 1  # + rep_template
    assert accounted == len(sd)
    if arch == "mmvp_uniformer":
        assert meta["current_epoch"] == 1500
        assert res.dropped and all("conv_block" in k or "proj1" in k for k in res.dropped)


def test_converted_templates_are_normalised_official_templates(converted):
    raw = official_state_dict("uniformer")["rep_template"]
    templates = brainmm.load_templates(converted["mmvp_uniformer"])
    assert list(templates) == list(brainmm.MODALITIES)
    for i, m in enumerate(brainmm.MODALITIES):
        t = templates[m]
        assert t.shape == (240, 240, 155)
        expected = (raw[i] - raw[i].min()) / (raw[i].max() - raw[i].min() + 1e-9)
        assert torch.allclose(t, expected, atol=1e-3)  # stored as float16


def test_converter_rejects_unknown_keys(tmp_path):
    sd = official_state_dict("unet")
    sd["mystery.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="mystery.weight"):
        convert_official(tmp_path / "bad.pt", tmp_path / "out", arch="mmvp_unet")


def test_converter_rejects_missing_file_and_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_official_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_official_checkpoint(tmp_path / "junk.pt")


def test_multichannel_stem_from_official_weights(converted, reference_outputs):
    """A 4-modality encoder built from the 1-channel official stem gives the official features when every channel
    carries the same image (kernel copied and divided by 4)."""
    model = brainmm.create_model(f"local-dir:{converted['mmvp_uniformer']}", modalities=["t1", "t1ce", "t2", "flair"])
    model.eval()
    assert "1 -> 4 channels" in model.load_report.adapted["patch_embed1.proj.weight"]
    x = reference_outputs["input"].repeat(1, 4, 1, 1, 1)
    with torch.no_grad():
        last = model.forward_features(x)
    _compare(last, reference_outputs["uniformer.features.4"], "4-channel stem", rtol=1e-3)
