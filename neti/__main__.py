"""NeTI Studio command line: train, generate, mix, decompose, import and export P* concepts.

Examples:
  python -m neti train --images assets/examples/dotted-crescent --token "<dotted-crescent>" --init-token shape \\
      --steps 500 --out concepts/dotted-crescent.safetensors
  python -m neti generate --concept concepts/dotted-crescent.safetensors --prompt "a photo of a {}" --seeds 0 1 2
  python -m neti mix --geometry a.safetensors --appearance b.safetensors --prompt "a photo of a {}"
  python -m neti info concepts/dotted-crescent.safetensors
  torchrun --nproc_per_node 2 -m neti train ...    (data-parallel; rank 0 writes files and prints)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("neti")


def _model_args(p: argparse.ArgumentParser) -> None:
    from .models import default_model

    p.add_argument("--model", default=default_model(), help="hub id or local diffusers folder (default: bundled)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


# Option names that differ from their config field's name (repeatable tuple fields take one value per use).
_OPTION_NAMES = {"learning_rate": "lr", "use_captions": "captions", "ablations": "ablation", "prompts": "prompt",
                 "seeds": "seed"}


def _config_args(p: argparse.ArgumentParser, cls: type, names: Sequence[str] | None = None, prefix: str = "") -> None:
    """One option per field of the config dataclass `cls` (or the fields `names`): the field's comment is the help,
    its default and choices come from neti/config.py. Unset options keep the dataclass's default."""
    import typing

    from .config import FIELD_CHOICES, field_help

    hints, helps = typing.get_type_hints(cls), field_help(cls)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        kind, name = hints[f.name], prefix + _OPTION_NAMES.get(f.name, f.name)
        flag, text = "--" + name.replace("_", "-"), helps.get(f.name, "")
        default = "" if f.default in (None, "") else f" (default: {', '.join(map(str, f.default)) or 'none'})" \
            if isinstance(f.default, tuple) else f" (default: {f.default})"
        kwargs: dict = dict(dest=prefix + f.name, default=None, help=text + default, metavar=name.upper())
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if kind is bool:  # a switch that turns the field's default over
            flag = flag if f.default is False else "--no-" + flag[2:]
            kwargs.update(action="store_const", const=not f.default,
                          help=("" if f.default is False else "off: ") + text)
            del kwargs["metavar"]
        elif typing.get_origin(kind) is tuple and args[-1] is Ellipsis:  # repeatable
            kwargs.update(action="append", type=args[0])
        elif typing.get_origin(kind) is tuple:
            kwargs.update(nargs=len(args), type=args[0])
        else:
            kwargs.update(type=args[0] if args else kind)
        if f.name in FIELD_CHOICES:
            kwargs.update(choices=FIELD_CHOICES[f.name], metavar=None)
        p.add_argument(flag, **kwargs)


def _config(cls: type, args: argparse.Namespace, names: Sequence[str] | None = None, prefix: str = "", **given):
    """`cls` built from the options `_config_args` added (unset ones keep their defaults) and `given` values."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, prefix + f.name, None) if names is None or f.name in names else None
        if value is not None:
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**{**values, **given})


def _sampling_args(p: argparse.ArgumentParser, seeds: bool = True) -> None:
    from .config import DEFAULT_BYPASS_ALPHA, DEFAULT_HIDDEN_DIM, Sampling

    p.add_argument("--prompt", required=True, help="prompt with {} (or the concept's token) for the concept")
    if seeds:
        p.add_argument("--seeds", type=int, nargs="+", default=[0])
    _config_args(p, Sampling)
    p.add_argument("--truncation", type=_truncation, default=None,
                   help=f"nested-dropout truncation k in 1..{DEFAULT_HIDDEN_DIM}, or 'full' (default: full)")
    p.add_argument("--alpha", type=float, default=DEFAULT_BYPASS_ALPHA, help="textual-bypass strength (0 = off)")
    p.add_argument("--out", default="outputs", help="folder for the PNGs")


def _truncation(text: str) -> int | None:
    """One truncation value, as `neti.mapper.parse_truncations` reads it."""
    from .mapper import parse_truncations

    try:
        values = parse_truncations(text)
    except ValueError as exc:  # argparse shows this message, not a generic "invalid value"
        raise argparse.ArgumentTypeError(str(exc)) from None
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"give one truncation value, got {text!r}")
    return values[0]


def build_parser() -> argparse.ArgumentParser:
    from .generate import DEFAULT_DECOMPOSITION_TIMESTEPS, DEFAULT_GEOMETRY_LAYERS, DEFAULT_MIX_START

    parser = argparse.ArgumentParser(prog="python -m neti", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: progress notes and tracebacks; -vv: debug notes, from every process of a launch")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)

    p = sub.add_parser("generate", help="render a prompt with concepts (or a truncation sweep)")
    _model_args(p)
    p.add_argument("--concept", action="append", default=[], help="concept file (repeatable)")
    _sampling_args(p)
    p.add_argument("--sweep", type=_truncation, nargs="+", default=None,
                   help="truncation values (1..k or 'full'): render a sweep grid")

    p = sub.add_parser("mix", help="style mixing: geometry of one concept, appearance of another")
    _model_args(p)
    p.add_argument("--geometry", required=True)
    p.add_argument("--appearance", required=True)
    p.add_argument("--starts", type=float, nargs="+", default=[float(DEFAULT_MIX_START)],
                   help="mixing start timesteps")
    p.add_argument("--geometry-layers", nargs="+", default=list(DEFAULT_GEOMETRY_LAYERS))
    _sampling_args(p)

    p = sub.add_parser("decompose", help="per-timestep decomposition: M(t, l) at one fixed t for all steps")
    _model_args(p)
    p.add_argument("--concept", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timesteps", type=float, nargs="+", default=list(DEFAULT_DECOMPOSITION_TIMESTEPS))
    _sampling_args(p, seeds=False)

    p = sub.add_parser("import-official", help="convert an official NeTI checkpoint into a concept file")
    p.add_argument("mapper", help="mapper-steps-N.pt")
    p.add_argument("--embeds", default=None, help="learned_embeds-steps-N.bin")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="overwrite an existing file at --out")

    p = sub.add_parser("export", help="export a concept: fp16, truncated, or as a textual-inversion embedding")
    p.add_argument("concept")
    p.add_argument("--out", required=True)
    p.add_argument("--as", dest="kind", choices=["concept", "textual-inversion"], default="concept")
    p.add_argument("--fp16", action="store_true", help="half-precision weights (about half the size)")
    p.add_argument("--keep-units", type=int, default=None, help="keep the first k hidden units (App. B)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file at --out")

    p = sub.add_parser("info", help="print a concept's metadata, parameter count and file size")
    p.add_argument("concept")
    _eval_parser(sub)
    return parser


def _train_parser(sub) -> None:
    from .config import PreviewConfig, TrainConfig

    p = sub.add_parser("train", help="train a concept from a few images")
    _model_args(p)
    p.add_argument("--images", nargs="+", required=True, help="a folder or image files")
    p.add_argument("--token", required=True, help="new placeholder token, e.g. '<my-cat>'")
    p.add_argument("--init-token", "--super-category", dest="super_category", default="object",
                   help="one existing token naming the concept's category (its norm rescales the mapper output)")
    _config_args(p, TrainConfig)
    _config_args(p, PreviewConfig, prefix="preview_")
    p.add_argument("--clip", default=None, help="CLIPModel (hub id or local folder) that scores each preview's "
                   "fidelity and editability (default: the bundled toy CLIP for the bundled model; none otherwise); "
                   "the scores go to the log and to PREVIEWS/scores.json, the concept at each preview step to "
                   "PREVIEWS/step-N.safetensors")
    p.add_argument("--resume", default=None, help="a checkpoint file, a checkpoints folder, or a finished run's "
                   "concept (with more --steps: extends the run exactly)")
    p.add_argument("--out", required=True, help="the concept file to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite an existing concept file at --out")


def _eval_parser(sub) -> None:
    from .config import Sampling
    from .evaluate import EvalConfig

    p = sub.add_parser("eval", help="CLIP image and text similarity of concepts (Textual Inversion's protocol)",
                       description="Render each concept on a prompt set and seeds (cached, resumable), score "
                       "image similarity to its training images and text similarity to the prompt without the "
                       "concept, and write results.json, results.csv and plot.png (NeTI Fig. 9).")
    _model_args(p)
    p.add_argument("--concept", action="append", required=True, help="concept file (repeatable)")
    p.add_argument("--images-for", action="append", default=[], metavar="NAME=FOLDER",
                   help="a concept's training images; NAME is the concept's file stem, path or token (repeatable)")
    p.add_argument("--images", default=None, help="training images for the concepts without --images-for")
    p.add_argument("--label", action="append", default=[], metavar="NAME=LABEL",
                   help="group label (default: method and steps, e.g. 'NeTI 500'); a group's concepts are averaged")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32",
                   help="CLIPModel hub id or local folder (offline: assets/toy-clip, the bundled toy CLIP)")
    p.add_argument("--prompts", default="toy", help="'toy' (the bundled model's words), 'paper' (NeTI's 15) or "
                   "a text file with one prompt per line, {} for the concept")
    p.add_argument("--seeds", type=int, default=len(EvalConfig().seeds), help="number of seeds, 0..N-1 (the paper: 32)")
    p.add_argument("--sweep", type=int, nargs="*", default=[], help="truncation values k for the sweep")
    p.add_argument("--sweep-for", action="append", default=None, metavar="NAME",
                   help="render the sweep for these concepts only (default: every NeTI concept)")
    _config_args(p, Sampling, ("steps", "guidance", "scheduler"))
    _config_args(p, EvalConfig, ("alpha", "batch_size"))
    p.add_argument("--out", default="runs/eval", help="folder for results and the image cache (OUT/cache)")
    p.add_argument("--no-progress", action="store_true")


def _quiet_libraries() -> None:
    """Without -v, a command prints its result and errors only: no library notices or loading bars."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for lib in (diffusers.utils.logging, transformers.utils.logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _generator(args):
    from .generate import Generator
    from .models import load_pipeline

    return Generator(load_pipeline(args.model, args.device), args.model)


def _sampling(args):
    from .config import Sampling

    return _config(Sampling, args)


def _write(result, out: str, stem: str) -> None:
    paths, grid = result.save(out, stem)
    for path in paths + ([grid] if grid is not None else []):
        print(path)


def _same_run(resume: Path, out: Path) -> bool:
    """Whether `--resume` continues the run that writes `out` (its concept or its checkpoints)."""
    from .checkpoints import checkpoint_folder

    resume, out = resume.resolve(), out.resolve()
    checkpoints = checkpoint_folder(out)
    return resume in (out, checkpoints) or resume.parent == checkpoints


def cmd_train(args) -> None:
    from tqdm import tqdm

    from .checkpoints import checkpoint_folder, resumable_checkpoint
    from .concept import check_output_file, check_output_folder
    from .config import PreviewConfig, TrainConfig
    from .data import load_images
    from .images import make_grid, save_png
    from .models import load_pipeline
    from .fidelity import FidelityTracker, default_judge, write_scores
    from .precision import training_weights_dtype
    from .previews import Previews
    from .train import Trainer, TrainingCallback

    out = Path(args.out)  # everything that can be checked is checked before the model loads
    same_run = args.resume is not None and _same_run(Path(args.resume), out)
    check_output_file(out, "concept file", force=args.force or same_run)
    check_output_folder(checkpoint_folder(out), "checkpoints folder")
    preview_folder = out.with_name(out.stem + "-previews")
    if args.preview_every:
        check_output_folder(preview_folder, "previews folder")
    if args.resume is not None:
        resumable_checkpoint(args.resume)
    config, preview_config = _config(TrainConfig, args), _config(PreviewConfig, args, prefix="preview_")
    previews = Previews(args.token, preview_config)  # a preview prompt that cannot render is refused now
    source = args.images[0] if len(args.images) == 1 else args.images
    images = load_images(source)

    class Progress(TrainingCallback):
        bar = None  # made once set-up succeeded, so that set-up errors are the last line

        def on_step(self, info):
            self.bar.n = info.step
            self.bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.learning_rate:.2e}",
                                 s_per_step=f"{info.seconds_per_step:.2f}")

        def on_preview(self, info):
            grid = make_grid(info.images, len(preview_config.prompts), len(preview_config.seeds))
            save_png(grid, preview_folder / f"step-{info.step:06d}.png",
                     {"step": info.step, "prompts": list(preview_config.prompts), "seeds": list(preview_config.seeds),
                      "sampler_steps": preview_config.steps})

    pipe = load_pipeline(args.model, args.device, training_weights_dtype(config.mixed_precision))
    progress = Progress()
    trainer = Trainer(pipe, list(images), args.token, args.super_category, config, args.model, [progress, previews])
    main_process = trainer.is_main_process  # launched on several processes, the others train silently
    if preview_config.every and main_process:  # the concept at every preview step, and its CLIP scores if any
        judge = default_judge(args.model, args.clip)

        def scored(score, best):
            line = (f"step {score.step}: image similarity {score.image_similarity:.4f}, text similarity "
                    f"{score.text_similarity:.4f} (best trade-off so far: step {best})")
            progress.bar.write(line) if progress.bar is not None else print(line)
            write_scores(tracker, preview_folder / "scores.json")

        tracker = FidelityTracker(judge, [im.image for im in images], trainer.concept, preview_folder, scored)
        trainer.callbacks.append(tracker)
    progress.bar = tqdm(total=config.steps, desc=args.token, unit="step",
                        disable=None if main_process else True)  # None: off if not a tty
    try:
        result = trainer.train(out, resume=args.resume)
    except KeyboardInterrupt:
        progress.bar.close()
        if main_process:
            saved = f"the concept so far ({trainer.step} steps) is saved to {out}" if trainer.step else "nothing saved"
            print(f"\ninterrupted: {saved}", file=sys.stderr)
        raise SystemExit(130)
    except BaseException:
        progress.bar.leave = False  # the error, not a stale bar, is the last line
        raise
    finally:
        progress.bar.close()
    if main_process:
        print(f"{result.concept.describe()}\nsaved to {result.path}")


def _load_concepts(paths) -> list:
    from .concept import Concept

    return [Concept.load(p) for p in paths]


def cmd_generate(args) -> None:
    from .concept import check_output_folder

    check_output_folder(args.out)
    concepts = _load_concepts(args.concept)
    gen = _generator(args)
    if args.sweep:
        result = gen.sweep(args.prompt, concepts, args.seeds, args.sweep, _sampling(args), args.alpha)
    else:
        result = gen.generate(args.prompt, concepts, args.seeds, _sampling(args), args.truncation, args.alpha)
    _write(result, args.out, "sweep" if args.sweep else "image")


def cmd_mix(args) -> None:
    from .concept import check_output_folder

    check_output_folder(args.out)
    geometry, appearance = _load_concepts([args.geometry, args.appearance])
    gen = _generator(args)
    result = gen.mix(args.prompt, geometry, appearance, args.seeds, args.starts, args.geometry_layers,
                     _sampling(args), args.truncation, args.alpha)
    _write(result, args.out, "mix")


def cmd_decompose(args) -> None:
    from .concept import check_output_folder

    check_output_folder(args.out)
    concepts = _load_concepts([args.concept])
    gen = _generator(args)
    result = gen.decompose(args.prompt, concepts, args.seed, args.timesteps, _sampling(args), args.truncation,
                           args.alpha)
    _write(result, args.out, "decompose")


def cmd_import(args) -> None:
    from .concept import check_output_file, import_official

    check_output_file(args.out, force=args.force)
    concept = import_official(args.mapper, args.embeds)
    concept.save(args.out)
    print(f"{concept.describe()}\nsaved to {args.out}")


def cmd_export(args) -> None:
    import torch

    from .concept import Concept, check_output_file, export_textual_inversion

    check_output_file(args.out, force=args.force)
    concept = Concept.load(args.concept)
    if args.keep_units is not None:
        concept = concept.truncated(args.keep_units)
    if args.kind == "textual-inversion":
        export_textual_inversion(concept, args.out)
    else:
        concept.save(args.out, dtype=torch.float16 if args.fp16 else torch.float32)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size:,} bytes)")


def cmd_info(args) -> None:
    from .concept import file_info

    print(json.dumps(file_info(args.concept), indent=2))


def cmd_eval(args) -> None:
    from . import evaluate as ev
    from .config import Sampling
    from .models import resolve_device

    if args.seeds < 1:
        raise ValueError(f"--seeds is a count and must be >= 1, got {args.seeds}")
    entries = ev.build_entries(args.concept, ev.parse_assignments(args.images_for, "--images-for"), args.images,
                               ev.parse_assignments(args.label, "--label"), args.sweep_for)
    config = _config(ev.EvalConfig, args, ("alpha", "batch_size"), prompts=ev.load_prompts(args.prompts),
                     seeds=tuple(range(args.seeds)), sweep=tuple(args.sweep), sampling=_config(Sampling, args))
    judge = ev.ClipJudge.load(args.clip, device=resolve_device(args.device))
    report = ev.evaluate(_generator(args), entries, judge, config, Path(args.out) / "cache",
                         progress=not args.no_progress)
    paths = ev.write_outputs(report, args.out)
    print(ev.format_table(report.groups))
    print(f"{report.generated} images generated, the rest from the cache")
    for path in paths.values():
        print(path)


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "mix": cmd_mix, "decompose": cmd_decompose,
            "import-official": cmd_import, "export": cmd_export, "info": cmd_info,
            "eval": cmd_eval}


def _process_rank() -> int:
    """This process's global rank when a launcher (torchrun, accelerate launch, mpirun) started several, else 0 (the
    `Trainer` knows it from its accelerator; logging is set up before there is one)."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK"):  # accelerate's names
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


USER_ERRORS = (ValueError, OSError, ImportError)  # bad input, files, a missing optional package: one line, exit 2


def main(argv: list[str] | None = None) -> int:
    """Run a command. Errors in what the user gave print one line and exit 2; unexpected ones print one line and
    exit 1, or their traceback with -v."""
    from .concept import one_line

    args = build_parser().parse_args(argv)
    rank = _process_rank()
    others = rank > 0 and args.verbose < 2  # a launch's other processes print errors only, unless -vv
    quiet = not args.verbose or others
    logging.basicConfig(level=logging.ERROR if others else logging.INFO if args.verbose else logging.WARNING,
                        format=(f"[rank {rank}] " if rank else "") + "%(levelname)s %(message)s")
    if args.verbose >= 2:
        logger.setLevel(logging.DEBUG)  # NeTI's debug notes, not every library's
    try:
        with warnings.catch_warnings():
            if quiet:  # the libraries' own notices (optional back ends, deprecations) are not the user's
                warnings.simplefilter("ignore")
                if args.command not in ("info", "export", "import-official"):
                    _quiet_libraries()
            COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.verbose:
            raise
        print(f"error: unexpected {type(exc).__name__}: {one_line(exc)} (rerun with -v for the traceback)",
              file=sys.stderr)
        return 1
    return 0



if __name__ == "__main__":
    sys.exit(main())
