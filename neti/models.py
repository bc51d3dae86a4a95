"""Loading base models: a hub id or a local diffusers folder, SD 1.x / 2.x / SDXL, or the bundled toy model.

Everything goes through diffusers' `StableDiffusionPipeline.from_pretrained` (SDXL, as its model_index.json says:
`StableDiffusionXLPipeline`), the same path real Stable Diffusion takes; the token width D and the number of
cross-attention layers are read from the loaded model (NeTI Sec. 3.1).
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
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
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


SD_PIPELINE = "StableDiffusionPipeline"
SDXL_PIPELINE = "StableDiffusionXLPipeline"
PIPELINE_CLASSES = (SD_PIPELINE, SDXL_PIPELINE)  # the base-model families NeTI Studio runs


def is_xl(pipe) -> bool:
    """Whether `pipe` is SDXL-shaped: two text encoders whose penultimate states feed cross-attention, and a
    pooled embedding in the time embedding (docs/sdxl.md)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def token_widths(pipe) -> tuple[int, ...]:
    """The token width of each text encoder whose states feed cross-attention: (D,), or SDXL's (768, 1280)."""
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_xl(pipe) else [])
    return tuple(int(e.config.hidden_size) for e in encoders)


def pipeline_class_name(model: str | os.PathLike) -> str:
    """The pipeline class a model folder (its model_index.json) or hub id names; SD 1.x/2.x when it cannot be
    read (a hub id without the network: the loader's own error then explains)."""
    import json

    local = Path(model).expanduser()
    try:
        if local.exists():
            config = json.loads((local / "model_index.json").read_text())
        else:
            from diffusers import DiffusionPipeline

            config = DiffusionPipeline.load_config(str(model))
    except Exception:  # unreadable or unreachable: fall back to SD, whose loader reports the real problem
        return SD_PIPELINE
    name = str(config.get("_class_name", SD_PIPELINE))
    if name not in PIPELINE_CLASSES:
        raise ValueError(f"base model {str(model)!r} is a {name}; NeTI Studio runs {' and '.join(PIPELINE_CLASSES)} "
                         "models (SD 1.x, SD 2.x, SDXL base)")
    return name


def load_pipeline(model: str | os.PathLike | None = None, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None):
    """A `StableDiffusionPipeline` or, for an SDXL model (its model_index.json names the class), a
    `StableDiffusionXLPipeline`, from a hub id or a local folder, on `device` (auto: cuda, mps, cpu)."""
    import diffusers

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
    class_name = pipeline_class_name(local if local.exists() else model)
    extra = {} if class_name == SDXL_PIPELINE else dict(safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False)
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(str(local) if local.exists() else model, dtype=dtype,
                                                              **extra)
    except Exception as exc:  # hub, network and parsing errors all mean: this model cannot be had here
        if local.exists():
            raise ValueError(f"could not load base model folder {model!r}: {exc}") from None
        reason = f"no local folder by that name, and the model hub did not provide it ({type(exc).__name__})"
        raise ValueError(
            f"could not load base model {model!r}: {reason}. Use a local folder in diffusers layout "
            f"(model_index.json), or the bundled toy model {BUNDLED_MODEL} (the default)"
        ) from None
    if class_name == SDXL_PIPELINE and (pipe.text_encoder is None or pipe.tokenizer is None):
        raise ValueError(f"{model!r} is an SDXL model without its first text encoder (an SDXL refiner?); NeTI needs "
                         "both encoders: load an SDXL base model")
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s (%s) on %s (%s)", model, class_name, device, dtype)
    return pipe.to(device)
