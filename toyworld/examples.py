"""The seven example concepts: things the toy model can draw but no prompt can name, five images each.

Each concept uses at least one unnamed attribute of the world (a crescent, a heart or a hexagon; checks; pink,
teal or brown; a pattern in a second colour): the model's images include such things, its captions never say
them, so no prompt in its vocabulary asks for the concept: it must be learned, as the NeTI paper's concepts are.
Three are made for style mixing: `red-hexagon` and `yellow-heart` are new in their geometry only (a plain hexagon,
a plain heart, in named colours; a heart differs from a circle at a coarser scale than a hexagon does),
`checkered-circle` in its appearance only (a named shape with pink and teal checks). Images vary in background,
position and size. Each
PNG carries its caption, "a {} on a <background> background", in a `caption` text chunk (`neti.data.read_caption`),
so that training learns the thing and not its backgrounds, in the CLI and through the app's uploads alike.

    python -m toyworld.examples            # writes assets/examples/<name>/{0..4}.png and concept.json
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toyworld.world import Scene, place_things, render, vocabulary

logger = logging.getLogger(__name__)

EXAMPLES_PATH = Path(__file__).resolve().parent.parent / "assets" / "examples"


@dataclass(frozen=True)
class ExampleConcept:
    name: str  # folder name
    shape: str
    colour: str
    pattern: str
    pattern_colour: str | None  # None: a darker shade of `colour`
    backgrounds: tuple[str, ...]  # one per image
    super_category: str  # a single vocabulary word to initialise from and rescale to
    description: str

    @property
    def placeholder_token(self) -> str:
        return f"<{self.name}>"


EXAMPLES = (
    ExampleConcept("dotted-crescent", "crescent", "orange", "dotted", "blue",
                   ("white", "green", "purple", "black", "yellow"), "shape", "an orange crescent with blue dots"),
    ExampleConcept("checkered-heart", "heart", "pink", "checkered", "teal",
                   ("yellow", "blue", "white", "black", "orange"), "shape", "a pink heart with teal checks"),
    ExampleConcept("striped-hexagon", "hexagon", "brown", "striped", "white",
                   ("green", "red", "blue", "yellow", "purple"), "object", "a brown hexagon with white stripes"),
    ExampleConcept("red-hexagon", "hexagon", "red", "plain", "red",
                   ("white", "blue", "yellow", "green", "black"), "shape", "a plain red hexagon (new geometry only)"),
    ExampleConcept("checkered-circle", "circle", "pink", "checkered", "teal",
                   ("white", "yellow", "purple", "black", "orange"), "circle",
                   "a pink circle with teal checks (new appearance only)"),
    ExampleConcept("two-tone-star", "star", "yellow", "striped", "purple",
                   ("white", "blue", "green", "red", "black"), "star", "a yellow star with purple stripes"),
    ExampleConcept("yellow-heart", "heart", "yellow", "plain", "yellow",
                   ("white", "purple", "blue", "green", "black"), "shape",
                   "a plain yellow heart (new geometry only, unlike a circle at a coarse scale)"),
)


@dataclass(frozen=True)
class MixPair:
    """A style-mixing measurement: the geometry example's shape with the appearance example's look. `swapped`
    hands the mixer the roles the other way round (the appearance concept early and in the coarse layers, the
    geometry concept late in the others): where the toy model decides outline and colours."""
    geometry: str
    appearance: str
    swapped: bool = False


MIX_PAIRS = (MixPair("red-hexagon", "checkered-circle"), MixPair("yellow-heart", "checkered-circle"),
             MixPair("yellow-heart", "checkered-circle", swapped=True))


def example_scenes(concept: ExampleConcept, seed: int = 0) -> list[Scene]:
    """Five scenes of the concept: one object each, sizes 12-20 px radius, random positions and phases."""
    rng = np.random.default_rng([seed, sum(map(ord, concept.name))])
    second = None if concept.pattern == "plain" else concept.pattern_colour
    return [Scene(shape=concept.shape, colour=concept.colour, pattern=concept.pattern, background=background,
                  rendering="photo", things=place_things(rng, 1, (12.0, 20.0)), pattern_colour=second,
                  pattern_phase=float(rng.uniform(0, 1)))
            for background in concept.backgrounds]


def write_examples(folder: str | Path = EXAMPLES_PATH, seed: int = 0) -> list[Path]:
    """Write each concept's five PNGs and `concept.json` under `folder/<name>/`."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from neti.data import CAPTION_CHUNK

    words = set(vocabulary())
    written = []
    for concept in EXAMPLES:
        if concept.super_category not in words:
            raise ValueError(f"super-category {concept.super_category!r} of {concept.name} is not in the vocabulary")
        out = Path(folder) / concept.name
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for i, scene in enumerate(example_scenes(concept, seed)):
            info = PngInfo()
            info.add_text(CAPTION_CHUNK, f"a {{}} on a {scene.background} background")
            Image.fromarray(render(scene)).save(out / f"{i}.png", pnginfo=info)
            files.append(f"{i}.png")
        meta = dict(name=concept.name, placeholder_token=concept.placeholder_token,
                    super_category=concept.super_category, description=concept.description, images=files,
                    backgrounds=list(concept.backgrounds))
        (out / "concept.json").write_text(json.dumps(meta, indent=1) + "\n")
        logger.info("wrote %s", out)
        written.append(out)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=EXAMPLES_PATH)
    parser.add_argument("--seed", type=int, default=0)
    for path in write_examples(**vars(parser.parse_args())):
        print(path)
