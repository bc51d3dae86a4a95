"""NeTI Studio: train, generate, style-mix and explore NeTI concepts (Alaluf et al. 2023) in the browser.

Layout and event wiring only; all work goes through `neti.studio`. Run:
  python app.py [--model ID_OR_PATH] [--host 127.0.0.1] [--port 7860] [--share] [--concepts-dir concepts] [--clip ID]
"""

from __future__ import annotations

import argparse
import html
import logging
import os
from pathlib import Path

import gradio as gr
import pandas as pd

from PIL import Image

from neti.generate import DEFAULT_DECOMPOSITION_TIMESTEPS, DEFAULT_GEOMETRY_LAYERS, DEFAULT_MIX_START, \
    MIX_LAYER_LEGEND, MIX_STRIP_STARTS, SCHEDULERS, Sampling, describe_mix_start
from neti.images import a1111_parameters
from neti.layers import SD_LAYER_NAMES, layer_groups
from neti.paths import DEFAULT_CONCEPTS_DIR, EXAMPLES_DIR, SHIPPED_CONCEPTS_DIR
from neti.progress import format_seconds
from neti.prompting import insert_token, token_counter_text
from neti.studio import MAX_UPLOAD_BYTES, MAX_UPLOAD_FILES, TRAINING_PRESETS, Studio, TrainingBusyError, \
    check_uploads, example, example_names
from neti.concept import one_line
from neti.config import DEFAULT_BYPASS_ALPHA, DEFAULT_HIDDEN_DIM
from neti.mapper import parse_truncations
from neti.config import PreviewConfig, TrainConfig
from neti.xy import AXES, parse_axis

logger = logging.getLogger("neti.app")

FULL = DEFAULT_HIDDEN_DIM + 1  # the truncation slider's "full" position (no nested-dropout truncation)
DEFAULT_PROMPT = "a photo of a {} on a white background"
SAMPLING = Sampling()  # the sampler defaults (guidance, scheduler) the forms start from
LATEST_PREVIEW_PX = 256
NO_THUMBNAIL = Image.new("RGB", (64, 64), "#e5e7eb")  # a library concept without a training preview
# Ctrl+Enter (Cmd+Enter) in a prompt box presses that tab's main button, as in AUTOMATIC1111.
CTRL_ENTER = """<script>
document.addEventListener('keydown', (e) => {
  if (!(e.ctrlKey || e.metaKey) || e.key !== 'Enter') return;
  const pairs = [['#gen-prompt, #gen-negative', '#gen-button'], ['#mix-prompt', '#mix-button']];
  for (const [boxes, button] of pairs) {
    if (e.target.closest && e.target.closest(boxes)) {
      e.preventDefault();
      document.querySelector(button).click();
      return;
    }
  }
});
</script>"""
CSS = """#train-previews .caption-label, #gen-gallery .caption-label { white-space: normal; overflow: visible; }
.neti-progress { display: flex; gap: .75em; align-items: center; }
.neti-progress progress { flex: 1; height: 1.1em; }"""
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
    """Picker entries: 'name · <token> · N steps', usable concepts first, unusable ones flagged at the end."""
    return [(c.label, c.name) for c in studio().concept_statuses()]


def library_gallery():
    return [(str(thumb) if thumb else NO_THUMBNAIL, label) for thumb, label, _ in studio().library_cards()]


def dropdown_updates(current_multi=None, geo=None, app_=None, explore=None, shown=None):
    """The four concept pickers and the library gallery, keeping each picker's selection when it still exists.

    `shown`: the four selections the page held when it sent a timer tick. A picker whose selection stays what it
    was then gets its new choices only, so that a pick the user makes while the tick is in flight is not undone."""
    choices = concept_choices()
    names = [v for _, v in choices]
    keep = lambda v: v if v in names else (names[0] if names else None)
    second = names[1] if len(names) > 1 else (names[0] if names else None)
    values = ([v for v in (current_multi or []) if v in names] or names[:1], keep(geo),
              app_ if app_ in names else second, keep(explore))
    unchanged = [False] * len(values) if shown is None else [v == was for v, was in zip(values, shown)]
    return (*(gr.Dropdown(choices=choices) if same else gr.Dropdown(choices=choices, value=value)
              for value, same in zip(values, unchanged)), library_gallery())


def truncation_value(k) -> int | None:
    k = int(k)
    return None if k >= FULL else k


def sampling(steps, guidance, scheduler, negative="", width=None, height=None) -> Sampling:
    return Sampling(steps=int(steps), guidance=float(guidance), scheduler=scheduler, negative_prompt=negative or "",
                    width=int(width) if width else None, height=int(height) if height else None)


def seed_value(seed, random_seed) -> int | None:
    return None if random_seed else int(seed)


def gallery(rendered):
    return [(str(p), c) for p, c in zip(rendered.paths, rendered.captions)]


def upload_paths(files) -> list[str]:
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files or []]


def reporter(progress, what: str):
    """A `neti.progress` report function drawing Gradio's progress bar: 'Generating: step 5/25, about 3 s left'."""
    busy = " (a training is running and shares the CPU)" if studio().training.running else ""
    progress(0, desc=f"{what}…{busy}")
    return lambda done, total, text: progress((done, total), desc=f"{what}: {text}{busy}")


def interrupted(rendered) -> None:
    if rendered.interrupted_at is not None:
        gr.Warning(f"Interrupted after {rendered.interrupted_at} sampler steps: the images are what the sampler had "
                   "reached.")


# ---- actions: model --------------------------------------------------------------------------------------------

def model_status() -> str:
    return f"**Base model:** {studio().model_description()}"


def layer_choices():
    names = layer_groups(studio().generator.layers)  # SDXL: its blocks (IN07 = IN07.0 ... IN07.9)
    return gr.CheckboxGroup(choices=names, value=[n for n in DEFAULT_GEOMETRY_LAYERS if n in names])


def size_sliders():
    r = studio().resolution
    return gr.Slider(value=r), gr.Slider(value=r)


def switch_model(model: str, progress=gr.Progress()):
    progress(0, desc=f"Loading {model}…")
    with user_errors():
        studio().load_model(model)
    return model_status(), *dropdown_updates(), layer_choices(), *size_sliders()


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


def apply_preset(preset: str):
    if preset not in TRAINING_PRESETS:
        return gr.skip(), gr.skip()
    steps, every = TRAINING_PRESETS[preset]
    return steps, every


def start_training(files, name, token, super_category, method, steps, learning_rate, bypass, nested_dropout,
                   preview_prompts, preview_every, seed, save_every=0, resume=False):
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
        prompts = tuple(p.strip() for p in (preview_prompts or "").splitlines() if p.strip()) or PreviewConfig.prompts
        config = TrainConfig(method=method, ablations=tuple(ablations), steps=int(steps),
                             learning_rate=float(learning_rate) if learning_rate else None,
                             seed=int(seed), checkpoint_every=int(save_every or 0))
        snap = studio().start_training(check.images, name, token, super_category, config,
                                       PreviewConfig(every=int(preview_every), prompts=prompts), bool(resume))
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


def fidelity_frame(snap) -> pd.DataFrame | None:
    """Image similarity (fidelity) and text similarity (editability) of each preview, for the plot beside the loss."""
    if not snap.scores:
        return None
    steps = [s.step for s in snap.scores]
    return pd.DataFrame({"step": pd.Series(steps * 2, dtype="int64"),
                         "similarity": pd.Series([s.image_similarity for s in snap.scores]
                                                 + [s.text_similarity for s in snap.scores], dtype="float64"),
                         "curve": pd.Series(["fidelity (image)"] * len(steps) + ["editability (text)"] * len(steps),
                                            dtype="object")})


def keep_choices(snap):
    """The kept preview steps, newest first, the best trade-off marked and selected."""
    label = lambda k: f"step {k}" + (" (best trade-off)" if k == snap.best_step else "")
    choices = [(label(k), k) for k in reversed(snap.kept_steps)]
    value = snap.best_step if snap.best_step in snap.kept_steps else (choices[0][1] if choices else None)
    return gr.Dropdown(choices=choices, value=value)


def keep_step(step):
    with user_errors():
        if step is None or step == "":
            raise ValueError("choose a preview step to keep (previews must be on while training)")
        name = studio().keep_step(int(step))
    return f"Concept '{name}' is now its step {int(step)}."


def preview_caption(snap, step: int, i: int) -> str:
    prompt = snap.preview_prompts[i % len(snap.preview_prompts)] if snap.preview_prompts else ""
    return f"step {step}: {prompt.replace('{}', snap.token)}"


def preview_gallery(snap):
    """The preview history, newest step first, one row per step (the gallery's columns: images per preview)."""
    items = []
    for step, images in reversed(snap.previews):
        items += [(image, preview_caption(snap, step, i)) for i, image in enumerate(images)]
    return items


def latest_preview(snap):
    if not snap.previews or not snap.previews[-1][1]:
        return gr.Image(value=None, label="Latest preview")
    step, images = snap.previews[-1]
    image = images[0]
    if image.width < LATEST_PREVIEW_PX:  # a toy model's 64 px preview, enlarged so that it can be seen
        scale = -(-LATEST_PREVIEW_PX // image.width)
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return gr.Image(value=image, label=f"Latest preview, {preview_caption(snap, step, 0)}")


def history_columns(snap) -> int:
    """Whole preview steps per gallery row: as many as fit in about six columns."""
    per_step = len(snap.previews[-1][1]) if snap.previews and snap.previews[-1][1] else 1
    return per_step * max(1, 6 // per_step)


def progress_html(snap) -> str:
    """The training's progress bar: steps done of the total, time left."""
    if snap.status == "idle":
        return ""
    left = f", about {format_seconds(snap.eta_seconds)} left" if snap.running and snap.eta_seconds else ""
    return (f'<div class="neti-progress"><progress value="{snap.step}" max="{max(1, snap.total)}"></progress>'
            f"<span>{snap.step}/{snap.total} steps ({html.escape(snap.status)}){left}</span></div>")


def control_buttons(snap):
    """Start only when no training runs, Stop only while one does."""
    return gr.Button(interactive=not snap.running), gr.Button(interactive=snap.status == "running")


def form_values(snap):
    """The training form as the running job was started, so that a reloaded page shows its settings."""
    c, p = snap.config, snap.preview_config
    if not snap.running or c is None or p is None:
        return (gr.skip(),) * len(TRAIN_FORM)
    return (snap.name, snap.token, snap.super_category, c.method.upper() if c.method != "neti" else "NeTI", c.steps,
            c.learning_rate or 0, "no_bypass" not in c.ablations, "no_nested_dropout" not in c.ablations,
            "\n".join(p.prompts), p.every, c.seed, c.checkpoint_every, gr.skip())


def seen_key(snap) -> tuple:
    """What a page has shown of a training: (snapshot version, previews, scores and kept steps)."""
    return snap.version, len(snap.previews), len(snap.scores) + len(snap.kept_steps)


def training_view(snap, previews_changed: bool, scores_changed: bool = True):
    """The training view; the previews, the fidelity plot and the kept steps only when they changed (so that a
    step the user picked to keep is not reset at every training step)."""
    fidelity = (fidelity_frame(snap), keep_choices(snap)) if scores_changed else (gr.skip(), gr.skip())
    return (markdown_text(snap.summary()), progress_html(snap), loss_frame(snap), *fidelity,
            latest_preview(snap) if previews_changed else gr.skip(),
            gr.Gallery(value=preview_gallery(snap), columns=history_columns(snap))
            if previews_changed else gr.skip(), *control_buttons(snap))


def poll(seen_training: tuple, seen_library, multi, geo, app_, explore):
    """Timer tick: refresh the training view and the concept lists when (and only when) they changed."""
    snap = studio().training.snapshot()
    library = studio().library.version()
    seen_version, seen_previews, seen_scores = seen_training or (-1, -1, -1)
    version, previews_, scores = seen_key(snap)
    if version == seen_version:
        train_out = (gr.skip(),) * 10
    else:  # the gallery only when a preview arrived (re-encoding the history every step would be wasted work)
        message = gr.skip() if snap.running else ""  # "Started …" or "Stopping …" ends with the run
        train_out = (*training_view(snap, previews_ != seen_previews, scores != seen_scores), message)
    if library != seen_library:
        shown = (multi, geo, app_, explore)
        added = [e[0] for e in library if seen_library is not None and e[0] not in {x[0] for x in seen_library}]
        if added:  # a concept just finished training or was imported: selected only where nothing was
            multi, geo, explore = multi or [added[0]], geo or added[0], explore or added[0]
        drops = dropdown_updates(multi, geo, app_, explore, shown=shown)
    else:
        drops = (gr.skip(),) * 5
    return (*train_out, *drops, seen_key(snap), library)


def training_status():
    """The current training as plain data (for API clients)."""
    s = studio().training.snapshot()
    return {"status": s.status, "name": s.name, "token": s.token, "step": s.step, "total": s.total,
            "losses": list(s.losses), "smoothed": list(s.smoothed), "seconds_per_step": s.seconds_per_step,
            "eta_seconds": s.eta_seconds, "preview_steps": [p[0] for p in s.previews], "error": s.error,
            "scores": [{"step": x.step, "image_similarity": x.image_similarity, "text_similarity": x.text_similarity}
                       for x in s.scores], "best_step": s.best_step, "kept_steps": list(s.kept_steps),
            "summary": s.summary()}


# ---- actions: results ------------------------------------------------------------------------------------------

def result_outputs(rendered, grid=None):
    """Gallery, files, the images' settings (for the selection panel), the X/Y grid (cleared unless given) and an
    emptied selection panel: a new result replaces everything the last one showed."""
    interrupted(rendered)
    files = [str(p) for p in rendered.paths] + ([str(rendered.grid_path)] if rendered.grid_path else [])
    return gallery(rendered), files, list(rendered.settings), grid, ""


def select_image(results, evt: gr.SelectData):
    """The selected image's settings, as A1111's PNG Info shows them."""
    if not results or not isinstance(evt.index, int) or not 0 <= evt.index < len(results):
        return "", None
    settings = results[evt.index]
    return a1111_parameters(settings), settings


def reuse_seed(selected):
    if not selected:
        raise gr.Error("select an image first (click it in the gallery)")
    return int(selected["seed"]), False


def send_to_generate(selected):
    """The selected image's settings into the Generate form, and the Generate tab shown."""
    if not selected:
        raise gr.Error("select an image first (click it in the gallery)")
    names = [studio().library.token_owner(t) for t in selected.get("concepts") or []]
    k = selected.get("truncation")
    return (gr.Tabs(selected="generate"), [n for n in names if n], selected.get("prompt", DEFAULT_PROMPT),
            selected.get("negative_prompt", ""), int(selected["seed"]), False, int(selected.get("steps", 25)),
            float(selected.get("guidance", SAMPLING.guidance)), selected.get("scheduler", SAMPLING.scheduler),
            FULL if k is None else int(k),
            float(selected.get("alpha", DEFAULT_BYPASS_ALPHA)), selected.get("width") or gr.skip(),
            selected.get("height") or gr.skip())


def interrupt():
    if not studio().interrupt():
        gr.Info("Nothing is generating.")


# ---- actions: generate -----------------------------------------------------------------------------------------

def generate(concepts, prompt, negative, num_images, seed, random_seed, steps, guidance, scheduler, truncation,
             alpha, width=None, height=None, progress=gr.Progress()):
    report = reporter(progress, "Generating")
    with user_errors():
        r = studio().generate(prompt, concepts or [], seed_value(seed, random_seed), int(num_images),
                              sampling(steps, guidance, scheduler, negative, width, height),
                              truncation_value(truncation), float(alpha), progress=report)
    return result_outputs(r)


def sweep(concepts, prompt, negative, num_images, seed, random_seed, steps, guidance, scheduler, truncations,
          alpha, width=None, height=None, progress=gr.Progress()):
    report = reporter(progress, "Truncation sweep")
    with user_errors():
        values = parse_truncations(truncations)
        r = studio().sweep(prompt, concepts or [], seed_value(seed, random_seed), int(num_images),
                           sampling(steps, guidance, scheduler, negative, width, height), values, float(alpha),
                           progress=report)
    gallery_, files, settings, _, info = result_outputs(r)
    return str(r.grid_path), gallery_, files, settings, info


def xy_grid(concepts, prompt, negative, seed, random_seed, steps, guidance, scheduler, truncation, alpha, width,
            height, x_axis, x_values, y_axis, y_values, progress=gr.Progress()):
    report = reporter(progress, "X/Y grid")
    with user_errors():
        x, y = parse_axis(x_axis, x_values), parse_axis(y_axis, y_values)
        r = studio().xy(prompt, concepts or [], x, y, seed_value(seed, random_seed),
                        sampling(steps, guidance, scheduler, negative, width, height), truncation_value(truncation),
                        float(alpha), progress=report)
    gallery_, files, settings, _, info = result_outputs(r)
    return str(r.grid_path), gallery_, files, settings, info


def count_tokens(prompt, concepts) -> str:
    try:
        used, limit = studio().token_count(prompt, concepts or [])
    except ValueError as exc:
        return markdown_text(one_line(exc))
    return markdown_text(token_counter_text(used, limit))


def add_token(prompt, concepts):
    """Put the first selected concept's token into the prompt."""
    with user_errors():
        if not concepts:
            raise ValueError("select a concept first; its token is what gets inserted")
        return insert_token(prompt, studio().library.load(concepts[0]).token)


# ---- actions: style mix ----------------------------------------------------------------------------------------

def layer_list(layers) -> list[str]:
    """Geometry layers from the checkboxes (a list), or from text ('IN07 IN08 MID') for API clients."""
    if isinstance(layers, str):
        return [x for x in layers.replace(",", " ").split() if x]
    return list(layers or [])


def mix_outputs(rendered):
    gallery_, files, settings, _, info = result_outputs(rendered)
    refs = gallery(rendered.references) if rendered.references else []
    return gallery_, refs, files, settings, info


def mix(geometry, appearance, prompt, layers, start, seed, random_seed, steps, guidance, scheduler,
        progress=gr.Progress()):
    report = reporter(progress, "Mixing")
    with user_errors():
        r = studio().mix(prompt, geometry, appearance, seed_value(seed, random_seed), [float(start)],
                         layer_list(layers), sampling(steps, guidance, scheduler), None, DEFAULT_BYPASS_ALPHA,
                         references=True, progress=report)
    return mix_outputs(r)


def mix_strip(geometry, appearance, prompt, layers, seed, random_seed, steps, guidance, scheduler,
              progress=gr.Progress()):
    report = reporter(progress, "Strip of starts " + ", ".join(str(s) for s in MIX_STRIP_STARTS))
    with user_errors():
        r = studio().mix(prompt, geometry, appearance, seed_value(seed, random_seed), list(MIX_STRIP_STARTS),
                         layer_list(layers), sampling(steps, guidance, scheduler), None, DEFAULT_BYPASS_ALPHA,
                         references=True, progress=report)
    return mix_outputs(r)


def mix_xy(geometry, appearance, prompt, layers, start, seed, random_seed, steps, guidance, scheduler, x_axis,
           x_values, y_axis, y_values, progress=gr.Progress()):
    report = reporter(progress, "X/Y grid of mixes")
    with user_errors():
        if not geometry or not appearance:
            raise ValueError("choose both a geometry concept and an appearance concept")
        x, y = parse_axis(x_axis, x_values), parse_axis(y_axis, y_values)
        r = studio().xy(prompt, [geometry], x, y, seed_value(seed, random_seed), sampling(steps, guidance, scheduler),
                        None, DEFAULT_BYPASS_ALPHA, float(start), appearance, layer_list(layers), progress=report)
    gallery_, files, settings, _, info = result_outputs(r)
    return str(r.grid_path), gallery_, files, settings, info


def mix_start_text(start, layers) -> str:
    return markdown_text(describe_mix_start(float(start), layer_list(layers)))


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
    problem = next((c.problem for c in studio().concept_statuses() if c.name == name), "")
    warning = f"**Unusable with the loaded model: {markdown_text(problem)}.**\n\n" if problem else ""
    return warning + "| concept card | |\n|---|---|\n" + "\n".join(f"| {k} | `{v}` |" for k, v in rows)


def pick_from_library(evt: gr.SelectData):
    cards = studio().library_cards()
    if not isinstance(evt.index, int) or not 0 <= evt.index < len(cards):
        return gr.skip()
    return cards[evt.index][2]


def decompose(name, prompt, seed, steps, progress=gr.Progress()):
    report = reporter(progress, "Decomposing")
    with user_errors():
        r = studio().decompose(prompt, name, int(seed), list(DEFAULT_DECOMPOSITION_TIMESTEPS),
                               sampling(steps, SAMPLING.guidance, SAMPLING.scheduler), progress=report)
    interrupted(r)
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


def ask_delete(name):
    """The first click on Delete only asks: it shows the confirmation row naming the concept."""
    with user_errors():
        if not name:
            raise ValueError("choose a concept to delete")
        e = studio().library.entry(name)
        if e.shipped:
            raise ValueError(f"{e.name!r} is a shipped example concept and is read-only; it cannot be deleted")
    return gr.Row(visible=True), f"Delete **{markdown_text(name)}** for good? Its file is removed."


def delete_concept(name, multi, geo, app_):
    with user_errors():
        studio().library.delete(name or "")
    return f"Deleted '{name}'.", *dropdown_updates(multi, geo, app_, None)


def on_load(multi, geo, app_, explore):
    """Page (re)load: model line, concept lists, the model's layers and size, and the training view and form of
    any running job."""
    snap = studio().training.snapshot()
    return (model_status(), *dropdown_updates(multi, geo, app_, explore), layer_choices(), *size_sliders(),
            *training_view(snap, True), *form_values(snap), seen_key(snap),
            studio().library.version())


# ---- layout ----------------------------------------------------------------------------------------------------

def xy_panel(axes, x_default, y_default, elem_prefix):
    """The X/Y grid's controls: two axes with their values, and the button."""
    samples = {"truncation": "2, 8, 32, full", "bypass strength": "0, 0.2, 0.5", "mix start": "500, 700, 900",
               "seed": "0, 1, 2"}
    with gr.Accordion("X/Y grid", open=False):
        with gr.Row():
            x_axis = gr.Dropdown(list(axes), value=x_default, label="X axis", elem_id=f"{elem_prefix}-x-axis")
            x_values = gr.Textbox(samples[x_default], label="X values", elem_id=f"{elem_prefix}-x-values")
        with gr.Row():
            y_axis = gr.Dropdown(list(axes), value=y_default, label="Y axis", elem_id=f"{elem_prefix}-y-axis")
            y_values = gr.Textbox(samples[y_default], label="Y values", elem_id=f"{elem_prefix}-y-values")
        button = gr.Button("Render X/Y grid", elem_id=f"{elem_prefix}-xy-button")
    x_axis.change(lambda a: samples[a], x_axis, x_values, api_name=False, show_progress="hidden")
    y_axis.change(lambda a: samples[a], y_axis, y_values, api_name=False, show_progress="hidden")
    return x_axis, x_values, y_axis, y_values, button


def selection_panel(elem_prefix):
    """Below a gallery: the selected image's settings, Reuse seed, Send to Generate."""
    info = gr.Textbox(label="Selected image: its settings (A1111 parameters; click an image to see them)", lines=3,
                      interactive=False, elem_id=f"{elem_prefix}-info")
    with gr.Row():
        reuse = gr.Button("Reuse seed", size="sm", elem_id=f"{elem_prefix}-reuse-seed")
        send = gr.Button("Send to Generate", size="sm", elem_id=f"{elem_prefix}-send")
    return info, reuse, send


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
    seen_training = gr.State((-1, -1, -1))  # `seen_key` of the training this page shows
    seen_library = gr.State(None)
    gen_results, mix_results = gr.State([]), gr.State([])  # the settings of the images each gallery shows
    gen_selected, mix_selected = gr.State(None), gr.State(None)

    with gr.Tabs() as tabs:
        with gr.Tab("Train", id="train"):
            with gr.Row():
                with gr.Column():
                    uploads = gr.File(label=f"Training photos (3-10; at most {MAX_UPLOAD_FILES} files, "
                                            f"{MAX_UPLOAD_BYTES // 2**20} MB each)", file_count="multiple",
                                      elem_id="train-uploads")
                    upload_md = gr.Markdown(elem_id="upload-status")
                    thumbs = gr.Gallery(label="Training photos", columns=5, height=180, fit_columns=False,
                                        elem_id="train-thumbs")
                    example_dd = gr.Dropdown(example_names(), value=None, label="…or use a bundled example")
                with gr.Column():
                    with gr.Row():
                        token = gr.Textbox(label="Token", value="<my-concept>",
                                           info="The new word for the concept, in angle brackets")
                        super_category = gr.Textbox(label="Super-category (one word)", value="object",
                                                    info="What it is: the mapper's outputs are scaled to this word's "
                                                         "embedding norm")
                        concept_name = gr.Textbox(label="Concept name", value="my-concept")
                    preset = gr.Radio(list(TRAINING_PRESETS) + ["Custom"], value="Custom", label="Preset",
                                      elem_id="train-preset")
                    with gr.Row():
                        method = gr.Radio(["NeTI", "XTI", "TI"], value="NeTI", label="Method")
                        steps = gr.Number(label="Steps", value=200, precision=0, minimum=1, elem_id="train-steps")
                        lr = gr.Number(label="Learning rate (0: the method's default)", value=0, minimum=0,
                                       info="0 uses the paper's rate (NeTI 1e-3); any rate is multiplied by batch x "
                                            "gradient accumulation (x8), as in the paper")
                    with gr.Row():
                        bypass = gr.Checkbox(label="Textual bypass", value=True,
                                             info="A second output vector added after the text encoder, for finer "
                                                  "detail (NeTI Sec. 3.3)")
                        nested = gr.Checkbox(label="Nested dropout", value=True,
                                             info="Orders the representation coarse to fine, so that truncation at "
                                                  "generation trades fidelity for editability (Sec. 3.4)")
                        seed_train = gr.Number(label="Seed", value=0, precision=0)
                    with gr.Row():
                        preview_every = gr.Number(label="Preview every N steps (0: off)", value=25, precision=0,
                                                  minimum=0, elem_id="train-preview-every")
                        save_every = gr.Number(label="Save a checkpoint every N steps (0: off)", value=0, precision=0,
                                               minimum=0, elem_id="train-save-every",
                                               info="Written next to the concept (NAME-checkpoints/), so that a "
                                                    "run can be resumed or extended")
                        resume = gr.Checkbox(label="Resume", value=False, elem_id="train-resume",
                                             info="Continue the concept of this name from its latest checkpoint "
                                                  "up to Steps (same photos, method and token)")
                    preview_prompts = gr.Textbox(label="Preview prompts (one per line, {} is the concept)", lines=2,
                                                 value="a photo of a {}\na photo of a {} on a blue background")
                    with gr.Row():
                        start_btn = gr.Button("Start training", variant="primary", elem_id="train-start")
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop", interactive=False)
                    train_msg = gr.Markdown(elem_id="train-message")
            train_status = gr.Markdown(elem_id="train-status")
            train_progress = gr.HTML(elem_id="train-progress")
            with gr.Row():
                with gr.Column(scale=2):
                    loss_plot = gr.LinePlot(x="step", y="loss", color="curve", title="Loss (raw and smoothed)",
                                            color_map={"raw": "#9ca3af", "smoothed": "#ea580c"},
                                            height=300, elem_id="loss-plot")
                with gr.Column(scale=2):
                    fidelity_plot = gr.LinePlot(x="step", y="similarity", color="curve", height=300,
                                                title="CLIP fidelity and editability of the previews",
                                                color_map={"fidelity (image)": "#2563eb",
                                                           "editability (text)": "#16a34a"},
                                                elem_id="fidelity-plot")
                with gr.Column(scale=1):
                    latest = gr.Image(label="Latest preview", height=300, interactive=False, elem_id="train-latest")
            with gr.Row():
                keep_dd = gr.Dropdown(label="Keep an earlier step as the concept (a copy is kept at every preview)",
                                      choices=[], allow_custom_value=True, elem_id="keep-step", scale=2)
                keep_btn = gr.Button("Keep this step", scale=0, elem_id="keep-step-button")
                keep_msg = gr.Markdown(elem_id="keep-message")
            previews = gr.Gallery(label="Preview history (newest step first, whole steps per row)", columns=6,
                                  height=360, fit_columns=False, elem_id="train-previews")

        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column():
                    gen_concepts = gr.Dropdown(label="Concepts", multiselect=True, allow_custom_value=True,
                                               elem_id="gen-concepts")
                    prompt = gr.Textbox(label="Prompt ({} or the concepts' tokens)", value=DEFAULT_PROMPT, lines=2,
                                        elem_id="gen-prompt", info="Ctrl+Enter generates")
                    with gr.Row():
                        token_md = gr.Markdown(elem_id="gen-tokens")
                        insert_btn = gr.Button("Insert token", size="sm", scale=0, elem_id="gen-insert-token")
                    negative = gr.Textbox(label="Negative prompt", value="", elem_id="gen-negative")
                    with gr.Row():
                        num_images = gr.Slider(1, 8, value=2, step=1, label="Images", elem_id="gen-images")
                        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="gen-seed")
                        random_seed = gr.Checkbox(label="Random seed", value=False, elem_id="gen-random-seed")
                    with gr.Row():
                        gen_steps = gr.Slider(1, 100, value=25, step=1, label="Sampling steps", elem_id="gen-steps")
                        guidance = gr.Slider(0, 15, value=SAMPLING.guidance, step=0.5, label="Guidance")
                        scheduler = gr.Dropdown(list(SCHEDULERS), value=SAMPLING.scheduler, label="Scheduler")
                    with gr.Row():
                        width = gr.Slider(8, 1024, value=512, step=8, label="Width", elem_id="gen-width")
                        height = gr.Slider(8, 1024, value=512, step=8, label="Height", elem_id="gen-height")
                    truncation = gr.Slider(1, FULL, value=FULL, step=1, elem_id="gen-truncation",
                                           label=f"Truncation: nested-dropout units kept "
                                                 f"(1-{DEFAULT_HIDDEN_DIM}; {FULL} = full)",
                                           info="Fewer units: more editable, less faithful to the concept "
                                                "(NeTI Sec. 3.4); full keeps everything")
                    alpha = gr.Slider(0, 1, value=DEFAULT_BYPASS_ALPHA, step=0.05, label="Bypass strength (0 = off)",
                                      elem_id="gen-alpha",
                                      info="How much of the textual bypass to add (Sec. 3.3): more detail, less "
                                           "editability")
                    with gr.Row():
                        gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-button")
                        gen_stop = gr.Button("Interrupt", variant="stop", elem_id="gen-interrupt")
                    with gr.Row():
                        sweep_values = gr.Textbox(label="Sweep truncations", value="2, 8, 32, full", scale=2)
                        sweep_btn = gr.Button("Sweep truncation", elem_id="sweep-button")
                    gen_xy = xy_panel(("truncation", "bypass strength", "seed"), "truncation", "bypass strength",
                                      "gen")
                with gr.Column():
                    gen_gallery = gr.Gallery(label="Images (click one for its settings)", columns=4, height=320,
                                             fit_columns=False, elem_id="gen-gallery")
                    gen_info, gen_reuse, gen_send = selection_panel("gen")
                    xy_image = gr.Image(label="Grid (axes labelled)", type="filepath", elem_id="sweep-grid")
                    gen_files = gr.File(label="Download PNGs (settings embedded, A1111 'parameters' included)",
                                        file_count="multiple")

        with gr.Tab("Style Mix", id="mix"):
            with gr.Row():
                with gr.Column():
                    mix_geo = gr.Dropdown(label="Geometry concept (shape, layout)", allow_custom_value=True,
                                          elem_id="mix-geometry")
                    mix_app = gr.Dropdown(label="Appearance concept (colour, texture)", allow_custom_value=True,
                                          elem_id="mix-appearance")
                    mix_prompt = gr.Textbox(label="Prompt ({} is the concept)", value=DEFAULT_PROMPT,
                                            elem_id="mix-prompt", info="Ctrl+Enter mixes")
                    mix_layers = gr.CheckboxGroup(SD_LAYER_NAMES, value=list(DEFAULT_GEOMETRY_LAYERS),
                                                  label="Geometry layers (always fed the geometry concept)",
                                                  elem_id="mix-layers", info=MIX_LAYER_LEGEND)
                    mix_start = gr.Slider(0, 1000, value=DEFAULT_MIX_START, step=50, label="Mixing start timestep",
                                          elem_id="mix-start",
                                          info="Lower: more of the geometry concept; higher: more of the appearance "
                                               "concept")
                    mix_start_md = gr.Markdown(elem_id="mix-start-text")
                    with gr.Row():
                        mix_seed = gr.Number(label="Seed", value=0, precision=0, elem_id="mix-seed")
                        mix_random = gr.Checkbox(label="Random seed", value=False)
                        mix_steps = gr.Slider(1, 100, value=25, step=1, label="Sampling steps",
                                              elem_id="mix-steps")
                    mix_guidance = gr.Slider(0, 15, value=SAMPLING.guidance, step=0.5, label="Guidance")
                    mix_scheduler = gr.Dropdown(list(SCHEDULERS), value=SAMPLING.scheduler, label="Scheduler")
                    with gr.Row():
                        mix_btn = gr.Button("Mix", variant="primary", elem_id="mix-button")
                        strip_btn = gr.Button("Strip: starts " + ", ".join(map(str, MIX_STRIP_STARTS)),
                                              elem_id="strip-button")
                        mix_stop = gr.Button("Interrupt", variant="stop", elem_id="mix-interrupt")
                    mix_xy_controls = xy_panel(AXES, "mix start", "seed", "mix")
                with gr.Column():
                    with gr.Row():
                        mix_gallery = gr.Gallery(label="Mixed", columns=2, height=320, fit_columns=False,
                                                 elem_id="mix-gallery", scale=2)
                        mix_refs = gr.Gallery(label="References: each concept alone, same seed", columns=1,
                                              height=320, elem_id="mix-references", scale=1)
                    mix_info, mix_reuse, mix_send = selection_panel("mix")
                    mix_grid = gr.Image(label="X/Y grid (axes labelled)", type="filepath", elem_id="mix-grid")
                    mix_files = gr.File(label="Download PNGs", file_count="multiple")

        with gr.Tab("Explore", id="explore"):
            with gr.Row():
                with gr.Column():
                    ex_concept = gr.Dropdown(label="Concept", allow_custom_value=True, elem_id="explore-concept")
                    library = gr.Gallery(label="Library (thumbnail: the last training preview; ⚠ unusable)",
                                         columns=4, height=240, allow_preview=False, elem_id="library-gallery")
                    card = gr.Markdown(elem_id="concept-card")
                with gr.Column():
                    dec_prompt = gr.Textbox(label="Decomposition prompt", value=DEFAULT_PROMPT)
                    with gr.Row():
                        dec_seed = gr.Number(label="Seed", value=0, precision=0)
                        dec_steps = gr.Slider(1, 100, value=25, step=1, label="Sampling steps",
                                              elem_id="decompose-steps")
                    with gr.Row():
                        dec_btn = gr.Button("Decompose: the mapper at one fixed t for all steps (t = "
                                            + ", ".join(map(str, DEFAULT_DECOMPOSITION_TIMESTEPS)) + ")",
                                            variant="primary", elem_id="decompose-button")
                        dec_stop = gr.Button("Interrupt", variant="stop", scale=0, elem_id="decompose-interrupt")
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
                        delete_btn = gr.Button("Delete…", variant="stop", elem_id="delete-button")
                    with gr.Row(visible=False) as confirm_row:
                        confirm_md = gr.Markdown(elem_id="delete-question")
                        confirm_btn = gr.Button("Yes, delete", variant="stop", elem_id="delete-confirm")
                        cancel_btn = gr.Button("Cancel", elem_id="delete-cancel")
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
    drops = [gen_concepts, mix_geo, mix_app, ex_concept, library]
    pickers = drops[:4]
    TRAIN_FORM = [concept_name, token, super_category, method, steps, lr, bypass, nested, preview_prompts,
                  preview_every, seed_train, save_every, resume]
    train_view = [train_status, train_progress, loss_plot, fidelity_plot, keep_dd, latest, previews, start_btn,
                  stop_btn]

    # ---- wiring --------------------------------------------------------------------------------------------------
    demo.load(on_load, pickers, [model_md, *drops, mix_layers, width, height, *train_view, *TRAIN_FORM,
                                 seen_training, seen_library], api_name=False).then(
        mix_start_text, [mix_start, mix_layers], mix_start_md, api_name=False).then(
        count_tokens, [prompt, gen_concepts], token_md, api_name=False)
    model_btn.click(switch_model, model_box, [model_md, *drops, mix_layers, width, height], api_name="load_model")

    uploads.change(describe_uploads, uploads, [thumbs, upload_md], api_name="check_uploads")
    example_dd.change(pick_example, example_dd, [uploads, token, super_category, concept_name], api_name=False)
    preset.change(apply_preset, preset, [steps, preview_every], api_name=False)
    start_btn.click(lambda: "", None, train_msg, api_name=False, show_progress="hidden").then(
        start_training, [uploads, *TRAIN_FORM],
        train_msg, api_name="train_start")
    stop_btn.click(stop_training, None, train_msg, api_name="train_stop")
    keep_btn.click(keep_step, keep_dd, keep_msg, api_name="keep_step")
    timer.tick(poll, [seen_training, seen_library, *pickers],
               [*train_view, train_msg, *drops, seen_training, seen_library], show_progress="hidden",
               api_name=False)
    gr.Button(visible=False).click(training_status, None, gr.JSON(visible=False), api_name="train_status")

    gen_inputs = [gen_concepts, prompt, negative, num_images, seed, random_seed, gen_steps, guidance, scheduler]
    gen_outputs = [gen_gallery, gen_files, gen_results, xy_image, gen_info]
    gen_event = gen_btn.click(generate, [*gen_inputs, truncation, alpha, width, height], gen_outputs,
                              api_name="generate")
    sweep_event = sweep_btn.click(sweep, [*gen_inputs, sweep_values, alpha, width, height],
                                  [xy_image, gen_gallery, gen_files, gen_results, gen_info], api_name="sweep")
    gen_xy[4].click(xy_grid, [gen_concepts, prompt, negative, seed, random_seed, gen_steps, guidance, scheduler,
                              truncation, alpha, width, height, *gen_xy[:4]],
                    [xy_image, gen_gallery, gen_files, gen_results, gen_info], api_name="xy_grid")
    for stop in (gen_stop, mix_stop, dec_stop):
        stop.click(interrupt, None, None, api_name="interrupt" if stop is gen_stop else False)
    prompt.change(count_tokens, [prompt, gen_concepts], token_md, api_name="count_tokens", show_progress="hidden")
    gen_concepts.change(count_tokens, [prompt, gen_concepts], token_md, api_name=False, show_progress="hidden")
    insert_btn.click(add_token, [prompt, gen_concepts], prompt, api_name="insert_token")
    to_generate = [tabs, gen_concepts, prompt, negative, seed, random_seed, gen_steps, guidance, scheduler,
                   truncation, alpha, width, height]
    for gal, results, selected, info, reuse, send, seed_box, random_box in (
            (gen_gallery, gen_results, gen_selected, gen_info, gen_reuse, gen_send, seed, random_seed),
            (mix_gallery, mix_results, mix_selected, mix_info, mix_reuse, mix_send, mix_seed, mix_random)):
        gal.select(select_image, results, [info, selected], api_name=False, show_progress="hidden")
        reuse.click(reuse_seed, selected, [seed_box, random_box], api_name=False)
        send.click(send_to_generate, selected, to_generate, api_name=False)

    mix_common = [mix_geo, mix_app, mix_prompt, mix_layers]
    mix_sampling = [mix_steps, mix_guidance, mix_scheduler]
    mix_outs = [mix_gallery, mix_refs, mix_files, mix_results, mix_info]
    mix_btn.click(mix, [*mix_common, mix_start, mix_seed, mix_random, *mix_sampling], mix_outs, api_name="mix")
    strip_btn.click(mix_strip, [*mix_common, mix_seed, mix_random, *mix_sampling], mix_outs, api_name="mix_strip")
    mix_xy_controls[4].click(mix_xy, [*mix_common, mix_start, mix_seed, mix_random, *mix_sampling,
                                      *mix_xy_controls[:4]],
                             [mix_grid, mix_gallery, mix_files, mix_results, mix_info], api_name="mix_xy_grid")
    for event in (mix_btn.click, strip_btn.click):
        event(lambda: None, None, mix_grid, api_name=False, show_progress="hidden")  # a new result clears the grid
    gr.on([mix_start.change, mix_layers.change], mix_start_text, [mix_start, mix_layers], mix_start_md,
          api_name=False, show_progress="hidden")

    ex_concept.change(concept_card, ex_concept, card, api_name="concept_card")
    library.select(pick_from_library, None, ex_concept, api_name=False)
    dec_btn.click(decompose, [ex_concept, dec_prompt, dec_seed, dec_steps], dec_gallery, api_name="decompose")
    export_btn.click(export_ti, ex_concept, export_file, api_name="export_textual_inversion")
    rename_btn.click(rename_concept, [ex_concept, new_name, gen_concepts, mix_geo, mix_app], [manage_msg, *drops],
                     api_name="rename")
    delete_btn.click(ask_delete, ex_concept, [confirm_row, confirm_md], api_name=False)
    cancel_btn.click(lambda: gr.Row(visible=False), None, confirm_row, api_name=False)
    confirm_btn.click(lambda: gr.Row(visible=False), None, confirm_row, api_name=False).then(
        delete_concept, [ex_concept, gen_concepts, mix_geo, mix_app], [manage_msg, *drops], api_name="delete")
    imp_btn.click(import_checkpoint, [imp_mapper, imp_embeds, imp_name, *pickers], [imp_msg, *drops],
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
    parser.add_argument("--clip", default=None, help="CLIPModel (hub id, cached or local folder) that scores the "
                        "training previews' fidelity and editability (default: the bundled toy CLIP for the bundled "
                        "model; no curve for other models)")
    parser.add_argument("--cache-mb", type=float, default=None, help="memory for cached prompt encodings (default: "
                        "2048 on the CPU, 512 on a GPU; 0: no cache; docs/efficiency.md)")
    parser.add_argument("--offload-cache", action="store_true", help="keep cached encodings in CPU memory")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("neti").setLevel(logging.INFO)
    try:
        cache = None if args.cache_mb is None else int(args.cache_mb * 2**20)
        _studio = Studio(args.model, args.concepts_dir, args.shipped_concepts_dir, device=args.device, clip=args.clip,
                         cache_bytes=cache, offload_cache=args.offload_cache)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    demo.queue(default_concurrency_limit=2).launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD_BYTES,
        allowed_paths=[str(EXAMPLES_DIR)], show_error=True, head=CTRL_ENTER, css=CSS)


if __name__ == "__main__":
    main()
