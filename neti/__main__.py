"""NeTI Studio command line: train, generate, mix, decompose, import and export P* concepts.

Examples:
  python -m neti train --images assets/examples/dotted-crescent --token "<dotted-crescent>" --init-token shape \\
      --steps 500 --out concepts/dotted-crescent.safetensors
  python -m neti generate --concept concepts/dotted-crescent.safetensors --prompt "a photo of a {}" --seeds 0 1 2
  python -m neti mix --geometry a.safetensors --appearance b.safetensors --prompt "a photo of a {}"
  python -m neti info concepts/dotted-crescent.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

logger = logging.getLogger("neti")


def _model_args(p: argparse.ArgumentParser) -> None:
    from .models import default_model

    p.add_argument("--model", default=default_model(), help="hub id or local diffusers folder (default: bundled)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def _sampling_args(p: argparse.ArgumentParser, seeds: bool = True) -> None:
    from .config import DEFAULT_BYPASS_ALPHA, DEFAULT_HIDDEN_DIM
    from .generate import SCHEDULERS

    p.add_argument("--prompt", required=True, help="prompt with {} (or the concept's token) for the concept")
    p.add_argument("--negative-prompt", default="")
    if seeds:
        p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default="dpm")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--truncation", type=int, default=None,
                   help=f"nested-dropout truncation k in 1..{DEFAULT_HIDDEN_DIM}")
    p.add_argument("--alpha", type=float, default=DEFAULT_BYPASS_ALPHA, help="textual-bypass strength (0 = off)")
    p.add_argument("--out", default="outputs", help="folder for the PNGs")


def build_parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_BYPASS_ALPHA

    parser = argparse.ArgumentParser(prog="python -m neti", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    from .precision import DEFAULT_MIXED_PRECISION, MIXED_PRECISION

    p = sub.add_parser("train", help="train a concept from a few images")
    _model_args(p)
    p.add_argument("--images", nargs="+", required=True, help="a folder or image files")
    p.add_argument("--token", required=True, help="new placeholder token, e.g. '<my-cat>'")
    p.add_argument("--init-token", "--super-category", dest="super_category", default="object",
                   help="one existing token naming the concept's category (its norm rescales the mapper output)")
    p.add_argument("--method", choices=["neti", "xti", "ti"], default="neti")
    p.add_argument("--ablation", action="append", default=[], help="no_positional_encoding, no_nested_dropout, "
                   "no_bypass, no_rescaling, time_only, space_only (repeatable)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default per method, then scaled)")
    p.add_argument("--no-scale-lr", action="store_true", help="do not multiply lr by batch x accumulation")
    p.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warm-up, then constant (default 0)")
    p.add_argument("--templates", choices=["object", "style"], default="object")
    p.add_argument("--no-captions", action="store_true", help="ignore the images' own captions (a sidecar "
                   "NAME.txt or PNG 'caption' chunk, e.g. 'a {} on a white background'): random templates only")
    p.add_argument("--resolution", type=int, default=None, help="training resolution (default: the model's)")
    p.add_argument("--crop", choices=["center", "random"], default="center", help="how images are cropped square")
    p.add_argument("--flip-p", type=float, default=0.5, help="probability of a horizontal flip (0 for text, logos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=DEFAULT_MIXED_PRECISION,
                   help="auto: follow the weights (fp16 on CUDA, trained with loss scaling); no: fp32 weights")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--keep-checkpoints", type=int, default=3)
    p.add_argument("--preview-every", type=int, default=0, help="steps between preview grids (0: none)")
    p.add_argument("--preview-prompt", action="append", default=None, help="repeatable; default 'a photo of a {}'")
    p.add_argument("--preview-seed", type=int, action="append", default=None, help="repeatable; default 0 and 1")
    p.add_argument("--preview-steps", type=int, default=20, help="sampler steps of each preview")
    p.add_argument("--resume", default=None, help="a checkpoint file, a checkpoints folder, or a finished run's "
                   "concept (with more --steps: extends the run exactly)")
    p.add_argument("--out", required=True, help="the concept file to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite an existing concept file at --out")

    p = sub.add_parser("generate", help="render a prompt with concepts (or a truncation sweep)")
    _model_args(p)
    p.add_argument("--concept", action="append", default=[], help="concept file (repeatable)")
    _sampling_args(p)
    p.add_argument("--sweep", type=int, nargs="+", default=None, help="truncation values: render a sweep grid")

    p = sub.add_parser("mix", help="style mixing: geometry of one concept, appearance of another")
    _model_args(p)
    p.add_argument("--geometry", required=True)
    p.add_argument("--appearance", required=True)
    p.add_argument("--starts", type=float, nargs="+", default=[700.0], help="mixing start timesteps")
    p.add_argument("--geometry-layers", nargs="+", default=["IN07", "IN08", "MID"])
    _sampling_args(p)

    p = sub.add_parser("decompose", help="per-timestep decomposition: M(t, l) at one fixed t for all steps")
    _model_args(p)
    p.add_argument("--concept", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timesteps", type=float, nargs="+", default=[999, 800, 600, 400, 200, 0])
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
    p.add_argument("--seeds", type=int, default=8, help="number of seeds, 0..N-1 (the paper: 32)")
    p.add_argument("--sweep", type=int, nargs="*", default=[], help="truncation values k for the sweep")
    p.add_argument("--sweep-for", action="append", default=None, metavar="NAME",
                   help="render the sweep for these concepts only (default: every NeTI concept)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="dpm")
    p.add_argument("--alpha", type=float, default=DEFAULT_BYPASS_ALPHA, help="textual-bypass strength (0 = off)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generator call")
    p.add_argument("--out", default="runs/eval", help="folder for results and the image cache (OUT/cache)")
    p.add_argument("--no-progress", action="store_true")
    return parser


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
    from .generate import Sampling

    return Sampling(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                    negative_prompt=args.negative_prompt, height=args.height, width=args.width)


def _write(result, out: str, stem: str) -> None:
    paths, grid = result.save(out, stem)
    for path in paths + ([grid] if grid is not None else []):
        print(path)


def _same_run(resume: Path, out: Path) -> bool:
    """Whether `--resume` continues the run that writes `out` (its concept or its checkpoints)."""
    resume, out = resume.resolve(), out.resolve()
    checkpoints = out.with_name(out.stem + "-checkpoints")
    return resume in (out, checkpoints) or resume.parent == checkpoints


def cmd_train(args) -> None:
    from tqdm import tqdm

    from .concept import check_output_file, check_output_folder
    from .data import load_images
    from .images import make_grid, save_png
    from .models import load_pipeline
    from .precision import training_weights_dtype
    from .train import TrainConfig, Trainer, TrainingCallback, resumable_checkpoint

    out = Path(args.out)  # everything that can be checked is checked before the model loads
    same_run = args.resume is not None and _same_run(Path(args.resume), out)
    check_output_file(out, "concept file", force=args.force or same_run)
    check_output_folder(out.with_name(out.stem + "-checkpoints"), "checkpoints folder")
    previews = out.with_name(out.stem + "-previews")
    if args.preview_every:
        check_output_folder(previews, "previews folder")
    if args.resume is not None:
        resumable_checkpoint(args.resume)
    source = args.images[0] if len(args.images) == 1 else args.images
    images = load_images(source)
    config = TrainConfig(
        method=args.method, ablations=tuple(args.ablation), steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, learning_rate=args.lr, scale_lr=not args.no_scale_lr, templates=args.templates,
        use_captions=not args.no_captions,
        lr_warmup_steps=args.lr_warmup_steps, resolution=args.resolution, crop=args.crop, flip_p=args.flip_p,
        preview_steps=args.preview_steps, seed=args.seed, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        preview_every=args.preview_every, preview_prompts=tuple(args.preview_prompt or ["a photo of a {}"]),
        preview_seeds=tuple(args.preview_seed or [0, 1]),
    )

    class Progress(TrainingCallback):
        bar = None  # made once set-up succeeded, so that set-up errors are the last line

        def on_step(self, info):
            self.bar.n = info.step
            self.bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.learning_rate:.2e}",
                                 s_per_step=f"{info.seconds_per_step:.2f}")

        def on_preview(self, info):
            grid = make_grid(info.images, len(config.preview_prompts), len(config.preview_seeds))
            save_png(grid, previews / f"step-{info.step:06d}.png",
                     {"step": info.step, "prompts": list(config.preview_prompts), "seeds": list(config.preview_seeds)})

    pipe = load_pipeline(args.model, args.device, training_weights_dtype(args.mixed_precision))
    progress = Progress()
    trainer = Trainer(pipe, list(images), args.token, args.super_category, config, args.model, [progress])
    progress.bar = tqdm(total=config.steps, desc=args.token, unit="step", disable=None)  # None: off if not a tty
    try:
        result = trainer.train(out, resume=args.resume)
    except KeyboardInterrupt:
        progress.bar.close()
        saved = f"the concept so far ({trainer.step} steps) is saved to {out}" if trainer.step else "nothing saved"
        print(f"\ninterrupted: {saved}", file=sys.stderr)
        raise SystemExit(130)
    except BaseException:
        progress.bar.leave = False  # the error, not a stale bar, is the last line
        raise
    finally:
        progress.bar.close()
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
    from .generate import Sampling
    from .models import resolve_device

    if args.seeds < 1:
        raise ValueError(f"--seeds is a count and must be >= 1, got {args.seeds}")
    entries = ev.build_entries(args.concept, ev.parse_assignments(args.images_for, "--images-for"), args.images,
                               ev.parse_assignments(args.label, "--label"), args.sweep_for)
    config = ev.EvalConfig(prompts=ev.load_prompts(args.prompts), seeds=tuple(range(args.seeds)),
                           sweep=tuple(args.sweep), alpha=args.alpha, batch_size=args.batch_size,
                           sampling=Sampling(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler))
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


USER_ERRORS = (ValueError, OSError, ImportError)  # bad input, files, a missing optional package: one line, exit 2


def main(argv: list[str] | None = None) -> int:
    """Run a command. Errors in what the user gave print one line and exit 2; unexpected ones print one line and
    exit 1, or their traceback with -v."""
    from .concept import one_line

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        with warnings.catch_warnings():
            if not args.verbose:  # the libraries' own notices (optional back ends, deprecations) are not the user's
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
