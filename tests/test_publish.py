"""hub/publish.py: dry-run publishing builds a verified folder with golden tensors; tampering is caught."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import brainmm

ROOT = Path(__file__).resolve().parents[1]


def _publish_module():
    spec = importlib.util.spec_from_file_location("brainmm_hub_publish", ROOT / "hub" / "publish.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


publish = _publish_module()


@pytest.fixture()
def source_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    model = brainmm.create_model("mmvp_uniformer_tiny")
    templates = {m: torch.rand(16, 16, 16) for m in brainmm.MODALITIES}
    return brainmm.save_pretrained(model, tmp_path / "export", templates=templates,
                                   decoder=model.build_reconstruction_decoder())


def _config(tmp_path: Path, source_dir: Path, **extra) -> Path:
    cfg = {"name": "mmvp_uniformer_tiny.demo", "repo_id": "me/tiny-demo", "revision": "v1",
           "source": {"kind": "folder", "path": str(source_dir)}, "license": "cc-by-4.0",
           "description": "A demo weight.", "data": "24 phantoms", "datasets": ["me/phantoms"],
           "metrics": {"Dice (demo)": 0.5}, "golden_size": 32}
    cfg.update(extra)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dry_run_builds_a_verified_folder(source_folder, tmp_path, capsys):
    config = _config(tmp_path, source_folder)
    assert publish.main([str(config), "--out", str(tmp_path / "build")]) == 0
    out = capsys.readouterr().out
    assert "Would upload to me/tiny-demo@v1 in one commit" in out
    assert 'hf_hub_revision="v1"' in out and "sha256=" in out
    folder = tmp_path / "build"
    names = {p.name for p in folder.iterdir()}
    assert names == {"model.safetensors", "config.json", "README.md", "templates.png", "golden.safetensors"}
    config_json = json.loads((folder / "config.json").read_text())
    pc = config_json["pretrained_cfg"]
    assert pc["hf_hub_id"] == "me/tiny-demo" and pc["tag"] == "demo" and pc["status"] == "published"
    assert pc["license"] == "cc-by-4.0" and pc["metrics"] == {"Dice (demo)": 0.5}
    assert pc["sha256"] == config_json["provenance"]["sha256"]
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "brainmm" and front["license"] == "cc-by-4.0"
    assert front["datasets"] == ["me/phantoms"] and "brainmm" in front["tags"]
    assert 'create_model("hf-hub:me/tiny-demo")' in card and "![Learned modality templates" in card
    assert "| Dice (demo) | 0.5 |" in card and config_json["provenance"]["sha256"] in card
    golden = load_file(str(folder / "golden.safetensors"))
    assert golden["input"].shape == (1, 1, 32, 32, 32) and golden["pooled"].shape == (1, 128)
    assert publish.verify_folder(folder) == []


def test_verification_catches_tampering(source_folder, tmp_path):
    config = _config(tmp_path, source_folder)
    folder, _ = publish.publish(config, out_dir=tmp_path / "build")
    golden = load_file(str(folder / "golden.safetensors"))
    golden["pooled"] = golden["pooled"] + 1
    save_file(golden, str(folder / "golden.safetensors"))
    assert any("golden pooled" in p for p in publish.verify_folder(folder))
    (folder / "pytorch_model.bin").write_bytes(b"x")
    assert any("pickle" in p for p in publish.verify_folder(folder))
    (folder / "pytorch_model.bin").unlink()
    weights = load_file(str(folder / "model.safetensors"))
    weights["norm.bias"] = weights["norm.bias"] + 0.1
    save_file(weights, str(folder / "model.safetensors"))
    problems = publish.verify_folder(folder)
    assert any("sha256" in p for p in problems)


def test_push_uploads_once_after_verification(source_folder, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(brainmm.hub, "upload_folder", lambda folder, repo_id, **kw: calls.append((folder, repo_id, kw))
                        or "https://example.invalid/commit/abc")
    folder, url = publish.publish(_config(tmp_path, source_folder), out_dir=tmp_path / "b", push=True)
    assert url.endswith("/commit/abc") and len(calls) == 1
    assert calls[0][1] == "me/tiny-demo" and calls[0][2]["revision"] == "v1"


def test_bad_configs_are_named(tmp_path, source_folder):
    with pytest.raises(ValueError, match="source.kind"):
        publish.WeightConfig.from_yaml(_config(tmp_path, source_folder, source={"kind": "zip", "path": "."}))
    with pytest.raises(ValueError, match="unknown key"):
        publish.WeightConfig.from_yaml(_config(tmp_path, source_folder, licence="mit"))
    with pytest.raises(ValueError, match="unknown architecture 'mmvp_nope'"):
        publish.WeightConfig.from_yaml(_config(tmp_path, source_folder, name="mmvp_nope.x"))
    assert publish.main([str(tmp_path / "missing.yaml")]) == 1


def test_published_configs_in_the_repo_parse():
    for path in sorted((ROOT / "hub" / "weights").glob("*.yaml")):
        cfg = publish.WeightConfig.from_yaml(path)
        assert cfg.name == path.stem and cfg.name in brainmm.list_pretrained()
        assert brainmm.get_pretrained_cfg(cfg.name).hf_hub_id == cfg.repo_id
