"""Training checkpoints: the concept file format plus the state that makes a resume exact (NeTI Sec. 4, App. A).

A checkpoint is one safetensors file, `<out>-checkpoints/checkpoint-<step>.safetensors`: the concept's tensors and
metadata exactly as `Concept.save` writes them (so a checkpoint is itself a loadable concept), plus the optimiser's
moments as tensors, the torch random state, and a JSON `training_state` entry (step, `TrainConfig`, optimiser
parameter groups, learning-rate schedule, Python random state). Writes are atomic (temp file + rename); loading
never unpickles. The step is read from the metadata, never parsed from the file name.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from .concept import Concept, atomic_write, mapper_weights, one_line, read_header, read_tensors
from .config import TrainConfig

logger = logging.getLogger(__name__)


def checkpoint_folder(out_path: str | Path) -> Path:
    """Where the checkpoints of the run that writes the concept `out_path` live."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + "-checkpoints")


def checkpoint_path(out_path: str | Path, step: int) -> Path:
    """Where the run that writes the concept `out_path` keeps its checkpoint of `step`."""
    return checkpoint_folder(out_path) / f"checkpoint-{step:06d}.safetensors"


def save_checkpoint(out_path: str | Path, concept: Concept, optimizer, lr_scheduler, config: TrainConfig,
                    step: int) -> Path:
    """Write the checkpoint of `step` atomically and prune all but the newest `config.keep_checkpoints`."""
    folder, path = checkpoint_folder(out_path), checkpoint_path(out_path, step)
    tensors = {f"mapper.{k}": v.detach().cpu().contiguous() for k, v in concept.mapper.state_dict().items()}
    optim_state = optimizer.state_dict()
    for index, state in optim_state["state"].items():
        for name, value in state.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = concept.metadata()
    meta["training_state"] = json.dumps({
        "step": step, "train_config": config.to_json(), "param_groups": optim_state["param_groups"],
        "lr_scheduler": lr_scheduler.state_dict(), "python_random": _jsonable(random.getstate()),
    })
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    for old in sorted(folder.glob("checkpoint-*.safetensors"))[: -config.keep_checkpoints]:
        old.unlink(missing_ok=True)
    return path


def restore_weights(path: str | Path, concept: Concept) -> tuple[int, dict[str, torch.Tensor]]:
    """Put a checkpoint's mapper weights and step into `concept`; returns (step, all the file's tensors)."""
    tensors = read_tensors(path)
    try:
        concept.mapper.load_state_dict(mapper_weights(tensors))
    except RuntimeError as exc:
        raise ValueError(f"{str(path)!r} does not fit this run's mapper ({one_line(exc)}); resume with the "
                         "settings it was trained with (method, ablations)") from None
    concept.train_steps = int(read_header(path)[0].get("train_steps", "0"))
    return concept.train_steps, tensors


def resume(path: str | Path, concept: Concept, optimizer, lr_scheduler, config: TrainConfig) -> tuple[Path, int]:
    """Restore weights, optimiser, schedule and random states from a checkpoint (or a folder of them, or a
    finished run's concept file) for a run with `config`; returns (the checkpoint read, its step)."""
    path = resumable_checkpoint(path)
    meta, _ = read_header(path)
    try:
        state = json.loads(meta["training_state"])
        saved = TrainConfig.from_json(state["train_config"])
        step, param_groups, scheduler_state = int(state["step"]), state["param_groups"], state["lr_scheduler"]
        python_random = _from_jsonable(state["python_random"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} has a damaged training state ({one_line(exc)}); resume from another "
                         "checkpoint") from None
    if step >= config.steps:
        raise ValueError(f"{str(path)!r} is already at step {step} and steps is {config.steps}: nothing to "
                         f"train; give more steps (e.g. --steps {step + config.steps}) to extend the run")
    if (saved.method, saved.ablations) != (config.method, config.ablations):
        raise ValueError(f"{str(path)!r} was trained with method {saved.method!r} and ablations "
                         f"{list(saved.ablations)}, this run uses {config.method!r} and {list(config.ablations)}; "
                         "resume with the same method and ablations")
    if _weights_settings(saved) != _weights_settings(config):
        logger.warning("resuming with settings that differ from the checkpoint's; the run will not be identical "
                       "to an uninterrupted one")
    _, tensors = restore_weights(path, concept)
    optim_state: dict = {"state": {}, "param_groups": param_groups}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optim_state["state"].setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict(optim_state)
        lr_scheduler.load_state_dict(scheduler_state)
        torch.set_rng_state(tensors["rng.torch"])
        random.setstate(python_random)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{str(path)!r} has a damaged optimiser or random state ({one_line(exc)}); resume from "
                         "another checkpoint") from None
    concept.train_steps = step
    return path, step


def _weights_settings(config: TrainConfig) -> TrainConfig:
    """`config` without the settings that do not change the weights (steps, checkpoints)."""
    return replace(config, steps=1, checkpoint_every=0, keep_checkpoints=1)


def checkpoint_step(path: Path) -> int | None:
    """The step of a training checkpoint (from its metadata); None for an unreadable file or a plain concept."""
    try:
        meta, _ = read_header(path)
        return int(json.loads(meta["training_state"])["step"])
    except (KeyError, TypeError, ValueError):
        return None


def latest_checkpoint(path: str | Path) -> Path:
    """`path` itself, or the checkpoint with the highest step (read from metadata) in a folder."""
    path = Path(path)
    if path.is_dir():
        candidates = []
        for file in path.glob("*.safetensors"):
            step = checkpoint_step(file)
            if step is None:
                logger.warning("ignoring %s: not a readable training checkpoint", file)
            else:
                candidates.append((step, file))
        if not candidates:
            raise FileNotFoundError(f"no training checkpoint in {str(path)!r}")
        return max(candidates)[1]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


def resumable_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: `latest_checkpoint(path)`, or for a finished run's concept file the
    checkpoint of its '*-checkpoints' folder at the concept's step with the same weights."""
    path = latest_checkpoint(path)
    meta, _ = read_header(path)
    if "training_state" in meta:
        return path
    folder = checkpoint_folder(path)
    steps = meta.get("train_steps", "?")
    if folder.is_dir():
        concept = Concept.load(path)
        for file in sorted(folder.glob("*.safetensors")):
            if str(checkpoint_step(file)) == steps:
                weights = {k: v.float() for k, v in mapper_weights(read_tensors(file)).items()}
                if all(torch.equal(weights[k], v) for k, v in concept.mapper.state_dict().items() if k in weights):
                    return file
    raise ValueError(f"{str(path)!r} is a concept but not a training checkpoint (no optimiser state), and "
                     f"{str(folder)!r} holds no checkpoint of it at step {steps}; resume from a file in the "
                     "'*-checkpoints' folder (runs trained with checkpoints on can be extended)")


def _jsonable(state):
    return [_jsonable(x) for x in state] if isinstance(state, (tuple, list)) else state


def _from_jsonable(state):
    return tuple(_from_jsonable(x) for x in state) if isinstance(state, list) else state
