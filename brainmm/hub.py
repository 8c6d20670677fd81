"""Hub I/O: ``hf-hub:`` / ``local-dir:`` names, downloads through the huggingface_hub cache, ``save_pretrained``,
``push_to_hub`` and the ``config.json`` schema.

A brainmm folder (local or a Hub repo) holds:
- ``model.safetensors``: the network's tensors; optional ``templates.<modality>`` (learned modality templates,
  min-max normalised, atlas grid) and ``decoder.*`` (the pre-training reconstruction decoder);
- ``config.json``: ``{"library": "brainmm", "format_version", "model_type", "architecture", "model_args",
  "pretrained_cfg", "contents", "provenance"}``;
- ``README.md``: the model card.
Only safetensors are ever read from a folder or the Hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
TEMPLATES_PNG = "templates.png"  # axial mid-slices of the learned templates, shown on the model card
FORMAT_VERSION = 1
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "checkpoint.pt", "model_swinvit.pt")


class WeightsNotFoundError(FileNotFoundError):
    """A weight file is neither in the local cache nor reachable."""


class ChecksumError(ValueError):
    """A weight file's sha256 differs from the one recorded in the registry."""


@dataclass(frozen=True)
class HubLocation:
    """Where a brainmm folder lives: a Hub repo (with optional revision) or a local directory."""

    repo_id: str | None = None
    revision: str | None = None
    local_dir: Path | None = None

    @property
    def display(self) -> str:
        if self.local_dir is not None:
            return f"local-dir:{self.local_dir}"
        return f"hf-hub:{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def parse_location(name: str) -> HubLocation | None:
    """``hf-hub:org/repo[@rev]`` or ``local-dir:PATH`` -> HubLocation; anything else -> None."""
    if name.startswith(HF_HUB_PREFIX):
        spec = name[len(HF_HUB_PREFIX):]
        repo_id, _, revision = spec.partition("@")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"Bad Hub name {name!r}: expected 'hf-hub:org/repo' or 'hf-hub:org/repo@revision'.")
        return HubLocation(repo_id=repo_id, revision=revision or None)
    if name.startswith(LOCAL_DIR_PREFIX):
        path = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"local-dir {str(path)!r} does not exist or is not a directory.")
        return HubLocation(local_dir=path)
    return None


def is_offline() -> bool:
    """HF_HUB_OFFLINE, read at call time (huggingface_hub reads it only once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return env in {"1", "true", "yes", "on"} or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def download_file(repo_id: str, filename: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
                  name_for_help: str | None = None) -> Path:
    """Fetch one file of a Hub repo through the huggingface_hub cache (offline-aware) and return its local path."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    if not filename.endswith((".safetensors", ".json", ".md", ".png")):
        raise ValueError(f"brainmm only downloads safetensors weights and metadata, not {filename!r}.")
    offline = is_offline()
    try:
        path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=offline)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, EntryNotFoundError, OSError) as err:
        where = f"{repo_id}" + (f"@{revision}" if revision else "")
        fixes = [
            "go online (unset HF_HUB_OFFLINE)" if offline else "check the network connection and the repo id",
            f"run `brainmm download {name_for_help or 'hf-hub:' + repo_id}` on a machine with access and copy the "
            "Hugging Face cache",
            "or pass checkpoint_path= to a local model.safetensors",
        ]
        reason = "not in the local cache and HF_HUB_OFFLINE is set" if offline else f"{type(err).__name__}: {err}"
        if filename == WEIGHTS_NAME:
            # Only ask the Hub for a listing when it answered (the file is missing), not when it is unreachable.
            reachable = isinstance(err, EntryNotFoundError) and not offline
            pickles = _pickle_files(repo_id, revision=revision, cache_dir=cache_dir, list_remote=reachable)
            if pickles:
                raise WeightsNotFoundError(
                    f"Hub repo {repo_id!r} offers only pickle weights {pickles}, no {WEIGHTS_NAME}. brainmm never "
                    "loads pickle files from the Hub: download the checkpoint yourself and convert it with "
                    "`brainmm convert-official` (BrainMVP) or `brainmm convert-monai-swin` (MONAI SwinUNETR)."
                ) from err
        raise WeightsNotFoundError(
            f"Could not get {filename!r} of Hub repo {where!r}"
            f"{' (cache ' + str(cache_dir) + ')' if cache_dir else ''}: {reason}. To fix: {'; '.join(fixes)}."
        ) from err
    return Path(path)


def _pickle_files(repo_id: str, *, revision: str | None, cache_dir: str | Path | None,
                  list_remote: bool) -> list[str]:
    """Pickle weight files a repo offers: from the local cache, and from the repo listing when online."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    for name in PICKLE_NAMES:
        hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
        if isinstance(hit, str):
            found.append(name)
    if not found and list_remote:
        try:
            from huggingface_hub import HfApi

            files = HfApi().list_repo_files(repo_id, revision=revision)
        except Exception:  # noqa: BLE001  (best effort: the caller raises the original error anyway)
            files = []
        found = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    return found


def resolve_file(loc: HubLocation, filename: str, *, cache_dir: str | Path | None = None,
                 name_for_help: str | None = None) -> Path:
    """The local path of ``filename`` in a folder or Hub repo."""
    if loc.local_dir is not None:
        path = loc.local_dir / filename
        if not path.is_file():
            pickles = [p.name for p in loc.local_dir.glob("*") if p.name in PICKLE_NAMES or p.suffix in {".pt", ".pth"}]
            hint = (f" It holds pickle checkpoint(s) {pickles}: brainmm never loads pickle files; convert them with "
                    "`brainmm convert-official`." if pickles and filename == WEIGHTS_NAME else "")
            raise WeightsNotFoundError(f"{str(path)!r} not found in local-dir {str(loc.local_dir)!r}.{hint}")
        return path
    assert loc.repo_id is not None
    return download_file(loc.repo_id, filename, revision=loc.revision, cache_dir=cache_dir,
                         name_for_help=name_for_help)


def read_config(loc: HubLocation, *, cache_dir: str | Path | None = None) -> dict[str, Any]:
    path = resolve_file(loc, CONFIG_NAME, cache_dir=cache_dir)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} ({loc.display}) is not valid JSON: {err}.") from err
    if not isinstance(config, dict) or "architecture" not in config:
        raise ValueError(f"{str(path)!r} ({loc.display}) is not a brainmm config: it has no 'architecture' key.")
    return config


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str | None, *, name: str) -> None:
    if not expected:
        return
    got = sha256_file(path)
    if got != expected.lower():
        raise ChecksumError(
            f"sha256 of {str(path)!r} for {name!r} is {got}, but the registry records {expected}. The file is "
            "corrupt or not the published weight: delete it from the cache and download it again."
        )


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file on the CPU; anything else is refused with a pointer to the converters."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"Weight file {str(path)!r} does not exist.")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{str(path)!r} is not a .safetensors file. brainmm loads only safetensors (no pickle); convert official "
            "BrainMVP checkpoints with `brainmm convert-official IN.pt OUT_DIR --arch ...`."
        )
    return load_file(str(path), device="cpu")


def split_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Split a brainmm weight file into (network, templates by modality, decoder)."""
    net, templates, decoder = {}, {}, {}
    for k, v in sd.items():
        if k.startswith("templates."):
            templates[k[len("templates."):]] = v
        elif k.startswith("decoder."):
            decoder[k[len("decoder."):]] = v
        else:
            net[k] = v
    return net, templates, decoder


def normalise_template(t: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation of a whole template, as BrainMVP applies it at each use.

    ``(T - min) / (max - min + 1e-9)``."""
    t = t.float()
    return (t - t.min()) / (t.max() - t.min() + 1e-9)


def _atomic_write_bytes(path: Path, write: Any) -> None:
    """Write via a temp file in the same folder and os.replace, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared/non-contiguous storage: give it private contiguous copies.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    _atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {}))


def git_commit() -> str | None:
    """The brainmm source commit when running from a git checkout (provenance), else None."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def build_config(model: torch.nn.Module, *, model_type: str = "encoder", contents: dict[str, Any] | None = None,
                 provenance: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from . import __version__

    cfg = model.pretrained_cfg
    arch = getattr(model, "architecture", None) or cfg.architecture
    model_args = dict(getattr(model, "model_args", {}))
    model_args["in_chans"] = model.in_chans
    return {
        "library": "brainmm",
        "format_version": FORMAT_VERSION,
        "model_type": model_type,
        "architecture": arch,
        "model_args": model_args,
        "pretrained_cfg": cfg.to_dict(),
        "contents": contents or {},
        "provenance": {"brainmm_version": __version__, "git_commit": git_commit(), **(provenance or {})},
        **(extra or {}),
    }


def save_pretrained(model: torch.nn.Module, directory: str | Path, *, templates: dict[str, torch.Tensor] | None = None,
                    decoder: torch.nn.Module | None = None, model_type: str = "encoder",
                    provenance: dict[str, Any] | None = None, card: dict[str, Any] | None = None,
                    template_dtype: torch.dtype = torch.float16, extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors``, ``config.json`` and (unless one exists) a ``README.md`` card into ``directory``.

    ``templates`` (modality -> atlas-grid tensor) are stored min-max normalised as ``templates.<modality>`` (in
    ``template_dtype``: float16 halves the 8 x 240 x 240 x 155 atlas volumes; values in [0, 1] keep 3 digits);
    ``decoder`` (the pre-training reconstruction decoder) as ``decoder.*``. ``card`` holds extra fields for the model
    card template (see ``brainmm.cards``). Returns the directory.
    """
    from .data.modalities import canonical_modality

    own_type = getattr(model, "model_type", "encoder")
    if model_type == "encoder" and own_type != "encoder" and templates is None and decoder is None:
        # Task adapters (brainmm.adapters) write their heads' config and their templates themselves; this makes
        # brainmm.save_pretrained(seg_model, dir) and push_to_hub(seg_model, repo) work like for encoders.
        return model.save_pretrained(directory, card=card, provenance=provenance)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = dict(model.state_dict())
    template_names: list[str] = []
    for mod, t in (templates or {}).items():
        name = canonical_modality(mod, argument="templates key")
        tensors[f"templates.{name}"] = normalise_template(t).to(template_dtype)
        template_names.append(name)
    if decoder is not None:
        tensors.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    contents = {"templates": template_names, "decoder": decoder is not None}
    if decoder is not None:
        contents["decoder_class"] = type(decoder).__name__
    config = build_config(model, model_type=model_type, contents=contents, provenance=provenance, extra=extra_config)
    weights = directory / WEIGHTS_NAME
    write_safetensors(weights, tensors, metadata={"format": "pt", "library": "brainmm",
                                                  "architecture": str(config["architecture"])})
    config["provenance"]["sha256"] = sha256_file(weights)
    write_json(directory / CONFIG_NAME, config)
    if template_names:
        from .visualize import save_templates_png

        save_templates_png({m: tensors[f"templates.{m}"] for m in template_names}, directory / TEMPLATES_PNG)
    card_path = directory / CARD_NAME
    if card_path.exists():
        logger.info("Keeping the existing model card %s (never overwritten).", card_path)
    else:
        from .cards import render_card

        facts = {"num_params": sum(p.numel() for p in model.parameters()), "directory": str(directory),
                 "feature_info": getattr(model, "feature_info", None),
                 "size_divisor": getattr(model, "size_divisor", "the model's total stride"),
                 "num_features": getattr(model, "num_features", "-")}
        text = render_card(config, **{**facts, **(card or {})})
        _atomic_write_bytes(card_path, lambda tmp: Path(tmp).write_text(text))
    logger.info("Saved %s (%s) to %s", config["architecture"], model_type, directory)
    return directory


def push_to_hub(model: torch.nn.Module, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                token: str | None = None, commit_message: str | None = None, **save_kwargs: Any) -> str:
    """Save ``model`` into a temporary folder and upload it to ``repo_id`` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="brainmm-push-") as tmp:
        save_pretrained(model, tmp, **save_kwargs)
        return upload_folder(tmp, repo_id, revision=revision, token=token, commit_message=commit_message, api=api)


def upload_folder(folder: str | Path, repo_id: str, *, revision: str | None = None, token: str | None = None,
                  commit_message: str | None = None, api: Any = None) -> str:
    """Upload a saved brainmm folder in one commit (refuses folders holding pickle files)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    bad = sorted(p.name for p in folder.iterdir() if p.suffix in {".pt", ".pth", ".bin", ".ckpt", ".pkl"})
    if bad:
        raise ValueError(f"Refusing to upload pickle files {bad} from {str(folder)!r}: publish safetensors only.")
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a brainmm folder (needs {WEIGHTS_NAME} and {CONFIG_NAME}).")
    api = api or HfApi(token=token)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                             commit_message=commit_message or f"Upload brainmm weights to {repo_id}")
    return str(getattr(info, "commit_url", info))
