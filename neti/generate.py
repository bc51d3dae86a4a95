"""Generation with P* concepts, on diffusers' own `StableDiffusionPipeline` (NeTI Sec. 3-5, Fig. 11, 12, 20).

The pipeline runs unchanged: NeTI enters through the cross-attention processors (attention.py) and the
`callback_on_step_end` hook, which hands the UNet the packed per-layer encodings of the next timestep. All
encodings of a call are computed up front in batched text-encoder passes (conditioning.py); both halves of
classifier-free guidance share one UNet call and all images of a call share one batch. Controls:
- truncation k: nested-dropout truncation, fidelity (k = 128) against editability (small k) (Sec. 3.4);
- bypass strength alpha (0 = no textual bypass) (Sec. 3.3);
- truncation sweep, per-timestep decomposition (the mapper queried at one fixed t, Fig. 12), and style mixing:
  the geometry concept feeds the geometry layers, and all layers before the start timestep (Fig. 20);
- an X/Y grid over any two of truncation, bypass strength, mixing start and seed (neti.xy).
Every call takes `on_step(done, total) -> interrupt?` (neti.progress) for a progress bar and an Interrupt.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .attention import ensure_processors, pack
from .concept import Concept
from .conditioning import GridEncoding, format_prompt
from .conditioning_xl import conditioner_for
from .generate_xl import render_xl
from .config import DEFAULT_BYPASS_ALPHA, SCHEDULERS, Sampling  # noqa: F401 (re-exported)
from .images import file_name, labelled_grid, make_grid, save_png
from .layers import cross_attention_layers, resolve_layer_names
from .mapper import check_truncation
from .models import is_xl, model_label, token_widths
from .progress import StepCallback, interrupt_if_asked
from .xy import Axis, points

logger = logging.getLogger(__name__)

DEFAULT_GEOMETRY_LAYERS = ("IN07", "IN08", "MID")  # SD 1.x: 3 layers; SDXL: these blocks' 30 (docs/sdxl.md)
DEFAULT_DECOMPOSITION_TIMESTEPS = (999, 800, 600, 400, 200, 0)
MIX_STRIP_STARTS = (600, 700, 800, 900)
DEFAULT_MIX_START = 700  # the appearance concept feeds all but the geometry layers from this timestep on


@dataclass
class Row:
    """One image to render: its per-step encodings (T, L, S, D), its seed and its settings."""

    encoding: "GridEncoding | MixedEncoding"
    seed: int
    settings: dict = field(default_factory=dict)


@dataclass
class Result:
    images: list  # PIL images, or arrays / tensors with output_type "np" / "pt"
    settings: list[dict]
    grid: Image.Image | None = None
    interrupted_at: int | None = None  # sampler steps done when an Interrupt ended the run early
    references: "Result | None" = None  # style mixing: each concept alone, same seeds (geometry, appearance)

    def save(self, folder: str | os.PathLike, stem: str, grid_name: str | None = None,
             grid_settings: dict | None = None) -> tuple[list[Path], Path | None]:
        """Write the images as PNGs with their settings embedded, named by `neti.images.file_name`
        (`{stem}-00-crescent-k8-a0.2-seed4.png`), and the grid (if any) as `grid_name` (default
        `{stem}-grid.png`) carrying `grid_settings` (default: every image's)."""
        folder = Path(folder)
        paths = [save_png(image, folder / file_name(stem, i, settings), settings)
                 for i, (image, settings) in enumerate(zip(self.images, self.settings))]
        grid = None
        if self.grid is not None:
            grid = save_png(self.grid, folder / (grid_name or f"{stem}-grid.png"),
                            grid_settings or {"items": self.settings})
        return paths, grid


def check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise ValueError("give at least one seed")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
            raise ValueError(f"seed {s!r} must be an integer in [0, 2**63)")
    return seeds


@dataclass(frozen=True)
class _Dense:
    """One step's mixed keys and values, stored whole."""

    keys: torch.Tensor  # (L, S, D)
    values: torch.Tensor


@dataclass(frozen=True)
class MixedEncoding:
    """Style mixing's encodings (Fig. 20): step i, layer l from `geometry` where `use_geometry[i, l]`, else from
    `appearance` (the same prompt, so the same placeholder positions). Mixed one step at a time."""

    geometry: GridEncoding
    appearance: GridEncoding
    use_geometry: torch.Tensor  # (T, L) bool

    @property
    def num_steps(self) -> int:
        return self.geometry.num_steps

    def step(self, i: int) -> _Dense:
        geo, app = self.geometry.step(i), self.appearance.step(i)
        use = self.use_geometry[i].to(geo.keys.device)[:, None, None]  # (L, 1, 1)
        return _Dense(torch.where(use, geo.keys, app.keys), torch.where(use, geo.values, app.values))

    def pooled_step(self, i: int) -> torch.Tensor:
        """SDXL's pooled embedding of step i: the virtual pooled layer is not a geometry layer, so it follows the
        geometry concept before the start timestep (every layer does) and the appearance concept after it."""
        source = self.geometry if bool(self.use_geometry[i].all()) else self.appearance
        return source.pooled_step(i)


class Generator:
    """Renders prompts with concepts on a loaded `StableDiffusionPipeline`.

    `cache_bytes` and `offload_cache` bound the text conditioner's cache of encodings (`TextConditioner`).
    """

    def __init__(self, pipe, model_name: str = "", cache_bytes: int | None = None, offload_cache: bool = False):
        self.pipe = pipe
        self.model_name = model_label(model_name)
        self.layers = cross_attention_layers(pipe.unet)
        self.is_xl = is_xl(pipe)
        self.conditioner = conditioner_for(pipe, cache_bytes=cache_bytes, offload_cache=offload_cache)
        ensure_processors(pipe.unet, self.layers, self.conditioner.max_length)
        self.token_widths = token_widths(pipe)
        self.token_dim = sum(self.token_widths)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    # ---- building blocks ------------------------------------------------------------------------------------
    def timesteps(self, sampling: Sampling) -> list[float]:
        """The timesteps the sampler will visit, the t at which the mapper is queried."""
        scheduler = self.make_scheduler(sampling.scheduler)
        scheduler.set_timesteps(sampling.steps)
        return [float(t) for t in scheduler.timesteps]

    def make_scheduler(self, name: str):
        import diffusers

        cls = getattr(diffusers, SCHEDULERS[name])
        return cls.from_config(self.pipe.scheduler.config)  # the model's own settings (clip_sample etc.)

    def prepare(self, prompt: str, concepts: Sequence[Concept]) -> tuple:
        concepts = list(concepts)
        tokens = [c.token for c in concepts]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"two selected concepts share a token ({tokens}); rename one of them")
        for c in concepts:
            c.check_compatible(self.token_dim, self.num_layers, self.model_name or "the loaded base model",
                               self.token_widths)
        text = format_prompt(prompt, tokens)
        return self.conditioner.tokenize(text, tokens), {c.token: c for c in concepts}, text

    def encode(self, prompt: str, concepts: Sequence[Concept], mapper_timesteps: Sequence[float],
               truncation: int | None, alpha: float, fill: Concept | None = None) -> GridEncoding:
        """(T, L, S, D) encodings; `fill` puts another concept in the slot of the (single) concept."""
        tokenized, by_token, _ = self.prepare(prompt, concepts)
        if fill is not None:
            by_token = {token: fill for token in by_token}
        with inference(by_token.values()):
            return self.conditioner.encode_grid(tokenized, by_token, mapper_timesteps, self.num_layers,
                                                truncation, alpha)

    def render(self, rows: Sequence[Row], sampling: Sampling, output_type: str = "pil",
               on_step: StepCallback | None = None) -> Result:
        """Denoise all rows in one batch with diffusers' pipeline; the callback feeds each step's encodings,
        reports progress to `on_step` and, when it returns True, interrupts (diffusers' `interrupt`: the
        remaining steps are skipped and the latents so far decoded)."""
        if self.is_xl:
            out, done = render_xl(self, rows, sampling, output_type, on_step)
        else:
            out, done = self._render_sd(rows, sampling, output_type, on_step)
        steps = rows[0].encoding.num_steps
        size = {"width": out.images[0].width, "height": out.images[0].height} if output_type == "pil" else {}
        settings = [{**r.settings, "seed": r.seed, "steps": sampling.steps, "guidance": sampling.guidance,
                     "scheduler": sampling.scheduler, "negative_prompt": sampling.negative_prompt,
                     "base_model": self.model_name, **size} for r in rows]
        return Result(list(out.images), settings, interrupted_at=done if done < steps else None)

    def _render_sd(self, rows: Sequence[Row], sampling: Sampling, output_type: str, on_step: StepCallback | None):
        """`render` on SD 1.x/2.x: diffusers' `StableDiffusionPipeline`; the images and the steps done."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(**{**self.pipe.components, "scheduler": self.make_scheduler(sampling.scheduler)},
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            negative = self.conditioner.encode_grid(self.conditioner.tokenize(sampling.negative_prompt or ""), {},
                                                    [0.0], self.num_layers)
        device = self.pipe.unet.device  # encodings may be offloaded to the CPU: moved one step at a time
        negative = negative.step(0)
        neg = pack(negative.keys[None], negative.values[None]).to(device).expand(len(rows), -1, -1)  # (R, 2LS, D)
        steps = rows[0].encoding.num_steps

        def packed(step: int) -> torch.Tensor:
            encs = [r.encoding.step(step) for r in rows]
            keys = torch.stack([e.keys.to(device) for e in encs])  # (R, L, S, D)
            values = torch.stack([e.values.to(device) for e in encs])
            return pack(keys, values)

        done = [steps]

        def on_step_end(pipeline, i, t, kwargs):
            interrupt_if_asked(pipeline, i, steps, on_step, done)
            if i + 1 >= steps:
                return {}
            embeds = packed(i + 1)
            if pipeline.do_classifier_free_guidance:
                embeds = torch.cat([neg, embeds])
            return {"prompt_embeds": embeds}

        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in rows]
        out = pipe(
            prompt_embeds=packed(0), negative_prompt_embeds=neg, num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance, height=sampling.height, width=sampling.width, generator=generators,
            callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["prompt_embeds"],
            output_type=output_type,
        )
        return out, done[0]

    def _settings(self, prompt: str, concepts: Sequence[Concept], truncation, alpha) -> dict:
        """The settings an image carries; `resolved_prompt` is the text the model read (tokens for `{}`)."""
        _, _, text = self.prepare(prompt, concepts)
        return {"prompt": prompt, "resolved_prompt": text, "concepts": [c.token for c in concepts],
                "truncation": truncation, "alpha": alpha}

    def token_count(self, prompt: str, concepts: Sequence[Concept] = ()) -> int:
        """Tokens the prompt takes with its start and end tokens (a concept token is one), before any cut to
        `max_tokens`; `{}` counts as the first concept's token."""
        tokens = [c.token for c in concepts]
        text = prompt.replace("{}", tokens[0]) if tokens else prompt.replace("{}", "")
        return self.conditioner.token_count(text, tokens)

    @property
    def max_tokens(self) -> int:
        return self.conditioner.max_length

    # ---- public controls ------------------------------------------------------------------------------------
    def generate(self, prompt: str, concepts: Sequence[Concept] = (), seeds: Sequence[int] = (0,),
                 sampling: Sampling = Sampling(), truncation: int | None = None,
                 alpha: float = DEFAULT_BYPASS_ALPHA, output_type: str = "pil",
                 on_step: StepCallback | None = None) -> Result:
        """One image per seed, all in one batch."""
        seeds = check_seeds(seeds)
        _check_alpha(alpha)
        check_truncation(truncation)
        encoding = self.encode(prompt, concepts, self.timesteps(sampling), truncation, alpha)
        base = self._settings(prompt, concepts, truncation, alpha)
        return self.render([Row(encoding, s, dict(base)) for s in seeds], sampling, output_type, on_step)

    def sweep(self, prompt: str, concepts: Sequence[Concept], seeds: Sequence[int], truncations: Sequence[int | None],
              sampling: Sampling = Sampling(), alpha: float = DEFAULT_BYPASS_ALPHA,
              on_step: StepCallback | None = None) -> Result:
        """The same seeds at several truncations in one batch; grid rows are truncations, columns seeds."""
        seeds, truncations = check_seeds(seeds), list(truncations)
        if not truncations:
            raise ValueError("give at least one truncation value for the sweep")
        for k in truncations:
            check_truncation(k)
        _check_alpha(alpha)
        timesteps = self.timesteps(sampling)
        rows = []
        for k in truncations:
            encoding = self.encode(prompt, concepts, timesteps, k, alpha)
            rows += [Row(encoding, s, self._settings(prompt, concepts, k, alpha)) for s in seeds]
        result = self.render(rows, sampling, on_step=on_step)
        result.grid = make_grid(result.images, len(truncations), len(seeds))
        return result

    def decompose(self, prompt: str, concepts: Sequence[Concept], seed: int = 0,
                  fixed_timesteps: Sequence[float] = DEFAULT_DECOMPOSITION_TIMESTEPS,
                  sampling: Sampling = Sampling(), truncation: int | None = None,
                  alpha: float = DEFAULT_BYPASS_ALPHA, on_step: StepCallback | None = None) -> Result:
        """Per-timestep decomposition (Fig. 12): for each fixed t, M(t, l) feeds every denoising step."""
        seed = check_seeds([seed])[0]
        _check_alpha(alpha)
        check_truncation(truncation)
        steps = len(self.timesteps(sampling))
        rows = []
        for t in fixed_timesteps:
            if not 0 <= float(t) < 1000:
                raise ValueError(f"decomposition timestep {t!r} must be in [0, 1000)")
            encoding = self.encode(prompt, concepts, [float(t)] * steps, truncation, alpha)
            rows.append(Row(encoding, seed, {**self._settings(prompt, concepts, truncation, alpha),
                                             "fixed_timestep": float(t)}))
        result = self.render(rows, sampling, on_step=on_step)
        result.grid = make_grid(result.images, 1, len(rows))
        return result

    def mix(self, prompt: str, geometry: Concept, appearance: Concept, seeds: Sequence[int] = (0,),
            starts: Sequence[float] = (DEFAULT_MIX_START,),
            geometry_layers: Sequence[str] = DEFAULT_GEOMETRY_LAYERS,
            sampling: Sampling = Sampling(), truncation: int | None = None,
            alpha: float = DEFAULT_BYPASS_ALPHA, references: bool = False,
            on_step: StepCallback | None = None) -> Result:
        """Style mixing (Fig. 20): geometry in `geometry_layers` always, and everywhere while t > start.

        The prompt names the concept with {} or the geometry concept's token. One row per (start, seed). With
        `references`, each concept alone at the same seeds is rendered in the same batch (`result.references`:
        the geometry concept's images, then the appearance concept's).
        """
        seeds = check_seeds(seeds)
        _check_alpha(alpha)
        check_truncation(truncation)
        mixer = self._mixer(prompt, geometry, appearance, geometry_layers, sampling)
        rows = []
        for start in starts:
            settings = {**self._settings(prompt, [geometry], truncation, alpha), "appearance": appearance.token,
                        "geometry_layers": list(geometry_layers), "mix_start": float(start)}
            rows += [Row(mixer(start, truncation, alpha), s, settings) for s in seeds]
        mixed = len(rows)
        if references:
            geo_alone = mixer(0.0, truncation, alpha, alone="geometry")
            app_alone = mixer(0.0, truncation, alpha, alone="appearance")
            geo_settings = self._settings(prompt, [geometry], truncation, alpha)
            rows += [Row(geo_alone, s, {**geo_settings, "reference": "geometry"}) for s in seeds]
            app_text = geo_settings["resolved_prompt"].replace(geometry.token, appearance.token)
            app_settings = {**geo_settings, "concepts": [appearance.token], "reference": "appearance",
                            "resolved_prompt": app_text}
            rows += [Row(app_alone, s, app_settings) for s in seeds]
        out = self.render(rows, sampling, on_step=on_step)
        result = Result(out.images[:mixed], out.settings[:mixed], interrupted_at=out.interrupted_at)
        if references:
            result.references = Result(out.images[mixed:], out.settings[mixed:], interrupted_at=out.interrupted_at)
        result.grid = make_grid(result.images, len(starts), len(seeds))
        return result

    def _mixer(self, prompt: str, geometry: Concept, appearance: Concept, geometry_layers: Sequence[str],
               sampling: Sampling):
        """`mixed(start, truncation, alpha, alone=None)`: the (T, L, S, D) style-mixing encoding, or one concept's
        own (`alone` = "geometry" or "appearance"); the two concepts' encodings are cached per (k, alpha)."""
        geometry_idx = resolve_layer_names(self.layers, list(geometry_layers))
        appearance.check_compatible(self.token_dim, self.num_layers, self.model_name or "the loaded base model",
                                    self.token_widths)
        timesteps = self.timesteps(sampling)
        is_geometry_layer = torch.zeros(self.num_layers, dtype=torch.bool)
        is_geometry_layer[geometry_idx] = True
        cache: dict = {}

        def mixed(start: float, truncation: int | None, alpha: float,
                  alone: str | None = None) -> "GridEncoding | MixedEncoding":
            if not 0 <= float(start) <= 1000:
                raise ValueError(f"mixing start timestep {start!r} must be in [0, 1000]")
            if (truncation, alpha) not in cache:
                cache[truncation, alpha] = (self.encode(prompt, [geometry], timesteps, truncation, alpha),
                                            self.encode(prompt, [geometry], timesteps, truncation, alpha,
                                                        fill=appearance))
            geo, app = cache[truncation, alpha]
            if alone is not None:
                return geo if alone == "geometry" else app
            before_start = torch.tensor([t > float(start) for t in timesteps])
            return MixedEncoding(geo, app, before_start[:, None] | is_geometry_layer[None, :])  # (T, L)

        return mixed

    def xy(self, prompt: str, concepts: Sequence[Concept], x: Axis, y: Axis, seed: int = 0,
           sampling: Sampling = Sampling(), truncation: int | None = None, alpha: float = DEFAULT_BYPASS_ALPHA,
           mix_start: float | None = None, appearance: Concept | None = None,
           geometry_layers: Sequence[str] = DEFAULT_GEOMETRY_LAYERS,
           on_step: StepCallback | None = None) -> Result:
        """An X/Y grid in one batch: every (y, x) pair of values of two controls (neti.xy.AXES), the others
        fixed; rows are y values, columns x values, and the grid's axes are labelled. A "mix start" axis (or an
        `appearance` concept) makes each cell a style mix of the (single) concept with `appearance`."""
        base = {"seed": seed, "truncation": truncation, "alpha": alpha,
                "mix_start": None if mix_start is None else float(mix_start)}
        cells = points(x, y, base)
        mixing = appearance is not None or "mix start" in (x.name, y.name)
        if mixing and (appearance is None or len(concepts) != 1):
            raise ValueError("an X/Y grid over the mixing start needs one geometry concept and one appearance concept")
        for cell in cells:
            check_seeds([cell["seed"]])
            check_truncation(cell["truncation"])
            _check_alpha(cell["alpha"])
        timesteps = None if mixing else self.timesteps(sampling)
        mixer = self._mixer(prompt, concepts[0], appearance, geometry_layers, sampling) if mixing else None
        encodings, rows = {}, []
        for cell in cells:
            start = float(DEFAULT_MIX_START) if cell["mix_start"] is None else cell["mix_start"]
            key = (cell["truncation"], cell["alpha"], start if mixing else None)
            if key not in encodings:
                encodings[key] = mixer(start, cell["truncation"], cell["alpha"]) if mixing else \
                    self.encode(prompt, concepts, timesteps, cell["truncation"], cell["alpha"])
            settings = self._settings(prompt, concepts, cell["truncation"], cell["alpha"])
            if mixing:
                settings.update(appearance=appearance.token, geometry_layers=list(geometry_layers), mix_start=start)
            rows.append(Row(encodings[key], cell["seed"], settings))
        result = self.render(rows, sampling, on_step=on_step)
        result.grid = labelled_grid(result.images, x.labels(), y.labels(), x.name, y.name)
        return result


MIX_LAYER_LEGEND = ("IN: the UNet's down path, coarser with depth (IN07, IN08 at the lowest resolution); MID: the "
                    "bottleneck, the coarsest (layout, shape); OUT: the up path, finer as it goes (OUT09-OUT11: "
                    "texture and colour). Geometry lives in the coarse layers, appearance in the fine ones.")


def describe_mix_start(start: float, geometry_layers: Sequence[str]) -> str:
    """The mixing start timestep in words (Fig. 20): which concept drives which layers when, and which way the
    slider goes."""
    start = float(start)
    share = max(0.0, min(1.0, (1000 - start) / 1000))
    layers = ", ".join(geometry_layers) or "no layer"
    return (f"Start t={start:g}: for the first {share:.0%} of the denoising (t 999 to {start:g}) the geometry concept "
            f"drives every layer and sets the layout; after that only {layers} keep it and the appearance concept "
            "paints the rest. Lower start: more of the geometry concept; higher start: more of the appearance "
            "concept.")


@contextmanager
def inference(concepts):
    """Evaluate concepts without gradients and without nested dropout, restoring their modes afterwards."""
    concepts = list(concepts)
    modes = [c.training for c in concepts]
    try:
        with torch.no_grad():
            for c in concepts:
                c.eval()
            yield
    finally:
        for c, mode in zip(concepts, modes):
            c.train(mode)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"bypass strength alpha must be in [0, 1] (0 turns the bypass off), got {alpha!r}")
