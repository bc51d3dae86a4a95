"""NeTI Studio: train, generate, style-mix and explore NeTI concepts (Alaluf et al. 2023) in the browser.

Layout and event wiring only; all work goes through `neti.studio`. Run:
  python app.py [--model ID_OR_PATH] [--host 127.0.0.1] [--port 7860] [--share] [--concepts-dir concepts]
"""

from __future__ import annotations

import argparse
import html
import logging
import os
from pathlib import Path

import gradio as gr
import pandas as pd

from neti.generate import DEFAULT_DECOMPOSITION_TIMESTEPS, DEFAULT_GEOMETRY_LAYERS, MIX_STRIP_STARTS, SCHEDULERS, \
    Sampling
from neti.paths import DEFAULT_CONCEPTS_DIR, EXAMPLES_DIR, SHIPPED_CONCEPTS_DIR
from neti.studio import MAX_UPLOAD_BYTES, MAX_UPLOAD_FILES, Studio, TrainingBusyError, check_uploads, example, \
    example_names
from neti.concept import one_line
from neti.config import DEFAULT_BYPASS_ALPHA, DEFAULT_HIDDEN_DIM
from neti.mapper import parse_truncations
from neti.train import TrainConfig

logger = logging.getLogger("neti.app")

FULL = DEFAULT_HIDDEN_DIM + 1  # the truncation slider's "full" position (no nested-dropout truncation)
DEFAULT_PROMPT = "a photo of a {} on a white background"
USER_ERRORS = (ValueError, FileNotFoundError, TrainingBusyError)

_studio: Studio | None = None


def studio() -> Studio:
    """The app's service object; built on first use from $NETI_MODEL / $NETI_CONCEPTS_DIR when not set by main()."""
    global _studio
    if _studio is None:
        _studio = Studio(concepts_dir=os.environ.get("NETI_CONCEPTS_DIR", DEFAULT_CONCEPTS_DIR))
    return _studio


class user_errors:
    """Turn errors into `gr.Error` toasts with their readable message, HTML-escaped so that a `<token>` shows whole
    (never a stack trace; unexpected errors are logged with theirs, and the app keeps working)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, gr.Error) or not isinstance(exc, Exception):
            return False
        if isinstance(exc, USER_ERRORS):
            raise gr.Error(toast_text(one_line(exc)), print_exception=False) from None
        logger.error("unexpected error", exc_info=(kind, exc, tb))
        raise gr.Error(toast_text(f"unexpected {type(exc).__name__}: {one_line(exc)} (details in the server log)"),
                       print_exception=False) from None


def toast_text(text: str) -> str:
    """Toasts render HTML: escape it, so that a message naming a `<token>` shows it whole."""
    return html.escape(text, quote=False)


def markdown_text(text: str) -> str:
    """`text` for a Markdown component: HTML-escaped outside `code spans`, so that a `<token>` is shown whole."""
    parts = text.split("`")
    return "`".join(part if i % 2 else toast_text(part) for i, part in enumerate(parts))


# ---- helpers -------------------------------------------------------------------------------------------------

def concept_choices() -> list[tuple[str, str]]:
    out = []
    for e in studio().library.entries():
        try:
            concept = studio().library.load(e.name)
            token = concept.token + ("" if studio().is_compatible(concept) else "  (made for another model)")
        except USER_ERRORS:
            token = "(unreadable file)"
        out.append((f"{e.name}  {token}{'  (shipped)' if e.shipped else ''}", e.name))
    return out


def dropdown_updates(current_multi=None, geo=None, app_=None, explore=None):
    choices = concept_choices()
    names = [v for _, v in choices]
    keep = lambda v: v if v in names else (names[0] if names else None)
    multi = [v for v in (current_multi or []) if v in names] or names[:1]
    second = names[1] if len(names) > 1 else (names[0] if names else None)
    return (gr.Dropdown(choices=choices, value=multi), gr.Dropdown(choices=choices, value=keep(geo)),
            gr.Dropdown(choices=choices, value=app_ if app_ in names else second),
            gr.Dropdown(choices=choices, value=keep(explore)))


def truncation_value(k) -> int | None:
    k = int(k)
    return None if k >= FULL else k


def sampling(steps, guidance, scheduler, negative="") -> Sampling:
    return Sampling(steps=int(steps), guidance=float(guidance), scheduler=scheduler, negative_prompt=negative or "")


def seed_value(seed, random_seed) -> int | None:
    return None if random_seed else int(seed)


def gallery(rendered):
    return [(str(p), c) for p, c in zip(rendered.paths, rendered.captions)]


def upload_paths(files) -> list[str]:
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files or []]


# ---- actions: model --------------------------------------------------------------------------------------------

def model_status() -> str:
    return f"**Base model:** {studio().model_description()}"


def switch_model(model: str, progress=gr.Progress()):
    progress(0, desc=f"Loading {model}…")
    with user_errors():
        studio().load_model(model)
    return model_status(), *dropdown_updates()


# ---- actions: train --------------------------------------------------------------------------------------------

def describe_uploads(files):
    """Validate uploads: thumbnails of accepted images and one message per rejected file."""
    try:
        check = check_uploads(upload_paths(files))
    except ValueError as exc:
        return [], f"**Upload refused:** {markdown_text(str(exc))}"
    lines = [f"**{len(check.paths)} image(s) ready.**"] if check.paths else []
    lines += [f"**Rejected** {markdown_text(m)}" for m in check.messages()]
    return [(str(p), Path(p).name) for p in check.paths], "\n\n".join(lines)


def pick_example(name: str):
    if not name:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    with user_errors():
        files, meta = example(name)
    return [str(f) for f in files], meta.get("placeholder_token", f"<{name}>"), meta.get("super_category", "object"), \
        name


def start_training(files, name, token, super_category, method, steps, learning_rate, bypass, nested_dropout,
                   preview_prompts, preview_every, seed):
    with user_errors():
        check = check_uploads(upload_paths(files))
        if not check.images:
            rejected = "; ".join(check.messages())
            raise ValueError("add training images first (upload 3-10 photos, or pick a bundled example)"
                             + (f". Rejected: {rejected}" if rejected else ""))
        method = method.lower()
        ablations = []
        if method == "neti":
            ablations += [] if bypass else ["no_bypass"]
            ablations += [] if nested_dropout else ["no_nested_dropout"]
        prompts = tuple(p.strip() for p in (preview_prompts or "").splitlines() if p.strip()) or ("a photo of a {}",)
        config = TrainConfig(method=method, ablations=tuple(ablations), steps=int(steps),
                             learning_rate=float(learning_rate) if learning_rate else None,
                             preview_every=int(preview_every), preview_prompts=prompts, preview_seeds=(0,),
                             seed=int(seed), checkpoint_every=0)
        snap = studio().start_training(check.images, name, token, super_category, config)
    for warning in snap.warnings:
        gr.Warning(toast_text(warning))
    notes = "".join(f"\n\n**Note:** {markdown_text(w)}" for w in snap.warnings)
    return f"Started training {snap.name} (`{snap.token}`) for {snap.total} steps.{notes}"


def stop_training():
    with user_errors():
        snap = studio().training.stop()
    return f"Stopping {snap.name} at step {snap.step}; it is saved when the current step ends."


def loss_frame(snap) -> pd.DataFrame | None:
    if not snap.losses:  # None, not an empty frame: the plot would fix an empty colour domain and hide the lines
        return None
    steps = list(range(1, len(snap.losses) + 1))
    return pd.DataFrame({"step": pd.Series(steps * 2, dtype="int64"),
                         "loss": pd.Series(list(snap.losses) + list(snap.smoothed), dtype="float64"),
                         "curve": pd.Series(["raw"] * len(steps) + ["smoothed"] * len(steps), dtype="object")})


def preview_gallery(snap):
    items = []
    for step, images in snap.previews:
        for i, image in enumerate(images):
            prompt = snap.preview_prompts[i] if i < len(snap.preview_prompts) else ""
            items.append((image, f"step {step} · {prompt}"))
    return items


def poll(seen_training: tuple, seen_library, multi, geo, app_, explore):
    """Timer tick: refresh the training view and the concept lists when (and only when) they changed."""
    snap = studio().training.snapshot()
    library = studio().library.version()
    skip4 = (gr.skip(),) * 4
    seen_version, seen_previews = seen_training or (-1, -1)
    if snap.version == seen_version:
        train_out = (gr.skip(),) * 4
    else:  # the gallery only when a preview arrived (re-encoding the history every step would be wasted work)
        gallery_out = preview_gallery(snap) if len(snap.previews) != seen_previews else gr.skip()
        message = "" if snap.status == "failed" else gr.skip()  # no "Started training" next to the failure
        train_out = (markdown_text(snap.summary()), loss_frame(snap), gallery_out, message)
    if library != seen_library:
        added = [e[0] for e in library if seen_library is not None and e[0] not in {x[0] for x in seen_library}]
        if added:  # a concept just finished training or was imported: select it where one concept is asked for
            multi, geo, explore = [added[0]], added[0], added[0]
        drops = dropdown_updates(multi, geo, app_, explore)
    else:
        drops = skip4
    return (*train_out, *drops, (snap.version, len(snap.previews)), library)


def training_status():
    """The current training as plain data (for API clients)."""
    s = studio().training.snapshot()
    return {"status": s.status, "name": s.name, "token": s.token, "step": s.step, "total": s.total,
            "losses": list(s.losses), "smoothed": list(s.smoothed), "seconds_per_step": s.seconds_per_step,
            "eta_seconds": s.eta_seconds, "preview_steps": [p[0] for p in s.previews], "error": s.error,
            "summary": s.summary()}


# ---- actions: generate -----------------------------------------------------------------------------------------

def generate(concepts, prompt, negative, num_images, seed, random_seed, steps, guidance, scheduler, truncation,
             alpha, progress=gr.Progress()):
    progress(0, desc="Generating…" + (" (a training is running and shares the CPU)" if studio().training.running
                                       else ""))
    with user_errors():
        r = studio().generate(prompt, concepts or [], seed_value(seed, random_seed), int(num_images),
                              sampling(steps, guidance, scheduler, negative), truncation_value(truncation),
                              float(alpha))
    return gallery(r), [str(p) for p in r.paths]


def sweep(concepts, prompt, negative, num_images, seed, random_seed, steps, guidance, scheduler, truncations,
          alpha, progress=gr.Progress()):
    progress(0, desc="Rendering the truncation sweep…")
    with user_errors():
        values = parse_truncations(truncations)
        r = studio().sweep(prompt, concepts or [], seed_value(seed, random_seed), int(num_images),
                           sampling(steps, guidance, scheduler, negative), values, float(alpha))
    return str(r.grid_path), gallery(r), [str(p) for p in r.paths] + [str(r.grid_path)]


# ---- actions: style mix ----------------------------------------------------------------------------------------

def parse_layers(text: str) -> list[str]:
    return [x for x in str(text).replace(",", " ").split() if x]


def mix(geometry, appearance, prompt, layers, start, seed, random_seed, steps, guidance, scheduler,
        progress=gr.Progress()):
    progress(0, desc="Mixing…")
    with user_errors():
        r = studio().mix(prompt, geometry, appearance, seed_value(seed, random_seed), [float(start)],
                         parse_layers(layers), sampling(steps, guidance, scheduler), None, DEFAULT_BYPASS_ALPHA)
    return gallery(r), [str(p) for p in r.paths]


def mix_strip(geometry, appearance, prompt, layers, seed, random_seed, steps, guidance, scheduler,
              progress=gr.Progress()):
    progress(0, desc="Rendering starts " + ", ".join(str(s) for s in MIX_STRIP_STARTS) + "…")
    with user_errors():
        r = studio().mix(prompt, geometry, appearance, seed_value(seed, random_seed), list(MIX_STRIP_STARTS),
                         parse_layers(layers), sampling(steps, guidance, scheduler), None, DEFAULT_BYPASS_ALPHA)
    return gallery(r), [str(p) for p in r.paths]


# ---- actions: explore ------------------------------------------------------------------------------------------

def concept_card(name) -> str:
    if not name:
        return "No concept selected."
    with user_errors():
        info = studio().library.info(name)
    cfg = info.get("config", {})
    rows = [("name", info["name"] + (" (shipped, read-only)" if info["shipped"] else "")),
            ("token", info["token"]), ("super-category", info["super_category"]), ("method", info["method"]),
            ("training steps", info["train_steps"]), ("base model", info["base_model"] or "unknown"),
            ("parameters", f"{int(info['num_parameters']):,}"),
            ("file size", f"{info['file_size_bytes'] / 1024:.1f} KiB"),
            ("token width x layers", f"{info['token_dim']} x {info['num_layers']}"),
            ("bypass / nested dropout", f"{cfg.get('use_bypass')} / {cfg.get('use_nested_dropout')}")]
    return "| concept card | |\n|---|---|\n" + "\n".join(f"| {k} | `{v}` |" for k, v in rows)


def decompose(name, prompt, seed, steps, progress=gr.Progress()):
    progress(0, desc="Decomposing…")
    with user_errors():
        r = studio().decompose(prompt, name, int(seed), list(DEFAULT_DECOMPOSITION_TIMESTEPS),
                               sampling(steps, 7.5, "dpm"))
    return gallery(r)


def import_checkpoint(mapper_file, embeds_file, name, multi, geo, app_, explore):
    with user_errors():
        new = studio().import_official(upload_paths([mapper_file])[0] if mapper_file else None,
                                       upload_paths([embeds_file])[0] if embeds_file else None, name)
    drops = dropdown_updates(multi, geo, app_, new)
    return f"Imported as '{new}'.", *drops


def export_ti(name):
    with user_errors():
        if not name:
            raise ValueError("choose a concept to export")
        path = studio().export_textual_inversion(name)
    return str(path)


def rename_concept(name, new_name, multi, geo, app_):
    with user_errors():
        new = studio().library.rename(name or "", new_name)
    return f"Renamed '{name}' to '{new}'.", *dropdown_updates(multi, geo, app_, new)


def delete_concept(name, multi, geo, app_):
    with user_errors():
        studio().library.delete(name or "")
    return f"Deleted '{name}'.", *dropdown_updates(multi, geo, app_, None)


def on_load(multi, geo, app_, explore):
    """Page (re)load: model line, concept lists and the training view of any running job."""
    snap = studio().training.snapshot()
    return (model_status(), *dropdown_updates(multi, geo, app_, explore), markdown_text(snap.summary()),
            loss_frame(snap),
            preview_gallery(snap), (snap.version, len(snap.previews)), studio().library.version())


# ---- layout ----------------------------------------------------------------------------------------------------

demo = gr.Blocks(title="NeTI Studio")
with demo:
    gr.Markdown("# NeTI Studio\nPersonalize a frozen Stable Diffusion model with NeTI (Alaluf et al. 2023): train a "
                "concept from a few photos, then generate, trade fidelity for editability with the truncation "
                "slider, and mix geometry and appearance.")
    with gr.Row():
        model_md = gr.Markdown(elem_id="model-status")
        model_box = gr.Textbox(label="Switch base model (hub id or local diffusers folder)", scale=2,
                               placeholder="runwayml/stable-diffusion-v1-5 or /path/to/model")
        model_btn = gr.Button("Load model", scale=0)
    seen_training = gr.State((-1, -1))  # (snapshot version, previews) this page shows
    seen_library = gr.State(None)

    with gr.Tabs():
        with gr.Tab("Train", id="train"):
            with gr.Row():
                with gr.Column():
                    uploads = gr.File(label=f"Training photos (3-10; at most {MAX_UPLOAD_FILES} files, "
                                            f"{MAX_UPLOAD_BYTES // 2**20} MB each)", file_count="multiple",
                                      elem_id="train-uploads")
                    upload_md = gr.Markdown(elem_id="upload-status")
                    thumbs = gr.Gallery(label="Accepted images", columns=6, height=140, fit_columns=False,
                                        elem_id="train-thumbs")
                    example_dd = gr.Dropdown(example_names(), value=None, label="…or use a bundled example")
                with gr.Column():
                    with gr.Row():
                        token = gr.Textbox(label="Token", value="<my-concept>")
                        super_category = gr.Textbox(label="Super-category (one word)", value="object")
                        concept_name = gr.Textbox(label="Concept name", value="my-concept")
                    with gr.Row():
                        method = gr.Radio(["NeTI", "XTI", "TI"], value="NeTI", label="Method")
                        steps = gr.Number(label="Steps", value=200, precision=0, minimum=1, elem_id="train-steps")
                        lr = gr.Number(label="Learning rate (0: the method's default, x8 for batch)", value=0,
                                       minimum=0)
                    with gr.Row():
                        bypass = gr.Checkbox(label="Textual bypass", value=True)
                        nested = gr.Checkbox(label="Nested dropout", value=True)
                        seed_train = gr.Number(label="Seed", value=0, precision=0)
                        preview_every = gr.Number(label="Preview every N steps (0: off)", value=25, precision=0,
                                                  minimum=0, elem_id="train-preview-every")
                    preview_prompts = gr.Textbox(label="Preview prompts (one per line, {} is the concept)", lines=2,
                                                 value="a photo of a {}\na photo of a {} on a blue background")
                    with gr.Row():
                        start_btn = gr.Button("Start training", variant="primary", elem_id="train-start")
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
                    train_msg = gr.Markdown(elem_id="train-message")
            train_status = gr.Markdown(elem_id="train-status")
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="loss", color="curve", title="Loss (raw and smoothed)",
                                        color_map={"raw": "#9ca3af", "smoothed": "#ea580c"},
                                        height=260, elem_id="loss-plot")
                previews = gr.Gallery(label="Previews from step 0", columns=6, height=260, fit_columns=False,
                                      elem_id="train-previews")

        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column():
                    gen_concepts = gr.Dropdown(label="Concepts", multiselect=True, allow_custom_value=True,
                                               elem_id="gen-concepts")
                    prompt = gr.Textbox(label="Prompt ({} or the concepts' tokens)", value=DEFAULT_PROMPT,
                                        elem_id="gen-prompt")
                    negative = gr.Textbox(label="Negative prompt", value="")
                    with gr.Row():
                        num_images = gr.Slider(1, 8, value=2, step=1, label="Images", elem_id="gen-images")
                        seed = gr.Number(label="Seed", value=0, precision=0)
                        random_seed = gr.Checkbox(label="Random seed", value=False)
                    with gr.Row():
                        gen_steps = gr.Slider(1, 100, value=25, step=1, label="Sampling steps", elem_id="gen-steps")
                        guidance = gr.Slider(0, 15, value=7.5, step=0.5, label="Guidance")
                        scheduler = gr.Dropdown(list(SCHEDULERS), value="dpm", label="Scheduler")
                    truncation = gr.Slider(1, FULL, value=FULL, step=1, elem_id="gen-truncation",
                                           label=f"Truncation: nested-dropout units kept "
                                                 f"(1-{DEFAULT_HIDDEN_DIM}; {FULL} = full)")
                    alpha = gr.Slider(0, 1, value=DEFAULT_BYPASS_ALPHA, step=0.05, label="Bypass strength (0 = off)")
                    with gr.Row():
                        gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-button")
                        sweep_values = gr.Textbox(label="Sweep truncations", value="2, 8, 32, full", scale=2)
                        sweep_btn = gr.Button("Sweep truncation", elem_id="sweep-button")
                with gr.Column():
                    gen_gallery = gr.Gallery(label="Images (caption: seed)", columns=4, height=320, fit_columns=False,
                                             elem_id="gen-gallery")
                    sweep_grid = gr.Image(label="Sweep grid (rows: truncation, columns: seeds)", type="filepath",
                                          elem_id="sweep-grid")
                    gen_files = gr.File(label="Download PNGs (settings embedded)", file_count="multiple")

        with gr.Tab("Style Mix", id="mix"):
            with gr.Row():
                with gr.Column():
                    mix_geo = gr.Dropdown(label="Geometry concept", allow_custom_value=True, elem_id="mix-geometry")
                    mix_app = gr.Dropdown(label="Appearance concept", allow_custom_value=True, elem_id="mix-appearance")
                    mix_prompt = gr.Textbox(label="Prompt ({} is the concept)", value=DEFAULT_PROMPT)
                    mix_layers = gr.Textbox(label="Geometry layers", value=" ".join(DEFAULT_GEOMETRY_LAYERS))
                    mix_start = gr.Slider(0, 1000, value=700, step=50, label="Mixing start timestep")
                    with gr.Row():
                        mix_seed = gr.Number(label="Seed", value=0, precision=0)
                        mix_random = gr.Checkbox(label="Random seed", value=False)
                        mix_steps = gr.Slider(1, 100, value=25, step=1, label="Sampling steps",
                                              elem_id="mix-steps")
                    mix_guidance = gr.Slider(0, 15, value=7.5, step=0.5, label="Guidance")
                    mix_scheduler = gr.Dropdown(list(SCHEDULERS), value="dpm", label="Scheduler")
                    with gr.Row():
                        mix_btn = gr.Button("Mix", variant="primary", elem_id="mix-button")
                        strip_btn = gr.Button("Strip: starts " + ", ".join(map(str, MIX_STRIP_STARTS)),
                                              elem_id="strip-button")
                with gr.Column():
                    mix_gallery = gr.Gallery(label="Mixed", columns=4, height=320, fit_columns=False,
                                             elem_id="mix-gallery")
                    mix_files = gr.File(label="Download PNGs", file_count="multiple")

        with gr.Tab("Explore", id="explore"):
            with gr.Row():
                with gr.Column():
                    ex_concept = gr.Dropdown(label="Concept", allow_custom_value=True, elem_id="explore-concept")
                    card = gr.Markdown(elem_id="concept-card")
                with gr.Column():
                    dec_prompt = gr.Textbox(label="Decomposition prompt", value=DEFAULT_PROMPT)
                    with gr.Row():
                        dec_seed = gr.Number(label="Seed", value=0, precision=0)
                        dec_steps = gr.Slider(1, 100, value=25, step=1, label="Sampling steps",
                                              elem_id="decompose-steps")
                    dec_btn = gr.Button("Decompose: the mapper at one fixed t for all steps (t = "
                                        + ", ".join(map(str, DEFAULT_DECOMPOSITION_TIMESTEPS)) + ")",
                                        variant="primary", elem_id="decompose-button")
            dec_gallery = gr.Gallery(label="Per-timestep decomposition", columns=6, height=240,
                                     elem_id="decompose-gallery")
            with gr.Row():
                with gr.Column():
                    gr.Markdown("**Manage**")
                    with gr.Row():
                        export_btn = gr.Button("Export as textual-inversion embedding")
                        export_file = gr.File(label="Embedding", height=100)
                    with gr.Row():
                        new_name = gr.Textbox(label="New name")
                        rename_btn = gr.Button("Rename")
                        delete_btn = gr.Button("Delete", variant="stop")
                    manage_msg = gr.Markdown(elem_id="manage-message")
                with gr.Column():
                    gr.Markdown("**Import an official NeTI checkpoint**")
                    with gr.Row():
                        imp_mapper = gr.File(label="mapper-steps-N.pt", height=150)
                        imp_embeds = gr.File(label="learned_embeds-steps-N.bin (optional)", height=150)
                    with gr.Row():
                        imp_name = gr.Textbox(label="Name (empty: from the token)")
                        imp_btn = gr.Button("Import")
                    imp_msg = gr.Markdown()

    timer = gr.Timer(1.0)
    drops = [gen_concepts, mix_geo, mix_app, ex_concept]

    # ---- wiring --------------------------------------------------------------------------------------------------
    demo.load(on_load, drops, [model_md, *drops, train_status, loss_plot, previews, seen_training, seen_library],
              api_name=False)
    model_btn.click(switch_model, model_box, [model_md, *drops], api_name="load_model")

    uploads.change(describe_uploads, uploads, [thumbs, upload_md], api_name="check_uploads")
    example_dd.change(pick_example, example_dd, [uploads, token, super_category, concept_name], api_name=False)
    start_btn.click(lambda: "", None, train_msg, api_name=False, show_progress="hidden").then(
        start_training, [uploads, concept_name, token, super_category, method, steps, lr, bypass, nested,
                         preview_prompts, preview_every, seed_train], train_msg, api_name="train_start")
    stop_btn.click(stop_training, None, train_msg, api_name="train_stop")
    timer.tick(poll, [seen_training, seen_library, *drops],
               [train_status, loss_plot, previews, train_msg, *drops, seen_training, seen_library],
               show_progress="hidden",
               api_name=False)
    gr.Button(visible=False).click(training_status, None, gr.JSON(visible=False), api_name="train_status")

    gen_inputs = [gen_concepts, prompt, negative, num_images, seed, random_seed, gen_steps, guidance, scheduler]
    gen_btn.click(generate, [*gen_inputs, truncation, alpha], [gen_gallery, gen_files], api_name="generate")
    sweep_btn.click(sweep, [*gen_inputs, sweep_values, alpha], [sweep_grid, gen_gallery, gen_files], api_name="sweep")

    mix_common = [mix_geo, mix_app, mix_prompt, mix_layers]
    mix_sampling = [mix_steps, mix_guidance, mix_scheduler]
    mix_btn.click(mix, [*mix_common, mix_start, mix_seed, mix_random, *mix_sampling], [mix_gallery, mix_files],
                  api_name="mix")
    strip_btn.click(mix_strip, [*mix_common, mix_seed, mix_random, *mix_sampling], [mix_gallery, mix_files],
                    api_name="mix_strip")

    ex_concept.change(concept_card, ex_concept, card, api_name="concept_card")
    dec_btn.click(decompose, [ex_concept, dec_prompt, dec_seed, dec_steps], dec_gallery, api_name="decompose")
    export_btn.click(export_ti, ex_concept, export_file, api_name="export_textual_inversion")
    rename_btn.click(rename_concept, [ex_concept, new_name, gen_concepts, mix_geo, mix_app], [manage_msg, *drops],
                     api_name="rename")
    delete_btn.click(delete_concept, [ex_concept, gen_concepts, mix_geo, mix_app], [manage_msg, *drops],
                     api_name="delete")
    imp_btn.click(import_checkpoint, [imp_mapper, imp_embeds, imp_name, *drops], [imp_msg, *drops],
                  api_name="import_official")


def main(argv: list[str] | None = None) -> None:
    global _studio
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local diffusers folder (default: the bundled toy "
                        "model, or $NETI_MODEL)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--concepts-dir", default=os.environ.get("NETI_CONCEPTS_DIR", str(DEFAULT_CONCEPTS_DIR)),
                        help="folder of the user's concepts (default: concepts/)")
    parser.add_argument("--shipped-concepts-dir", default=str(SHIPPED_CONCEPTS_DIR),
                        help="read-only concepts shipped with the bundled model (default: assets/concepts/)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, mps")
    parser.add_argument("--cache-mb", type=float, default=None, help="memory for cached prompt encodings (default: "
                        "2048 on the CPU, 512 on a GPU; 0: no cache; docs/efficiency.md)")
    parser.add_argument("--offload-cache", action="store_true", help="keep cached encodings in CPU memory")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("neti").setLevel(logging.INFO)
    try:
        cache = None if args.cache_mb is None else int(args.cache_mb * 2**20)
        _studio = Studio(args.model, args.concepts_dir, args.shipped_concepts_dir, device=args.device,
                         cache_bytes=cache, offload_cache=args.offload_cache)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    demo.queue(default_concurrency_limit=2).launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD_BYTES,
        allowed_paths=[str(EXAMPLES_DIR)], show_error=True)


if __name__ == "__main__":
    main()
