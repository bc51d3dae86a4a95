"""Denoising with P* concepts on diffusers' own `StableDiffusionXLPipeline` (NeTI Sec. 3-5 on SDXL).

The pipeline runs unchanged, as on SD 1.x: the cross-attention processors read each layer's keys and values from
the packed `prompt_embeds` (attention.py), and the `callback_on_step_end` hook hands the UNet the next timestep's
per-layer encodings (`prompt_embeds`) and, since SDXL's pooled embedding follows t (conditioning_xl.py), the next
timestep's pooled embedding (`add_text_embeds`), both tensors the pipeline lets the callback replace. The negative
prompt is SDXL's: an empty one is all zeros when the model's `force_zeros_for_empty_prompt` says so, as the
pipeline does for `negative_prompt=None`.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .attention import pack
from .config import Sampling
from .progress import StepCallback, interrupt_if_asked

logger = logging.getLogger(__name__)


def render_xl(generator, rows: Sequence, sampling: Sampling, output_type: str = "pil",
              on_step: StepCallback | None = None) -> tuple:
    """Denoise `rows` (each with an `XLGridEncoding` or a mix of two) in one batch; the pipeline's output and the
    number of steps done (fewer when `on_step` asked for an interrupt)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**{**generator.pipe.components,
                                        "scheduler": generator.make_scheduler(sampling.scheduler)})
    pipe.register_to_config(force_zeros_for_empty_prompt=generator.pipe.config.force_zeros_for_empty_prompt)
    pipe.set_progress_bar_config(disable=True)
    device = generator.pipe.unet.device  # encodings may be offloaded to the CPU: moved one step at a time
    steps = rows[0].encoding.num_steps

    def packed(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        encs = [r.encoding.step(step) for r in rows]
        keys = torch.stack([e.keys.to(device) for e in encs])  # (R, L, S, D)
        values = torch.stack([e.values.to(device) for e in encs])
        pooled = torch.stack([r.encoding.pooled_step(step).to(device) for r in rows])  # (R, P)
        return pack(keys, values), pooled

    first, first_pooled = packed(0)
    if not sampling.negative_prompt and pipe.config.force_zeros_for_empty_prompt:
        neg, neg_pooled = torch.zeros_like(first), torch.zeros_like(first_pooled)
    else:
        with torch.no_grad():
            negative = generator.conditioner.encode_grid(generator.conditioner.tokenize(sampling.negative_prompt), {},
                                                         [0.0], generator.num_layers)
        step = negative.step(0)
        neg = pack(step.keys[None], step.values[None]).to(device).expand(len(rows), -1, -1)  # (R, 2LS, D)
        neg_pooled = negative.pooled_step(0).to(device).expand(len(rows), -1)
    done = [steps]

    def on_step_end(pipeline, i, t, kwargs):
        interrupt_if_asked(pipeline, i, steps, on_step, done)
        if i + 1 >= steps:
            return {}
        embeds, pooled = packed(i + 1)
        if pipeline.do_classifier_free_guidance:
            embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
        return {"prompt_embeds": embeds, "add_text_embeds": pooled}

    generators = [torch.Generator("cpu").manual_seed(r.seed) for r in rows]
    out = pipe(
        prompt_embeds=first, pooled_prompt_embeds=first_pooled, negative_prompt_embeds=neg,
        negative_pooled_prompt_embeds=neg_pooled, num_inference_steps=sampling.steps,
        guidance_scale=sampling.guidance, height=sampling.height, width=sampling.width, generator=generators,
        callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"],
        output_type=output_type,
    )
    return out, done[0]
