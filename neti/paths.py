"""Where NeTI Studio's files are: the repository and its bundled assets, in one place.

Every other module (library, app, CLI, tests, benchmarks) takes its paths from here. They point into the source
checkout, which is where `pip install -e .` leaves the package and its `assets/`.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"
BUNDLED_MODEL = ASSETS_DIR / "toy-sd"  # the bundled toy model, SD 1.x's diffusers layout
BUNDLED_CLIP = ASSETS_DIR / "toy-clip"  # the toy CLIP that scores evaluations offline
EXAMPLES_DIR = ASSETS_DIR / "examples"  # example image sets, one folder per concept
SHIPPED_CONCEPTS_DIR = ASSETS_DIR / "concepts"  # concepts shipped with the bundled model (read-only)
DEFAULT_CONCEPTS_DIR = REPO_ROOT / "concepts"  # the user's trained concepts
APP_SCRIPT = REPO_ROOT / "app.py"  # the Gradio app
