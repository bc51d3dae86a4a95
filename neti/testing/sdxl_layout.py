"""Stable-Diffusion-XL-shaped components built from configs, with random weights (NeTI Sec. 3's layer axis on SDXL).

SDXL's UNet has three levels: a plain `DownBlock2D`, then two `CrossAttnDownBlock2D` with 2 and 10 transformer
blocks per attention (`transformer_layers_per_block=(1, 2, 10)`), a mid block of 10, and the mirrored up path, so
2 x 2 + 2 x 10 + 10 + 3 x 10 + 3 x 2 = 70 cross-attention layers. Its text conditioning has two encoders: CLIP
ViT-L (768 wide, `CLIPTextModel`) and OpenCLIP ViT-bigG (1280 wide, 32 layers, `CLIPTextModelWithProjection`),
whose penultimate hidden states are concatenated (2048 = the UNet's `cross_attention_dim`); the second's projected
end-of-text output (the pooled embedding) enters the time embedding with the size/crop conditioning (`add_time_ids`).

One builder serves the tiny test models (the 70-layer layout at tiny widths, as diffusers' own SDXL tests build
theirs) and the full-size text encoders of the conditioning benchmark (from the published configs).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import sd_layout

# SDXL base's scheduler configuration (scaled-linear betas, epsilon prediction, "leading" spacing).
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, prediction_type="epsilon", timestep_spacing="leading", interpolation_type="linear",
    use_karras_sigmas=False,
)
SDXL_TRANSFORMER_LAYERS = (1, 2, 10)  # transformer blocks per attention at each UNet level (the first is unused)


@dataclass(frozen=True)
class TextShape:
    """One CLIP text encoder's sizes."""

    width: int  # token width
    layers: int
    heads: int
    ffn: int
    act: str  # CLIP ViT-L: "quick_gelu"; OpenCLIP bigG: "gelu"
    projection: int = 0  # the projected pooled output's width (text_encoder_2 only); 0: no projection


@dataclass(frozen=True)
class SDXLShape:
    """The sizes that distinguish a tiny test model from the real SDXL base."""

    unet_channels: tuple[int, ...] = (16, 32, 32)  # block_out_channels of the UNet's 3 levels
    unet_heads: tuple[int, ...] = (2, 2, 4)  # diffusers' `attention_head_dim` (SDXL: heads per level, 5/10/20)
    transformer_layers: tuple[int, ...] = SDXL_TRANSFORMER_LAYERS
    unet_groups: int = 8  # GroupNorm groups in the UNet
    time_embed_dim: int = 8  # `addition_time_embed_dim` (SDXL: 256), one sinusoid per add_time_ids value
    text: TextShape = TextShape(16, 2, 2, 37, "quick_gelu")  # text_encoder (CLIP ViT-L in SDXL)
    text_2: TextShape = TextShape(32, 3, 4, 37, "gelu", projection=32)  # text_encoder_2 (OpenCLIP bigG in SDXL)
    vae_channels: tuple[int, ...] = (32, 64)  # one level per factor 2 of downsampling, after the first
    vae_groups: int = 32
    latent_channels: int = 4
    resolution: int = 32  # image side in pixels
    max_tokens: int = 77


CLIP_L = TextShape(768, 12, 12, 3072, "quick_gelu")
OPENCLIP_BIGG = TextShape(1280, 32, 20, 5120, "gelu", projection=1280)
SDXL = SDXLShape(
    unet_channels=(320, 640, 1280), unet_heads=(5, 10, 20), unet_groups=32, time_embed_dim=256, text=CLIP_L,
    text_2=OPENCLIP_BIGG, vae_channels=(128, 256, 512, 512), vae_groups=32, resolution=1024,
)


def build_unet(shape: SDXLShape):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=shape.resolution // 2 ** (len(shape.vae_channels) - 1),
        in_channels=shape.latent_channels, out_channels=shape.latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=shape.unet_channels, layers_per_block=2, attention_head_dim=shape.unet_heads,
        transformer_layers_per_block=shape.transformer_layers, use_linear_projection=True,
        cross_attention_dim=shape.text.width + shape.text_2.width, norm_num_groups=shape.unet_groups,
        addition_embed_type="text_time", addition_time_embed_dim=shape.time_embed_dim,
        projection_class_embeddings_input_dim=6 * shape.time_embed_dim + shape.text_2.projection,
    )


def build_vae(shape: SDXLShape):
    return sd_layout.build_vae(shape, scaling_factor=0.13025)  # SDXL's VAE: SD's blocks, its own latent scale


def build_text_encoder(text: TextShape, vocab_size: int, max_tokens: int = 77):
    """`CLIPTextModel`, or `CLIPTextModelWithProjection` when `text.projection` is set."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=text.width, intermediate_size=text.ffn, num_hidden_layers=text.layers,
        num_attention_heads=text.heads, max_position_embeddings=max_tokens, hidden_act=text.act,
        projection_dim=text.projection or text.width, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModelWithProjection(config) if text.projection else CLIPTextModel(config)


def build_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)


def build_xl_pipeline(shape: SDXLShape, tokenizer, tokenizer_2=None, seed: int = 0):
    """A `StableDiffusionXLPipeline` with random weights (seeded); `tokenizer_2` defaults to `tokenizer`."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    tokenizer_2 = tokenizer_2 or tokenizer
    torch.manual_seed(seed)
    return StableDiffusionXLPipeline(
        vae=build_vae(shape), text_encoder=build_text_encoder(shape.text, len(tokenizer), shape.max_tokens),
        text_encoder_2=build_text_encoder(shape.text_2, len(tokenizer_2), shape.max_tokens),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=build_unet(shape), scheduler=build_scheduler(),
    )
