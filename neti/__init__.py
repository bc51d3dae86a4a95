"""NeTI Studio: personalize a frozen Stable Diffusion model with NeTI (Alaluf, Richardson, Metzer, Cohen-Or,
"A Neural Space-Time Representation for Text-to-Image Personalization", SIGGRAPH Asia 2023).

The public API, re-exported from the modules that implement each idea:
- `Concept`: a learned concept (mapper + token + config), saved as one safetensors file (concept.py);
- `Generator`, `Sampling`: generation with truncation, bypass strength, sweeps, decomposition, style mixing;
- `Trainer`, `TrainConfig`, `TrainingCallback`: training NeTI, XTI or TI concepts (train.py), with `Previews`
  (previews.py, set by `PreviewConfig`) rendering the concept as it trains;
- `load_pipeline`: base models (SD 1.x, 2.x, SDXL) by hub id or local folder, the bundled toy model by default
  (models.py; SDXL: docs/sdxl.md);
- `load_images`: training images from a folder or files (data.py).
"""

from .concept import Concept, export_textual_inversion, file_info, import_official
from .config import MapperConfig, PreviewConfig, TrainConfig
from .data import ImageInputError, load_images
from .generate import Generator, Result, Sampling
from .mapper import NetiMapper, VectorTable, count_parameters
from .models import load_pipeline
from .paths import BUNDLED_MODEL
from .previews import Previews
from .train import CheckpointInfo, PreviewInfo, StepInfo, Trainer, TrainingCallback, TrainResult

__all__ = [
    "BUNDLED_MODEL", "CheckpointInfo", "Concept", "Generator", "ImageInputError", "MapperConfig", "NetiMapper",
    "PreviewConfig", "PreviewInfo", "Previews", "Result", "Sampling", "StepInfo", "TrainConfig", "TrainResult",
    "Trainer", "TrainingCallback",
    "VectorTable", "count_parameters", "export_textual_inversion", "file_info", "import_official", "load_images",
    "load_pipeline",
]
