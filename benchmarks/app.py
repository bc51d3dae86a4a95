"""The app as a user meets it: start-up time of `python app.py` and 100 training steps through its HTTP API.

    python -m benchmarks.app [--steps 100] [--preview-every 25] [--json out.json]

Starts `python app.py` on the bundled model (a temporary, empty concepts folder; the shipped concepts listed as
usual) on a free port, measures the time until the page is served, then starts a NeTI training on four images
of a bundled example through `/train_start` (the call the Train tab's Start button makes), polls
`/train_status` as the page does, and reports the wall time to the last step and the app's own seconds per
step. Previews every `--preview-every` steps are included, as in the app's default use.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from neti.paths import BUNDLED_MODEL, EXAMPLES_DIR
from neti.testing import AppServer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--preview-every", type=int, default=25)
    p.add_argument("--example", default="dotted-crescent")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from gradio_client import Client, handle_file

    example = EXAMPLES_DIR / args.example
    meta = json.loads((example / "concept.json").read_text())
    with tempfile.TemporaryDirectory(prefix="neti-app-bench-") as tmp:
        server = AppServer(BUNDLED_MODEL, Path(tmp) / "concepts", Path(tmp) / "app.log")
        try:
            print(f"start-up to served page: {server.startup_seconds:.1f} s", flush=True)
            client = Client(server.url, verbose=False)
            images = [handle_file(example / f"{i}.png") for i in range(4)]
            started = time.perf_counter()
            client.predict(images, "bench", "<bench>", meta["super_category"], "NeTI", args.steps, None, True, True,
                           "a photo of a {}", args.preview_every, 0, api_name="/train_start")
            status = {}
            while True:
                status = client.predict(api_name="/train_status")
                if status["status"] != "running" or status["step"] >= args.steps:
                    break
                time.sleep(0.5)
            while status["status"] == "running":  # the final save
                time.sleep(0.5)
                status = client.predict(api_name="/train_status")
            wall = time.perf_counter() - started
        finally:
            server.stop()
    result = dict(startup_seconds=round(server.startup_seconds, 2), steps=status["step"],
                  train_wall_seconds=round(wall, 1), status=status["status"],
                  previews=status.get("preview_steps"), preview_every=args.preview_every,
                  date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if status["status"] == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
