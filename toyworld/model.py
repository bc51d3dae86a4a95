"""The bundled toy model: its sizes, its vocabulary, and saving it in Stable Diffusion's diffusers layout.

The UNet keeps SD 1.x's block types and `layers_per_block=2` (16 cross-attention layers under SD's module
names); only widths shrink. The VAE downsamples by 4 with 8 latent channels (64 px images, 16x16x8 latents) so
that colours, stripes, dots and the 4-px blocks of "pixelated" images survive the latent space: with SD's 4
channels a first VAE kept 53% of colours and 42% of patterns (classifier on its reconstructions). The tokenizer has one token per word of the world's vocabulary and a
32-token context (captions are at most ~16 tokens), which the pipeline reads from the tokenizer, as for SD.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from neti.testing.sd_layout import SD_SCHEDULER_CONFIG, SDShape, build_text_encoder, build_unet
from neti.testing.tokenizer import build_clip_tokenizer
from toyworld.world import vocabulary

logger = logging.getLogger(__name__)

TOY_VAE_CHANNELS = (16, 32, 64)  # the VAE's levels, as in TOY.vae_channels (factor-4 downsampling)
TOY = SDShape(
    unet_channels=(32, 64, 64, 64), unet_head_dim=2, unet_groups=16, text_width=64, text_layers=3, text_heads=4,
    text_ffn=256, vae_channels=TOY_VAE_CHANNELS, vae_groups=8, latent_channels=8, resolution=64, max_tokens=32,
)
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOY_SD_PATH = ASSETS / "toy-sd"


def build_tokenizer(shape: SDShape = TOY, unnamed: bool = False):
    """The world's word-level `CLIPTokenizer` (written to a temporary folder; ship it with `save_pretrained`).
    The generator's has no word for an unnamed attribute; a judge's (`unnamed=True`) has."""
    return build_clip_tokenizer(vocabulary(unnamed), tempfile.mkdtemp(prefix="toy-tokenizer-"),
                                max_length=shape.max_tokens)


def build_vae_toy(shape: SDShape = TOY):
    """The toy `AutoencoderKL`: factor-4 downsampling, one ResNet per level (SD's VAE has two; this one is
    4x cheaper at 64 px and keeps the world's flat colours), widths from `TOY_VAE_CHANNELS`."""
    from diffusers import AutoencoderKL

    n = len(TOY_VAE_CHANNELS)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=TOY_VAE_CHANNELS, layers_per_block=1,
        latent_channels=shape.latent_channels, norm_num_groups=8, sample_size=shape.resolution,
    )


def build_components(shape: SDShape = TOY, seed: int = 0) -> dict:
    """Freshly initialised (seeded) tokenizer, text encoder, UNet and VAE of the toy model."""
    import torch

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(shape)
    return dict(tokenizer=tokenizer, text_encoder=build_text_encoder(shape, len(tokenizer)), unet=build_unet(shape),
                vae=build_vae_toy(shape))


def save_pipeline(folder: str | Path, tokenizer, text_encoder, unet, vae, half: bool = False) -> Path:
    """Write a `StableDiffusionPipeline` folder (`model_index.json` and one subfolder per component)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(SD_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    if half:
        pipe.to(torch.float16)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    logger.info("saved the toy pipeline to %s", folder)
    return folder


__all__ = ["TOY", "TOY_SD_PATH", "ASSETS", "build_tokenizer", "build_vae_toy", "build_components", "save_pipeline"]
