"""Stable-Diffusion-1.x-shaped components built from configs, with random weights (NeTI Sec. 3's layer axis).

One builder serves four sizes: the tiny pipelines of the test suite, the bundled toy model, and the full-size
SD 1.5 and SD 2.1 shapes of the benchmarks (from the published configs). The UNet always has SD's block types and
`layers_per_block=2`, so it has SD's 16 cross-attention layers under SD's module names (NeTI paper, Sec. 3: the
space axis of P*).
"""

from __future__ import annotations

from dataclasses import dataclass

# SD 1.5's scheduler configuration (scaled-linear betas, epsilon prediction).
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon", skip_prk_steps=True, clip_sample=False,
)


@dataclass(frozen=True)
class SDShape:
    """The sizes that distinguish a tiny test model from the real SD 1.5."""

    unet_channels: tuple[int, ...] = (32, 32, 64, 64)  # block_out_channels of the UNet's 4 levels
    unet_head_dim: int | tuple[int, ...] = 2  # diffusers' `attention_head_dim` (SD 1.x: 8 heads; SD 2.x: per level)
    linear_projection: bool = False  # SD 2.x: the transformer blocks' in/out projections are Linear, not 1x1 convs
    unet_groups: int = 8  # GroupNorm groups in the UNet
    text_width: int = 32  # token width D = cross_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 37
    text_act: str = "quick_gelu"  # SD 1.x's CLIP ViT-L; SD 2.x's OpenCLIP ViT-H uses "gelu"
    vae_channels: tuple[int, ...] = (32, 64)  # one level per factor 2 of downsampling, after the first
    vae_groups: int = 32
    latent_channels: int = 4
    resolution: int = 32  # image side in pixels
    max_tokens: int = 77
    prediction_type: str = "epsilon"  # SD 2.1 (768 px): "v_prediction"
    vocab_size: int | None = None  # text-encoder rows; None: the tokenizer's size (CLIP's real one is 49,408)


SD15 = SDShape(
    unet_channels=(320, 640, 1280, 1280), unet_head_dim=8, unet_groups=32, text_width=768, text_layers=12,
    text_heads=12, text_ffn=3072, vae_channels=(128, 256, 512, 512), vae_groups=32, resolution=512,
)
CLIP_VOCAB_SIZE = 49408  # OpenAI CLIP's BPE vocabulary, shared by SD 1.x and SD 2.x
SD21 = SDShape(
    unet_channels=(320, 640, 1280, 1280), unet_head_dim=(5, 10, 20, 20), linear_projection=True, unet_groups=32,
    text_width=1024, text_layers=23, text_heads=16, text_ffn=4096, text_act="gelu",
    vae_channels=(128, 256, 512, 512), vae_groups=32, resolution=768, prediction_type="v_prediction",
)


def build_unet(shape: SDShape):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=shape.resolution // 2 ** (len(shape.vae_channels) - 1),
        in_channels=shape.latent_channels, out_channels=shape.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=shape.unet_channels, layers_per_block=2, attention_head_dim=shape.unet_head_dim,
        cross_attention_dim=shape.text_width, norm_num_groups=shape.unet_groups,
        use_linear_projection=shape.linear_projection,
    )


def build_vae(shape: SDShape, **config):
    """SD's `AutoencoderKL` at `shape`'s widths (any shape with `vae_channels`, `vae_groups`, `latent_channels`
    and `resolution`, SDXL's too); `config` overrides, e.g. SDXL's `scaling_factor`."""
    from diffusers import AutoencoderKL

    n = len(shape.vae_channels)
    return AutoencoderKL(**{
        **dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
               up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=shape.vae_channels, layers_per_block=2,
               latent_channels=shape.latent_channels, norm_num_groups=shape.vae_groups,
               sample_size=shape.resolution),
        **config})


def build_text_encoder(shape: SDShape, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=shape.text_width, intermediate_size=shape.text_ffn,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
        max_position_embeddings=shape.max_tokens, hidden_act=shape.text_act, projection_dim=shape.text_width,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def build_scheduler(prediction_type: str = "epsilon"):
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config({**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type})


def build_pipeline(shape: SDShape, tokenizer, seed: int = 0):
    """A `StableDiffusionPipeline` with random weights (seeded) around `tokenizer`."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    return StableDiffusionPipeline(
        vae=build_vae(shape), text_encoder=build_text_encoder(shape, shape.vocab_size or len(tokenizer)),
        tokenizer=tokenizer, unet=build_unet(shape), scheduler=build_scheduler(shape.prediction_type),
        safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
