"""Every registered encoder honours the contract: forward, backward, features_only, input checks, save/load."""

from __future__ import annotations

import pytest
import torch

import brainmm
from brainmm.models import Encoder

ALL_MODELS = brainmm.list_models()
# Full-size models are exercised by shape only where cheap; tiny variants carry the heavy checks.
TINY = brainmm.list_models("*_tiny")


def _input(model: Encoder, batch: int = 2, size: int | None = None) -> torch.Tensor:
    s = size or max(32, model.size_divisor)
    return torch.randn(batch, model.in_chans, s, s, s, generator=torch.Generator().manual_seed(0))


def test_registry_lists_the_three_families():
    assert {"mmvp_uniformer", "mmvp_unet", "mmvp_swin"} <= set(ALL_MODELS)
    assert set(TINY) == {"mmvp_uniformer_tiny", "mmvp_unet_tiny", "mmvp_swin_tiny"}
    assert brainmm.list_models("mmvp_u*") == ["mmvp_unet", "mmvp_unet_tiny", "mmvp_uniformer", "mmvp_uniformer_tiny"]
    assert all("." in n for n in brainmm.list_pretrained())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_contract_attributes(name):
    model = brainmm.create_model(name)
    assert isinstance(model, Encoder)
    assert model.num_features == model.feature_info[-1]["num_chs"]
    assert [f["reduction"] for f in model.feature_info] == sorted(f["reduction"] for f in model.feature_info)
    assert model.pretrained_cfg.architecture == name
    assert model.load_report.source == "random initialisation"


@pytest.mark.parametrize("name", TINY)
def test_forward_backward_and_maps(name):
    model = brainmm.create_model(name)
    x = _input(model).requires_grad_()
    maps = model.forward_intermediates(x)
    assert len(maps) == len(model.feature_info)
    for fmap, info in zip(maps, model.feature_info):
        assert fmap.shape[:2] == (2, info["num_chs"])
        assert tuple(fmap.shape[2:]) == tuple(s // info["reduction"] for s in x.shape[2:])
    pooled = model(x)
    assert pooled.shape == (2, model.num_features)
    pooled.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", TINY)
def test_features_only(name):
    net = brainmm.create_model(name, features_only=True, out_indices=(-2, -1))
    x = _input(net.encoder, batch=1)
    maps = net(x)
    assert isinstance(maps, list) and len(maps) == 2
    for fmap, info in zip(maps, net.feature_info):
        assert fmap.shape[1] == info["num_chs"]
        assert x.shape[-1] // fmap.shape[-1] == info["reduction"]
    with pytest.raises(ValueError, match="out of range"):
        brainmm.create_model(name, features_only=True, out_indices=(9,))


@pytest.mark.parametrize("name", TINY)
def test_reconstruction_decoder_restores_input_size(name):
    model = brainmm.create_model(name)
    x = _input(model, batch=1)
    recon = model.build_reconstruction_decoder()(model.forward_features(x))
    assert recon.shape == (1, 1, *x.shape[2:])


@pytest.mark.parametrize("name", TINY)
def test_input_checks(name):
    model = brainmm.create_model(name)
    s = model.size_divisor
    with pytest.raises(ValueError, match="5-D input"):
        model(torch.zeros(1, s, s, s))
    with pytest.raises(ValueError, match="input channel"):
        model(torch.zeros(1, 3, s, s, s))
    with pytest.raises(ValueError, match=f"multiple of {s}"):
        model(torch.zeros(1, 1, s, s, s + 1))


@pytest.mark.parametrize("name", TINY)
def test_save_load_round_trip(name, tmp_path):
    model = brainmm.create_model(name, modalities=["t1", "flair"]).eval()
    brainmm.save_pretrained(model, tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "config.json", "README.md"}
    loaded = brainmm.create_model(f"local-dir:{tmp_path / 'm'}").eval()
    assert loaded.pretrained_cfg.modalities == ("t1", "flair")
    assert loaded.load_report.initialised == [] and not loaded.load_report.adapted
    x = _input(model, batch=1)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_unknown_names_suggest_close_matches():
    with pytest.raises(ValueError, match="Did you mean 'mmvp_swin'"):
        brainmm.create_model("mmvp_swn")
    with pytest.raises(ValueError, match=r"Valid tags: 'mmvp_swin.brainmvp'"):
        brainmm.create_model("mmvp_swin.nosuchtag")
    with pytest.raises(ValueError, match="Did you mean 'mmvp_unet.brainmvp'"):
        brainmm.get_pretrained_cfg("mmvp_unet.brainmvq")


def test_explicit_kwargs_win_over_config(tmp_path):
    model = brainmm.create_model("mmvp_uniformer_tiny", drop_path_rate=0.1, dims=(16, 32, 64, 96))
    assert model.num_features == 96
    brainmm.save_pretrained(model, tmp_path / "m")
    with pytest.raises(ValueError, match="do not fit"):
        brainmm.create_model(f"local-dir:{tmp_path / 'm'}", dims=(16, 32, 64, 128))


def test_modalities_by_alias_and_unknown_modality():
    model = brainmm.create_model("mmvp_unet_tiny", modalities=["T1w", "t1ce", "t2f", "ADC"])
    assert model.pretrained_cfg.modalities == ("t1", "t1c", "flair", "adc")
    assert model.in_chans == 4
    with pytest.raises(ValueError, match="Known modalities: flair, t1, t1c, t2, mra, pd, dwi, adc"):
        brainmm.create_model("mmvp_unet_tiny", modalities=["t1", "spect"])
    with pytest.raises(ValueError, match="more than once"):
        brainmm.create_model("mmvp_unet_tiny", modalities=["t1c", "t1ce"])
    with pytest.raises(ValueError, match="contradicts"):
        brainmm.create_model("mmvp_unet_tiny", modalities=["t1"], in_chans=2)


@pytest.mark.parametrize("name", TINY)
def test_stem_from_single_channel_weights(name, tmp_path):
    """A C-channel stem is derived from the 1-channel pre-trained stem (copy / C), never random; the rest is
    copied; the report says so."""
    src = brainmm.create_model(name).eval()
    brainmm.save_pretrained(src, tmp_path / "src")
    dst = brainmm.create_model(f"local-dir:{tmp_path / 'src'}", modalities=["t1", "t1c", "t2"]).eval()
    key = src.stem_key
    assert dst.load_report.adapted == {key: dst.load_report.adapted[key]} and "1 -> 3" in dst.load_report.adapted[key]
    assert torch.allclose(dst.state_dict()[key], src.state_dict()[key].repeat(1, 3, 1, 1, 1) / 3)
    assert len(dst.load_report.copied) == len(src.state_dict()) - 1
    x = _input(src, batch=1)
    with torch.no_grad():
        assert torch.allclose(src(x), dst(x.repeat(1, 3, 1, 1, 1)), atol=1e-5)


def test_stem_by_modality_name(tmp_path):
    src = brainmm.create_model("mmvp_unet_tiny", modalities=["t1", "t2"])
    brainmm.save_pretrained(src, tmp_path / "src")
    dst = brainmm.create_model(f"local-dir:{tmp_path / 'src'}", modalities=["t2", "flair", "t1"])
    w_src, w_dst = src.state_dict()["conv1a.weight"], dst.state_dict()["conv1a.weight"]
    scale = 2 / 3
    assert torch.allclose(w_dst[:, 0], w_src[:, 1] * scale)  # t2 <- t2
    assert torch.allclose(w_dst[:, 1], w_src.mean(1) * scale)  # flair: unseen -> mean
    assert torch.allclose(w_dst[:, 2], w_src[:, 0] * scale)  # t1 <- t1
    assert "t2<-t2, flair<-mean, t1<-t1" in dst.load_report.adapted["conv1a.weight"]


def test_swin_state_dict_is_monai_swinunetr():
    from monai.networks.nets import SwinUNETR

    model = brainmm.create_model("mmvp_swin", in_chans=4).eval()
    ref = SwinUNETR(in_channels=4, out_channels=3, feature_size=48).eval()
    ref.swinViT.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 4, 64, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.forward_intermediates(x)
        theirs = ref.swinViT(x, True)
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_strict_false_reports_missing_and_ignored(tmp_path):
    from safetensors.torch import load_file, save_file

    model = brainmm.create_model("mmvp_unet_tiny")
    brainmm.save_pretrained(model, tmp_path / "m")
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    sd.pop("conv4d.conv2.bias")
    sd["extra.tensor"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match="missing from the weights"):
        brainmm.create_model(f"local-dir:{tmp_path / 'm'}")
    loaded = brainmm.create_model(f"local-dir:{tmp_path / 'm'}", strict=False)
    assert loaded.load_report.initialised == ["conv4d.conv2.bias"]
    assert loaded.load_report.ignored == ["extra.tensor"]


@pytest.mark.parametrize("name", TINY)
def test_activation_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = brainmm.create_model(name)
    x = _input(model, batch=2)
    model(x).square().sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for a, p in zip(ref, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_uniformer_stage_layout_is_chosen_per_device():
    # the layout picks the depthwise kernels: channels-last on the CPU (oneDNN, 2x faster), contiguous on the GPU
    # unless the model is made channels-last (a permute once left channels-last strides everywhere unasked)
    from brainmm.models.uniformer import PatchEmbed

    model = brainmm.create_model("mmvp_uniformer_tiny").eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 1, 32, 32, 32))
        embed = PatchEmbed(4, 8)
        x = torch.randn(2, 4, 8, 8, 8)
        out = embed(x)
        if torch.cuda.is_available():
            gpu = embed.cuda()(x.cuda())
            assert gpu.is_contiguous()
            assert embed.to(memory_format=torch.channels_last_3d)(x.cuda()).is_contiguous(
                memory_format=torch.channels_last_3d)
    assert all(m.is_contiguous(memory_format=torch.channels_last_3d) for m in maps[:3])
    assert out.is_contiguous(memory_format=torch.channels_last_3d) and not out.is_contiguous()
    assert torch.allclose(out, embed.cpu().to(memory_format=torch.contiguous_format)(x), atol=1e-6)
