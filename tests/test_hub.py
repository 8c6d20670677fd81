"""Hub path without network: a real huggingface_hub cache layout built in a temp dir, loaded offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import brainmm
from brainmm import hub
from brainmm.models import _registry

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def _put_in_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> None:
    """Lay ``folder`` out exactly as huggingface_hub does: blobs by hash, snapshot symlinks, refs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", digest))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture()
def two_revisions(tmp_path) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """A cache holding org/tiny-swin at two commits: main -> B, tag v1 -> A."""
    cache = tmp_path / "hf-cache"
    torch.manual_seed(0)
    old = brainmm.create_model("mmvp_swin_tiny").eval()
    torch.manual_seed(1)
    new = brainmm.create_model("mmvp_swin_tiny").eval()
    brainmm.save_pretrained(old, tmp_path / "old")
    brainmm.save_pretrained(new, tmp_path / "new")
    _put_in_cache(cache, "org/tiny-swin", tmp_path / "old", COMMIT_A, refs=("v1",))
    _put_in_cache(cache, "org/tiny-swin", tmp_path / "new", COMMIT_B, refs=("main",))
    return cache, old, new


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_hf_hub_name_loads_offline_from_cache(two_revisions, offline):
    cache, old, new = two_revisions
    model = brainmm.create_model("hf-hub:org/tiny-swin", cache_dir=cache).eval()
    assert _same(model, new)
    assert model.load_report.source == "hf-hub:org/tiny-swin"


def test_revisions_by_name_suffix_argument_and_commit(two_revisions, offline):
    cache, old, new = two_revisions
    assert _same(brainmm.create_model("hf-hub:org/tiny-swin@v1", cache_dir=cache).eval(), old)
    assert _same(brainmm.create_model("hf-hub:org/tiny-swin", revision="v1", cache_dir=cache).eval(), old)
    assert _same(brainmm.create_model(f"hf-hub:org/tiny-swin@{COMMIT_A}", cache_dir=cache).eval(), old)


def test_registered_tag_resolves_through_hf_hub_download(two_revisions, offline, monkeypatch):
    cache, old, new = two_revisions
    cfg = brainmm.get_pretrained_cfg("mmvp_swin_tiny").replace(tag="test", hf_hub_id="org/tiny-swin",
                                                               hf_hub_revision="v1", status="published")
    monkeypatch.setitem(_registry._pretrained_cfgs, "mmvp_swin_tiny", {"": cfg.replace(tag=""), "test": cfg})
    assert "mmvp_swin_tiny.test" in brainmm.list_pretrained()
    model = brainmm.create_model("mmvp_swin_tiny.test", pretrained=True, cache_dir=cache).eval()
    assert _same(model, old)  # the registry pins revision v1
    model = brainmm.create_model("mmvp_swin_tiny.test", pretrained=True, cache_dir=cache, revision="main").eval()
    assert _same(model, new)  # an explicit revision wins


def test_sha256_is_verified(two_revisions, offline, monkeypatch):
    cache, _, _ = two_revisions
    cfg = brainmm.get_pretrained_cfg("mmvp_swin_tiny").replace(tag="pinned", hf_hub_id="org/tiny-swin",
                                                               sha256="0" * 64)
    monkeypatch.setitem(_registry._pretrained_cfgs, "mmvp_swin_tiny", {"pinned": cfg})
    with pytest.raises(hub.ChecksumError, match="sha256"):
        brainmm.create_model("mmvp_swin_tiny.pinned", pretrained=True, cache_dir=cache)


def test_missing_weight_offline_names_repo_file_and_fix(tmp_path, offline):
    with pytest.raises(hub.WeightsNotFoundError) as info:
        brainmm.create_model("hf-hub:org/absent", cache_dir=tmp_path)
    msg = str(info.value)
    assert "org/absent" in msg and "config.json" in msg
    assert "HF_HUB_OFFLINE" in msg and "brainmm download" in msg and "checkpoint_path=" in msg


def test_planned_weight_explains_how_to_get_it(tmp_path, offline):
    with pytest.raises(hub.WeightsNotFoundError, match="not published on the Hub yet.*convert-official"):
        brainmm.create_model("mmvp_unet.brainmvp", pretrained=True, cache_dir=tmp_path)


def test_bad_hub_and_local_names(tmp_path):
    with pytest.raises(ValueError, match="hf-hub:org/repo"):
        brainmm.create_model("hf-hub:just-a-name")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        brainmm.create_model(f"local-dir:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        brainmm.create_model(f"local-dir:{tmp_path / 'empty'}")


def test_pickle_only_folder_is_refused(tmp_path):
    model = brainmm.create_model("mmvp_unet_tiny")
    brainmm.save_pretrained(model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never loads pickle"):
        brainmm.create_model(f"local-dir:{tmp_path / 'm'}")
    with pytest.raises(ValueError, match="only safetensors"):
        brainmm.create_model("mmvp_unet_tiny", checkpoint_path=tmp_path / "m" / "pytorch_model.bin")


def test_checkpoint_path_file_and_folder(tmp_path):
    model = brainmm.create_model("mmvp_uniformer_tiny").eval()
    brainmm.save_pretrained(model, tmp_path / "m")
    by_file = brainmm.create_model("mmvp_uniformer_tiny", checkpoint_path=tmp_path / "m" / "model.safetensors")
    by_dir = brainmm.create_model("mmvp_uniformer_tiny", checkpoint_path=tmp_path / "m")
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(by_file.eval()(x), model(x)) and torch.equal(by_dir.eval()(x), model(x))


def test_config_json_schema_and_card(tmp_path):
    model = brainmm.create_model("mmvp_uniformer_tiny", modalities=["t1", "t2"])
    templates = {"t1": torch.rand(8, 8, 8) * 5 - 1, "FLAIR": torch.rand(8, 8, 8)}
    brainmm.save_pretrained(model, tmp_path / "m", templates=templates, decoder=model.build_reconstruction_decoder())
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["library"] == "brainmm" and config["architecture"] == "mmvp_uniformer_tiny"
    assert config["model_args"]["in_chans"] == 2 and config["model_args"]["dims"] == [16, 32, 64, 128]
    pc = config["pretrained_cfg"]
    for key in ("modalities", "input_size", "spacing", "orientation", "intensity", "license", "citation"):
        assert key in pc
    assert pc["modalities"] == ["t1", "t2"]
    assert config["contents"]["templates"] == ["t1", "flair"] and config["contents"]["decoder"] is True
    assert config["provenance"]["sha256"] == hub.sha256_file(tmp_path / "m" / "model.safetensors")
    card = (tmp_path / "m" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "brainmm" and front["license"] == "apache-2.0"
    assert "t1, t2" in card and config["provenance"]["sha256"] in card
    # templates come back normalised, decoder loads strictly
    loaded = brainmm.load_templates(tmp_path / "m")
    assert list(loaded) == ["flair", "t1"]
    assert float(loaded["t1"].min()) == 0.0 and abs(float(loaded["t1"].max()) - 1.0) < 1e-3
    decoder = brainmm.load_decoder(tmp_path / "m")
    assert decoder(torch.zeros(1, 128, 2, 2, 2)).shape == (1, 1, 32, 32, 32)


def test_existing_card_is_never_overwritten(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "README.md").write_text("my own card")
    brainmm.save_pretrained(brainmm.create_model("mmvp_unet_tiny"), tmp_path / "m")
    assert (tmp_path / "m" / "README.md").read_text() == "my own card"
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.endswith(".tmp")]


def test_push_to_hub_uploads_the_saved_folder_in_one_commit(tmp_path, monkeypatch):
    """No network: a stand-in HfApi records the calls; the folder it receives is a real saved brainmm folder."""
    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            files = sorted(os.listdir(folder_path))
            reloaded = brainmm.create_model(f"local-dir:{folder_path}")
            calls.append(("upload_folder", repo_id, files, kwargs, type(reloaded).__name__))

            class Info:
                commit_url = f"https://example.invalid/{repo_id}/commit/1"

            return Info()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    url = brainmm.push_to_hub(brainmm.create_model("mmvp_unet_tiny"), "me/tiny", revision="dev", private=True)
    assert url.endswith("/commit/1")
    assert calls[0] == ("create_repo", "me/tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1][0] == "upload_folder" and len(calls) == 2  # one commit
    assert calls[1][2] == ["README.md", "config.json", "model.safetensors"]
    assert calls[1][3]["revision"] == "dev" and calls[1][4] == "UNetEncoder"


def test_register_local_makes_a_tag_loadable_offline(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("BRAINMM_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(_registry._pretrained_cfgs, "mmvp_unet_tiny",
                        dict(_registry._pretrained_cfgs["mmvp_unet_tiny"]))
    model = brainmm.create_model("mmvp_unet_tiny").eval()
    brainmm.save_pretrained(model, tmp_path / "w")
    _registry.register_local(tmp_path / "w", "mmvp_unet_tiny.mine")
    assert "mmvp_unet_tiny.mine" in brainmm.list_pretrained()
    loaded = brainmm.create_model("mmvp_unet_tiny.mine", pretrained=True).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    recorded = json.loads((tmp_path / "home" / "local_registry.json").read_text())
    assert recorded == {"mmvp_unet_tiny.mine": str((tmp_path / "w").resolve())}
    with pytest.raises(ValueError, match="not 'mmvp_swin'"):
        _registry.register_local(tmp_path / "w", "mmvp_swin.mine")


def test_hub_repo_with_only_pickle_weights_is_refused(tmp_path, offline):
    """A cached repo that offers pytorch_model.bin but no model.safetensors: refused, pointing to the converters."""
    folder = tmp_path / "pickle-only"
    folder.mkdir()
    torch.save(brainmm.create_model("mmvp_unet_tiny").state_dict(), folder / "pytorch_model.bin")
    model = brainmm.create_model("mmvp_unet_tiny")
    brainmm.save_pretrained(model, tmp_path / "full")
    (folder / "config.json").write_bytes((tmp_path / "full" / "config.json").read_bytes())
    _put_in_cache(tmp_path / "cache", "org/pickled", folder, COMMIT_A)
    with pytest.raises(hub.WeightsNotFoundError, match="only pickle weights.*convert-official"):
        brainmm.create_model("hf-hub:org/pickled", cache_dir=tmp_path / "cache")


def test_download_command_uses_the_cache(two_revisions, offline, capsys):
    from brainmm.cli import main

    cache, _, _ = two_revisions
    assert main(["download", "hf-hub:org/tiny-swin@v1", "--cache-dir", str(cache)]) == 0
    assert f"snapshots/{COMMIT_A}" in capsys.readouterr().out
    assert main(["download", "hf-hub:org/other", "--cache-dir", str(cache)]) == 1
    assert "org/other" in capsys.readouterr().err
