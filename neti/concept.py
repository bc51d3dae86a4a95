"""Concept files: one safetensors file per concept, and import/export of other formats (NeTI Sec. 3, App. B).

A concept file holds the representation's weights (the NeTI mapper, Fourier frequencies included, or the
baselines' vectors) and JSON metadata: format version, method, token, super-category and its norm, token width,
layer names, base model, training steps and the full `MapperConfig`, from which the concept rebuilds itself.
Loading never unpickles. Writes are atomic (temp file + rename). A truncated export keeps the first k hidden
units, which nested dropout ordered by importance (App. B). Official NeTI checkpoints (torch pickles) are read
with `torch.load(weights_only=True)` and a stand-in for their pickled encoder class (their layout:
docs/method.md "Official checkpoint format").
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .conditioning import TextConditioner, check_placeholder_token, check_token_text, super_category_id
from .config import MapperConfig
from .layers import cross_attention_layers
from .mapper import MapperOutput, build_mapper, count_parameters
from .models import is_xl

logger = logging.getLogger(__name__)

FORMAT = "neti-studio-concept"
FORMAT_VERSION = 1
_UIDS = itertools.count()
_UMASK = os.umask(0o022)  # read once at import (setting it is process-wide), then restored
os.umask(_UMASK)
MAX_NAME_BYTES = 255  # the longest file name common file systems take


def _check_names(path: Path, what: str) -> None:
    for part in path.parts:
        if "\x00" in part:
            raise ValueError(f"{what} {str(path)!r} contains a NUL character; choose a plain file name")
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise ValueError(f"{what} name {part[:40]!r}... is {len(os.fsencode(part))} bytes long, over the "
                             f"{MAX_NAME_BYTES} a file name may have; choose a shorter name")


def _check_parent(folder: Path, what: str, path: Path) -> None:
    """The nearest existing ancestor of `folder` must be a writable folder (missing ones are created later)."""
    for ancestor in (folder, *folder.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ValueError(f"{what} {str(path)!r} cannot be written: {str(ancestor)!r} is a file, not a "
                                 "folder; choose another location")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise ValueError(f"{what} {str(path)!r} cannot be written: no permission to write in "
                                 f"{str(ancestor)!r}; choose another location")
            return


def check_output_file(path: str | os.PathLike, what: str = "output file", force: bool = False) -> Path:
    """Refuse, before any work, an output file that cannot be written: an existing folder, a name too long, a
    parent that is a file, or an existing file when not `force` (missing parent folders are created on write)."""
    path = Path(path)
    _check_names(path, what)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is an existing folder; give a file name inside it, e.g. "
                         f"{str(path / 'concept.safetensors')!r}")
    _check_parent(path.parent, what, path)
    if path.exists() and not force:
        raise ValueError(f"{what} {str(path)!r} already exists; choose another name, or pass --force to "
                         "overwrite it")
    return path


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse, before any work, an output folder that is an existing file or lies below one."""
    path = Path(path)
    _check_names(path, what)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is an existing file, not a folder; give a folder name")
    _check_parent(path, what, path)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(temp_path)` then rename onto `path`, so a reader never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp (and some writers) make owner-only files; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class Concept(nn.Module):
    """A learned concept: its token, super-category, config and mapper. Call it like the mapper."""

    def __init__(self, token: str, super_category: str, config: MapperConfig, layer_names: Sequence[str] = (),
                 base_model: str = "", train_steps: int = 0):
        super().__init__()
        self.token = token
        self.super_category = super_category
        self.config = config
        self.layer_names = tuple(layer_names)
        self.base_model = base_model
        self.train_steps = train_steps
        self.mapper = build_mapper(config)
        self.uid = next(_UIDS)  # never reused, unlike id(): keys the conditioning cache

    @classmethod
    def for_pipeline(cls, pipe, token: str, super_category: str, config: MapperConfig = MapperConfig(),
                     model_name: str = "") -> "Concept":
        """A new, untrained concept for `pipe`: `config` with the model's token width, its cross-attention layers
        and the super-category token's norm filled in; the baselines' vectors start at that token's embedding.
        On SDXL the width is both encoders' (768 + 1280), each with its own super-category norm, and the mapper
        gains the virtual pooled layer (conditioning_xl.py)."""
        pairs = [(pipe.tokenizer, pipe.text_encoder)] + ([(pipe.tokenizer_2, pipe.text_encoder_2)] if is_xl(pipe) else [])
        embeddings = []
        for tokenizer, text_encoder in pairs:
            check_placeholder_token(tokenizer, token)
            embeddings.append(TextConditioner(tokenizer, text_encoder).embedding_of(
                super_category_id(tokenizer, super_category)).float().cpu())
        embedding = torch.cat(embeddings)
        layers = cross_attention_layers(pipe.unet)
        config = replace(config, token_dim=embedding.numel(), num_layers=len(layers),
                         target_norm=float(embedding.norm()))
        if len(pairs) > 1:
            config = replace(config, token_widths=tuple(e.numel() for e in embeddings),
                             target_norms=tuple(float(e.norm()) for e in embeddings), pooled_layer=True)
        concept = cls(token, super_category, config, [x.name for x in layers], model_name)
        if config.method != "neti":
            concept.mapper.initialize(embedding)
        return concept

    def forward(self, t: torch.Tensor, l: torch.Tensor, truncation: int | None = None) -> MapperOutput:
        return self.mapper(t, l, truncation)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def depends_on_time(self) -> bool:
        return self.config.method == "neti" and self.config.use_time

    @property
    def depends_on_layer(self) -> bool:
        return self.config.method == "xti" or (self.config.method == "neti" and self.config.use_layer)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.mapper)

    def metadata(self) -> dict[str, str]:
        cfg = self.config
        return {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "method": cfg.method, "token": self.token,
            "super_category": self.super_category, "target_norm": json.dumps(cfg.target_norm),
            "token_dim": str(cfg.token_dim), "token_widths": json.dumps(list(cfg.widths)),
            "num_layers": str(cfg.num_layers),
            "layer_names": json.dumps(list(self.layer_names)), "base_model": self.base_model,
            "train_steps": str(self.train_steps), "num_parameters": str(self.num_parameters),
            "config": cfg.to_json(),
        }

    def describe(self) -> str:
        """One line for logs and the app: who this concept is and what made it."""
        width = "+".join(map(str, self.config.widths))  # SDXL: 768+1280
        return (f"{self.token} ({self.method}, super-category '{self.super_category}', {self.train_steps} steps, "
                f"{self.num_parameters:,} parameters, D={width}, L={self.config.num_layers})")

    def fits(self, token_dim: int, num_layers: int, token_widths: Sequence[int] | None = None) -> bool:
        """Whether the concept fits a model of this token width (and, given, these encoder widths) and number of
        cross-attention layers."""
        widths = tuple(token_widths) if token_widths else (token_dim,)
        return (self.config.token_dim, self.config.num_layers, self.config.widths) == (token_dim, num_layers, widths)

    def check_compatible(self, token_dim: int, num_layers: int, model_name: str = "this model",
                         token_widths: Sequence[int] | None = None) -> None:
        """Refuse a concept made for another token width or layer count, naming the model it was made for."""
        if not self.fits(token_dim, num_layers, token_widths):
            made_for = f" ({self.base_model})" if self.base_model else ""
            mine = " + ".join(map(str, self.config.widths))
            theirs = " + ".join(map(str, token_widths)) if token_widths else str(token_dim)
            raise ValueError(
                f"concept {self.token} was made for a model with token width {mine} and "
                f"{self.config.num_layers} cross-attention layers{made_for}, but {model_name} has width {theirs} "
                f"and {num_layers} layers; load the base model it was trained on"
            )

    def truncated(self, keep_units: int) -> "Concept":
        """A smaller concept whose output layer reads only the first `keep_units` hidden units (App. B)."""
        if self.method != "neti":
            raise ValueError(f"only NeTI concepts have hidden units to truncate; {self.token} is {self.method}")
        if not 1 <= keep_units <= self.config.kept_units:
            raise ValueError(f"keep_units must be in 1..{self.config.kept_units}, got {keep_units}")
        small = Concept(self.token, self.super_category, replace(self.config, kept_units=keep_units),
                        self.layer_names, self.base_model, self.train_steps)
        state = {k: v.clone() for k, v in self.mapper.state_dict().items()}
        state["output_layer.weight"] = state["output_layer.weight"][:, :keep_units].contiguous()
        small.mapper.load_state_dict(state)
        return small.train(self.training)

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
        """Write the concept atomically as one safetensors file (fp32, or fp16 at about half the size)."""
        tensors = {f"mapper.{k}": v.detach().to("cpu", torch.float32 if k == "encoding.frequencies" else dtype)
                   .contiguous() for k, v in self.mapper.state_dict().items()}  # frequencies stay exact
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=self.metadata()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Concept":
        """Read a concept file written by `save` (no pickle is ever involved).

        Every metadata field is checked, and the tensors' shapes against the mapper the config describes (built
        on the meta device, so a config that claims a huge mapper allocates nothing) before anything is read."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"concept file {str(path)!r} does not exist")
        meta, shapes = read_header(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is a safetensors file but not a NeTI Studio concept (no '{FORMAT}' "
                             "metadata); plain textual-inversion embeddings cannot be loaded as concepts")
        try:
            if int(meta.get("format_version", "0")) > FORMAT_VERSION:
                raise ValueError(f"{str(path)!r} has format version {meta['format_version']}, newer than this "
                                 f"NeTI Studio reads ({FORMAT_VERSION}); upgrade NeTI Studio")
            config = MapperConfig.from_json(meta["config"])
            layer_names = json.loads(meta.get("layer_names", "[]"))
            if not isinstance(layer_names, list) or not all(isinstance(x, str) for x in layer_names):
                raise ValueError("layer_names is not a list of names")
            token, steps = check_token_text(meta["token"]), int(meta.get("train_steps", "0"))
            if steps < 0:
                raise ValueError(f"train_steps is {steps}")
            with torch.device("meta"):  # expected shapes, nothing allocated
                expected = {f"mapper.{k}": tuple(v.shape) for k, v in build_mapper(config).state_dict().items()}
        except KeyError as exc:
            raise ValueError(f"{str(path)!r} is a concept file without its {exc.args[0]!r} metadata; it was not "
                             "written by NeTI Studio or was edited: re-export it") from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{str(path)!r} has unreadable concept metadata ({one_line(exc)}); re-export it") from None
        found = {k: v for k, v in shapes.items() if k.startswith("mapper.")}
        if found != expected:
            differ = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
            raise ValueError(f"{str(path)!r} does not match its own config: its tensors disagree with the metadata "
                             f"at {differ[0]!r} ({found.get(differ[0])} in the file, {expected.get(differ[0])} "
                             "expected); the file was edited or damaged: re-export it")
        tensors = read_tensors(path)
        state = {k: v.float() for k, v in mapper_weights(tensors).items()}
        bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"{str(path)!r} holds non-finite weights (NaN or infinity) in {bad[0]!r}: the "
                             "training that wrote it diverged; use an earlier checkpoint or train again")
        concept = cls(token, meta.get("super_category", ""), config, layer_names, meta.get("base_model", ""), steps)
        concept.mapper.load_state_dict(state)
        return concept.eval()


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (libraries' messages may span several), for errors shown to users."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """A safetensors file's metadata and tensor shapes, read from its header alone (nothing is unpickled)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{str(path)!r} is not a readable concept file ({one_line(exc)}); it may be truncated or not a "
            "safetensors file: re-export it, or import official NeTI checkpoints with `import-official`"
        ) from None


def mapper_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mapper's state dict inside a concept file's or a checkpoint's tensors (keys 'mapper.*')."""
    return {k.removeprefix("mapper."): v for k, v in tensors.items() if k.startswith("mapper.")}


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{str(path)!r} is damaged: its tensors cannot be read ({one_line(exc)}); "
                         "re-export it") from None


def file_info(path: str | os.PathLike) -> dict:
    """A concept file's metadata, parameter count and size, for `neti info` and the app's concept card."""
    concept = Concept.load(path)
    info = {k: v for k, v in concept.metadata().items() if k != "config"}
    info["config"] = json.loads(concept.config.to_json())
    info["file_size_bytes"] = Path(path).stat().st_size
    info["path"] = str(path)
    return info


# ---- official NeTI checkpoints -------------------------------------------------------------------------------

class _PickledEncoder:
    """Stand-in for the official `NeTIPositionalEncoding` object: only its attributes are kept, nothing runs."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


_OFFICIAL_KEYS = {
    "input_layer.": "input_layer.", "net.0.": "input_layer.", "net.1.": "hidden.0.", "net.2.": "hidden.1.",
    "net.4.": "hidden.3.", "net.5.": "hidden.4.", "output_layer.0.": "output_layer.",
}


def _load_official_pickle(path: Path) -> dict:
    allowed = [(_PickledEncoder, "models.positional_encoding.NeTIPositionalEncoding"),
               (_PickledEncoder, "models.positional_encoding.BasicEncoder")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # the unpickler raises many types; all mean "not a checkpoint we can read safely"
        raise ValueError(f"{str(path)!r} is not an official NeTI mapper checkpoint that loads safely: it is not a "
                         "PyTorch file, or it holds objects other than weights (only weights are loaded, never "
                         "code); give the mapper-steps-N.pt and learned_embeds-steps-N.bin the official code wrote"
                         ) from None


def import_official(mapper_path: str | os.PathLike, embeds_path: str | os.PathLike | None = None,
                    layer_names: Sequence[str] = ()) -> Concept:
    """Convert an official `mapper-steps-N.pt` (+ optional `learned_embeds-steps-N.bin`) into a `Concept`."""
    mapper_path = Path(mapper_path)
    if not mapper_path.is_file():
        raise FileNotFoundError(f"official checkpoint {str(mapper_path)!r} does not exist")
    ckpt = _load_official_pickle(mapper_path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "cfg" not in ckpt:
        raise ValueError(f"{str(mapper_path)!r} has no 'state_dict' and 'cfg': is it a mapper-steps-N.pt file?")
    cfg, source = ckpt["cfg"], ckpt["state_dict"]
    if not isinstance(cfg, dict) or not isinstance(source, dict):
        raise ValueError(f"{str(mapper_path)!r} has a 'state_dict' or 'cfg' that is not a dictionary: is it a "
                         "mapper-steps-N.pt file?")
    model_cfg, data_cfg = dict(cfg.get("model", {}) or {}), dict(cfg.get("data", {}) or {})
    state = {}
    for key, value in source.items():
        for old, new in _OFFICIAL_KEYS.items():
            if isinstance(key, str) and key.startswith(old) and isinstance(value, torch.Tensor):
                state[new + key[len(old):]] = value.float()
                break
    missing = [k for k in ("input_layer.weight", "output_layer.weight") if k not in state]
    if missing:
        raise ValueError(f"{str(mapper_path)!r} has no mapper weights ({missing[0]!r}, official name "
                         f"'net.0.weight' / 'output_layer.0.weight', is missing; found {len(source)} other keys): "
                         "is it a NeTI mapper-steps-N.pt file?")
    use_pe = bool(model_cfg.get("use_positional_encoding", True))
    bypass = bool(model_cfg.get("output_bypass", True))
    out_dim = state["output_layer.weight"].shape[0]
    token_dim = out_dim // 2 if bypass else out_dim
    anchors = int(model_cfg.get("num_pe_time_anchors", 10))
    sigmas = dict(model_cfg.get("pe_sigmas", {}) or {})
    config_kwargs = dict(
        method="neti", token_dim=token_dim, use_positional_encoding=use_pe, use_bypass=bypass,
        use_nested_dropout=bool(model_cfg.get("use_nested_dropout", True)),
        nested_dropout_prob=float(model_cfg.get("nested_dropout_prob", 0.5)),
        num_time_anchors=anchors, sigma_t=float(sigmas.get("sigma_t", 0.03)),
        sigma_l=float(sigmas.get("sigma_l", 2.0)), target_norm=model_cfg.get("target_norm"),
        use_rescaling=model_cfg.get("target_norm") is not None,
    )
    if use_pe:
        encoder = ckpt.get("encoder")
        frequencies = getattr(encoder, "w", None)
        if not isinstance(frequencies, torch.Tensor):
            raise ValueError(f"{str(mapper_path)!r} has no positional-encoding frequencies ('encoder.w')")
        state["encoding.frequencies"] = frequencies.detach().float()
        config_kwargs.update(num_frequencies=frequencies.shape[0],
                             num_layers=state["input_layer.weight"].shape[0] // anchors)
    else:
        config_kwargs.update(num_layers=len(layer_names) or 16)
    token = data_cfg.get("placeholder_token")
    if embeds_path is not None:
        if not Path(embeds_path).is_file():
            raise FileNotFoundError(f"learned embeddings file {str(embeds_path)!r} does not exist")
        embeds = _load_official_pickle(Path(embeds_path))
        if not isinstance(embeds, dict) or len(embeds) != 1:
            raise ValueError(f"{str(embeds_path)!r} should hold one {{token: embedding}} pair")
        token = token or next(iter(embeds))
    if not token:
        raise ValueError("the checkpoint names no placeholder token; pass the learned_embeds file too")
    steps = re.search(r"steps-(\d+)", mapper_path.name)
    try:
        check_token_text(token)
        concept = Concept(token, str(data_cfg.get("super_category_token", "object")),
                          MapperConfig(**config_kwargs), layer_names,
                          str(model_cfg.get("pretrained_model_name_or_path", "")), int(steps.group(1)) if steps else 0)
        concept.mapper.load_state_dict(state)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{str(mapper_path)!r} does not describe a mapper NeTI Studio can rebuild "
                         f"({one_line(exc)})") from None
    concept.eval()
    logger.info("imported official checkpoint %s as %s", mapper_path, concept.describe())
    return concept


def default_inference_timesteps(num_steps: int = 50, num_train_timesteps: int = 1000) -> list[float]:
    """The timesteps a `linspace`-spaced scheduler (DPM-Solver's default) visits in `num_steps` steps."""
    grid = torch.linspace(0, num_train_timesteps - 1, num_steps + 1).round().flip(0)[:-1]
    return grid.tolist()


SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # A1111's / kohya's SDXL embedding layout, one tensor per encoder


def export_textual_inversion(concept: Concept, path: str | os.PathLike, timesteps: Sequence[float] | None = None,
                             truncation: int | None = None) -> Path:
    """Write a plain textual-inversion embedding (safetensors): v is the mean of v_base over inference timesteps and
    all layers. SD 1.x/2.x: `{token: v}`. SDXL: `{"clip_l": (1, 768), "clip_g": (1, 1280)}`, each encoder's share of
    v, the layout A1111 and kohya_ss write and diffusers' `load_textual_inversion` reads per encoder.

    Tools that know only the P space (diffusers' `load_textual_inversion`, A1111) load it as a plain embedding.
    """
    ts = torch.tensor(timesteps if timesteps is not None else default_inference_timesteps(), dtype=torch.float32)
    grid_t, grid_l = torch.meshgrid(ts, torch.arange(concept.config.num_layers, dtype=torch.float32), indexing="ij")
    was_training = concept.training
    concept.eval()
    with torch.no_grad():
        mean = concept(grid_t.reshape(-1), grid_l.reshape(-1), truncation).base.mean(dim=0)
    concept.train(was_training)
    widths = concept.config.widths
    if len(widths) == 2:
        shares = mean.float().split(widths)
        tensors = {key: share[None].contiguous() for key, share in zip(SDXL_EMBEDDING_KEYS, shares)}
    else:
        tensors = {concept.token: mean.float().contiguous()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp))
