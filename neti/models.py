"""Loading base models: a hub id or a local diffusers folder, SD 1.x / 2.x, or the bundled toy model.

Everything goes through diffusers' `StableDiffusionPipeline.from_pretrained`, the same path real Stable Diffusion
takes; the token width D and the number of cross-attention layers are read from the loaded model (NeTI Sec. 3.1).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .paths import BUNDLED_MODEL, REPO_ROOT

logger = logging.getLogger(__name__)


def default_model() -> str:
    """The base model used when none is named: $NETI_MODEL, else the bundled toy model."""
    return os.environ.get("NETI_MODEL", str(BUNDLED_MODEL))


def model_label(model: str | os.PathLike | None) -> str:
    """How a base model is named in concept files and PNG settings: hub ids and outside folders as given, folders
    inside this repository (the bundled model) relative to it, so a file made on one machine reads the same on
    another rather than carrying that machine's absolute path."""
    if model is None or str(model) == "":
        return ""
    path = Path(model).expanduser()
    if path.exists():
        try:
            return path.resolve().relative_to(REPO_ROOT).as_posix()
        except ValueError:
            return str(path.resolve())
    return str(model)


@torch.no_grad()
def weights_fingerprint(pipe, samples: int = 256) -> str:
    """A short hash of the pipeline's UNet, VAE and text-encoder weights: every tensor's name, shape, dtype and
    `samples` evenly spaced values (exact bytes, gathered where the weights live and copied once), so that caches
    keyed by a model's name notice weights retrained or replaced behind the same name."""
    import hashlib

    digest, picked = hashlib.sha256(), []
    for part in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, part, None)
        for name, tensor in (module.state_dict().items() if module is not None else ()):
            flat = tensor.reshape(-1)
            index = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device).long()
            picked.append(flat[index].float())
            digest.update(f"{part}.{name}{tuple(tensor.shape)}{tensor.dtype};".encode())
    if picked:
        digest.update(torch.cat(picked).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return default_device()
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not understood; use 'auto', 'cpu', 'cuda', 'cuda:1' or 'mps'") from None


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (as SD is usually run), fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_pipeline(model: str | os.PathLike | None = None, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None):
    """A `StableDiffusionPipeline` from a hub id or a local folder, on `device` (auto: cuda, mps, cpu)."""
    from diffusers import StableDiffusionPipeline

    model = str(model) if model is not None else default_model()
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    local = Path(model).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise ValueError(
            f"{model!r} is not a diffusers model folder (no model_index.json); give a folder saved with "
            f"`save_pretrained`, a hub id such as 'runwayml/stable-diffusion-v1-5', or the bundled model "
            f"{BUNDLED_MODEL}"
        )
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local) if local.exists() else model, dtype=dtype, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
    except Exception as exc:  # hub, network and parsing errors all mean: this model cannot be had here
        if local.exists():
            raise ValueError(f"could not load base model folder {model!r}: {exc}") from None
        reason = f"no local folder by that name, and the model hub did not provide it ({type(exc).__name__})"
        raise ValueError(
            f"could not load base model {model!r}: {reason}. Use a local folder in diffusers layout "
            f"(model_index.json), or the bundled toy model {BUNDLED_MODEL} (the default)"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s on %s (%s)", model, device, dtype)
    return pipe.to(device)
