"""Shared pieces of the benchmarks: benchmark models, the official per-pair conditioning loop, timing and memory.

Nothing here is part of the library: the benchmarks measure `neti` through its public API and compare it with
the way the official NeTI code works (one text-encoder call per (timestep, layer) pair, NeTI Sec. 3-4).
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

from neti.conditioning import TextConditioner, TokenizedPrompt
from neti.config import DEFAULT_BYPASS_ALPHA
from neti.paths import REPO_ROOT


# ---- models --------------------------------------------------------------------------------------------------

def shapes() -> dict:
    """Named SD-1.x-shaped sizes (neti.testing.sd_layout): all have SD's 16 cross-attention layers."""
    from toyworld.model import TOY
    from neti.testing.sd_layout import SD15

    return {
        "toy": TOY,  # the bundled model's sizes: D = 64, 32 tokens, 64 px
        # the bundled model's UNet and VAE with SD 1.5's text encoder (D = 768, 12 layers, 77 tokens)
        "sd15-text": replace(TOY, text_width=768, text_layers=12, text_heads=12, text_ffn=3072, max_tokens=77),
        "sd15": SD15,  # full size: for a GPU
    }


def build_model(shape_name: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Save a random-weight SD-shaped pipeline of the named shape to `folder` (diffusers layout)."""
    from neti.testing.sd_layout import build_pipeline
    from neti.testing.tokenizer import build_clip_tokenizer
    from toyworld.world import vocabulary

    folder = Path(folder)
    if shape_name == "toy":  # exactly the bundled model's architecture (its VAE has one ResNet per level)
        from toyworld.model import build_components, save_pipeline

        return save_pipeline(folder / "model", **build_components(seed=seed))
    shape = shapes()[shape_name]
    tokenizer = build_clip_tokenizer(vocabulary(), folder / "vocab", max_length=shape.max_tokens)
    pipe = build_pipeline(shape, tokenizer, seed=seed)
    pipe.save_pretrained(folder / "model")
    return folder / "model"


def make_concept(pipe, method: str = "neti", token: str = "<bench>", super_category: str = "shape",
                 use_bypass: bool = True, seed: int = 1, token_dim: int | None = None, num_layers: int | None = None):
    """A concept with random (seeded) weights for `pipe` (or for a given D and L without a pipe)."""
    from neti.concept import Concept
    from neti.config import MapperConfig

    config = MapperConfig(method=method, use_bypass=use_bypass, seed=seed)
    if pipe is not None:
        return Concept.for_pipeline(pipe, token, super_category, config, "benchmark").eval()
    emb = torch.randn(token_dim, generator=torch.Generator().manual_seed(seed))
    config = replace(config, token_dim=token_dim, num_layers=num_layers, target_norm=float(emb.norm()))
    concept = Concept(token, super_category, config, [f"L{i}" for i in range(num_layers)], "benchmark")
    if method != "neti":
        concept.mapper.initialize(emb)
    return concept.eval()


def per_layer_trainer():
    """`neti.train.Trainer` with the official code's conditioning: one text-encoder pass per layer (the baseline
    that the trainer's one batched pass over all layers is measured against)."""
    from neti.attention import pack
    from neti.train import Trainer

    class PerLayerTrainer(Trainer):
        def encoder_states(self, prompts, timesteps, truncation=None):
            tokenized = [self.conditioner.tokenize(p, [self.concept.token]) for p in prompts]
            batch, concepts = len(prompts), {self.concept.token: self.model}
            parts = [self.conditioner.encode_rows(tokenized, torch.arange(batch), timesteps.float(),
                                                  torch.full((batch,), float(l)), concepts, truncation)
                     for l in range(len(self.layers))]
            return pack(torch.stack([p.keys for p in parts], dim=1), torch.stack([p.values for p in parts], dim=1))

    return PerLayerTrainer


# ---- the official conditioning loop --------------------------------------------------------------------------

def official_loop_encoding(conditioner: TextConditioner, prompt: TokenizedPrompt, concepts: dict,
                           timesteps: Sequence[float], num_layers: int, truncation: int | None = None,
                           alpha: float = DEFAULT_BYPASS_ALPHA) -> "LoopEncoding":
    """All (t, l) encodings as the official code computes them: one text-encoder call per pair, batch 1."""
    keys, values = [], []
    one = torch.zeros(1, dtype=torch.long)
    for t in timesteps:
        for l in range(num_layers):
            enc = conditioner.encode_rows([prompt], one, torch.tensor([float(t)]), torch.tensor([float(l)]),
                                          concepts, truncation, alpha)
            keys.append(enc.keys[0]), values.append(enc.values[0])
    shape = (len(timesteps), num_layers, *keys[0].shape)
    return LoopEncoding(torch.stack(keys).view(shape), torch.stack(values).view(shape))


@dataclass(frozen=True)
class LoopEncoding:
    """The official loop's encodings, stored whole; `Generator.render` reads them one step at a time."""

    keys: torch.Tensor  # (T, L, S, D)
    values: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.keys.shape[0]

    def step(self, i: int) -> "LoopEncoding":
        return LoopEncoding(self.keys[i], self.values[i])


# ---- timing --------------------------------------------------------------------------------------------------

def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def side_by_side(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                 device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Time each function `repeats` times, interleaved (a, b, a, b, ...) after `warmup` untimed calls of each,
    so that a change of machine load hits all contenders alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# ---- memory --------------------------------------------------------------------------------------------------

class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak on a GPU; on the CPU the peak resident set size.

    On Linux the kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs before the block, and
    glibc is told to return large blocks to the system at once (mallopt), so the peak is the block's own; where
    that is impossible a sampling thread polls the RSS every millisecond (approximate).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        _release_freed_memory()
        self._base = _rss()
        if _reset_hwm():
            self.method = "VmHWM (Linux high-water mark, reset)"
        else:
            self.method = "RSS sampled every 1 ms"
            self._stop = threading.Event()
            self._sampled = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self.method.startswith("VmHWM"):
            self.peak_bytes = _status_kb("VmHWM") * 1024 - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = self._sampled - self._base


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _rss() -> int:
    try:
        return _status_kb("VmRSS") * 1024
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


_MALLOPT_DONE = False


def _release_freed_memory() -> None:
    """glibc: serve allocations >= 64 KiB with mmap (returned on free) and trim the heap, so RSS tracks live memory."""
    global _MALLOPT_DONE
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not _MALLOPT_DONE:
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
            _MALLOPT_DONE = True
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- the environment -----------------------------------------------------------------------------------------

def environment(device: torch.device | str) -> dict:
    """What the figures depend on: date, machine load, versions, device."""
    import diffusers
    import transformers

    device = torch.device(device)
    info = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "device": str(device), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True,
                                            capture_output=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def choose_threads(requested: int | None) -> str:
    """Set torch's CPU threads: as requested, else 1 when the machine is already busy (load >= cores), where
    several threads per process spin against other processes' threads and small ops slow down many times over."""
    if requested:
        torch.set_num_threads(requested)
        return f"{requested} (requested)"
    try:
        load = os.getloadavg()[0]
    except OSError:
        return f"{torch.get_num_threads()} (torch default)"
    if load >= (os.cpu_count() or 1):
        torch.set_num_threads(1)
        return f"1 (machine busy: load {load:.1f} on {os.cpu_count()} cores)"
    return f"{torch.get_num_threads()} (torch default)"


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.2f} MB"


def benchmark_tokenizer(max_length: int, real: bool) -> tuple[object, str]:
    """A tokenizer for a random-weight SD-shaped model, and which vocabulary it is: with `real`, Stable Diffusion's
    own (OpenAI CLIP's 49,408-token BPE, from the open_clip_torch package or $NETI_CLIP_BPE) when it is available;
    otherwise, or when it is absent (said on stderr: the real-vocabulary figures are skipped), the toy vocabulary."""
    import sys
    import tempfile

    from neti.testing.tokenizer import build_clip_tokenizer, openai_clip_tokenizer
    from toyworld.world import vocabulary

    folder = tempfile.mkdtemp(prefix="bench-vocab-")
    if real:
        tokenizer = openai_clip_tokenizer(folder, max_length=max_length)
        if tokenizer is not None:
            return tokenizer, "OpenAI CLIP BPE (49,408 tokens)"
        print("OpenAI CLIP's BPE file is absent (pip install open_clip_torch, or set NETI_CLIP_BPE): real-vocabulary "
              "tokenization skipped; the toy vocabulary tokenizes, the embedding table keeps CLIP's 49,408 rows",
              file=sys.stderr)
    return build_clip_tokenizer(vocabulary(), folder, max_length=max_length), "toy vocabulary"
