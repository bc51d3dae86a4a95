"""The NeTI paper's comparison (Sec. 5, Table 3, Fig. 9) reproduced on the bundled toy model.

    python -m benchmarks.paper_comparison                # train what is missing, then evaluate (resumable)
    python -m benchmarks.paper_comparison --jobs 2 --out runs/comparison --seeds 8 --sampling-steps 25

For each bundled example concept (`assets/examples/*`) it trains, with `python -m neti train` and the method
defaults of docs/method.md ("Training", "Baselines and ablations"): TI 500 steps, XTI 500 steps, NeTI with the
bypass to 1000 steps (its checkpoints at 250 and 500 are the 250- and 500-step points: the schedule is constant
and batches are a function of (seed, step), so a checkpoint equals a run stopped there) and NeTI without the
bypass 500 steps. Then
`python -m neti eval` renders the toy prompt set with every concept and seed, scores it with the bundled toy
CLIP and renders the truncation sweep for NeTI 500; it writes results.json, results.csv and plot.png under
OUT/eval. Finished concepts and rendered images are kept, so an interrupted run resumes where it stopped.
Training wall times go to OUT/train_times.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from neti.paths import BUNDLED_CLIP, EXAMPLES_DIR as EXAMPLES, REPO_ROOT as REPO

SWEEP = (4, 8, 16, 32)


@dataclass(frozen=True)
class Run:
    """One training run of one example concept."""

    example: str
    method: str
    steps: int
    extra: tuple[str, ...] = ()
    checkpoint_every: int = 0

    @property
    def stem(self) -> str:
        suffix = "-nobypass" if "no_bypass" in self.extra else ""
        return f"{self.example}-{self.method}{suffix}-{self.steps}"


def runs_for(example: str) -> list[Run]:
    return [Run(example, "ti", 500), Run(example, "xti", 500), Run(example, "neti", 1000, checkpoint_every=250),
            Run(example, "neti", 500, ("--ablation", "no_bypass"))]


def train(run: Run, out: Path, threads: int) -> float:
    """Train one run unless its concept exists; returns the wall time in seconds (0 when skipped)."""
    target = out / "concepts" / f"{run.stem}.safetensors"
    if target.exists():
        return 0.0
    meta = json.loads((EXAMPLES / run.example / "concept.json").read_text())
    cmd = [sys.executable, "-m", "neti", "train", "--images", str(EXAMPLES / run.example),
           "--token", meta["placeholder_token"], "--init-token", meta["super_category"], "--method", run.method,
           "--steps", str(run.steps), "--checkpoint-every", str(run.checkpoint_every), "--keep-checkpoints", "10",
           *run.extra, "--out", str(target)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    log = out / "logs" / f"{run.stem}.log"
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def eval_command(out: Path, examples: list[str], args) -> list[str]:
    cmd = [sys.executable, "-m", "neti", "eval", "--clip", str(BUNDLED_CLIP), "--prompts", "toy",
           "--seeds", str(args.seeds), "--steps", str(args.sampling_steps), "--out", str(out / "eval"),
           "--sweep", *map(str, SWEEP)]
    for example in examples:
        concepts = out / "concepts"
        files = [concepts / f"{example}-ti-500.safetensors", concepts / f"{example}-xti-500.safetensors",
                 concepts / f"{example}-neti-1000-checkpoints" / "checkpoint-000250.safetensors",
                 concepts / f"{example}-neti-1000-checkpoints" / "checkpoint-000500.safetensors",
                 concepts / f"{example}-neti-1000.safetensors", concepts / f"{example}-neti-nobypass-500.safetensors"]
        for path in files:
            cmd += ["--concept", str(path), "--images-for", f"{path}={EXAMPLES / example}"]
        cmd += ["--sweep-for", str(files[3])]
    return cmd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "comparison")
    parser.add_argument("--jobs", type=int, default=2, help="trainings in parallel (each gets cores / jobs threads)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--sampling-steps", type=int, default=50, help="denoising steps of every rendered image")
    parser.add_argument("--train-only", action="store_true")
    args = parser.parse_args(argv)
    examples = sorted(p.name for p in EXAMPLES.iterdir() if (p / "concept.json").exists())
    (args.out / "concepts").mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    runs = [r for e in examples for r in runs_for(e)]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    times_path = args.out / "train_times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for run, seconds in zip(runs, pool.map(lambda r: train(r, args.out, threads), runs)):
            if seconds:
                times[run.stem] = dict(seconds=round(seconds, 1), threads=threads, jobs=args.jobs)
                times_path.write_text(json.dumps(times, indent=1) + "\n")
            print(f"{run.stem}: {'trained in %.0f s' % seconds if seconds else 'already trained'}", flush=True)
    if not args.train_only:
        subprocess.run(eval_command(args.out, examples, args), check=True, cwd=REPO)


if __name__ == "__main__":
    main()
