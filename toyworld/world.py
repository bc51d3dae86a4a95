"""The toy world: seeded 64x64 RGB scenes of one or two coloured shapes, and their captions.

A scene is one shape kind in one colour (optionally striped or dotted), drawn once or twice at random sizes and
positions on a plain background, shown in one of four renderings (a photo, a sketch, a blurry photo, a
pixelated image). Captions use a small closed vocabulary ("two green striped rings on a yellow background",
"a sketch of a red star on a blue background"), so that prompts can edit the background, the count and the
rendering, the way the NeTI paper's prompts edit a learned concept.

Everything is a pure function of `(seed, index)`: `World(seed).scene(i)` is the same scene on every machine.
Some attributes are *unnamed*: crescents, hearts and hexagons, checks, pink, teal and brown objects and
two-coloured objects (a pattern in a second palette colour). They appear in the images (each with probability
`World.unnamed`) but no caption and no vocabulary word names them: their captions use the generic "shape" or
"object" and leave out the colour or pattern word. The model can draw them, but only a learned concept can ask for
one, which is the situation of a user's cat in Stable Diffusion. `World.unnamed = 0` gives the named world alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SIZE = 64  # image side in pixels
_SUPERSAMPLE = 2  # render at 2x and average, for anti-aliased edges

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "ring": "rings",
           "cross": "crosses", "shape": "shapes", "object": "objects"}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")  # object colours
BACKGROUNDS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
PATTERNS = ("plain", "striped", "dotted")
COUNTS = (1, 2)
RENDERINGS = ("photo", "sketch", "blurry", "pixelated")
UNNAMED_SHAPES = ("crescent", "heart", "hexagon")  # drawn, never named: no caption or vocabulary word
UNNAMED_COLOURS = ("pink", "teal", "brown")
UNNAMED_PATTERNS = ("checkered",)
HELD_OUT_SHAPES, HELD_OUT_PATTERNS = UNNAMED_SHAPES, UNNAMED_PATTERNS  # the names earlier versions used
ALL_SHAPES = SHAPES + UNNAMED_SHAPES  # what the judges (classifier, toy CLIP) know
ALL_COLOURS = COLOURS + UNNAMED_COLOURS
ALL_PATTERNS = PATTERNS + UNNAMED_PATTERNS
SECOND_COLOURS = ("shade",) + ALL_COLOURS + ("white", "black")  # a pattern's colour; "shade": the body's, darker
UNNAMED_WORDS = frozenset((*UNNAMED_SHAPES, *UNNAMED_COLOURS, *UNNAMED_PATTERNS, "crescents", "hearts", "hexagons"))

RGB = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (150, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
    "pink": (250, 130, 190), "teal": (20, 160, 160), "brown": (130, 80, 40),
}
COUNT_WORDS = {1: "a", 2: "two"}
RENDERING_PREFIXES = {
    "photo": ("", "a photo of ", "a picture of ", "an image of ", "a rendering of "),
    "sketch": ("a sketch of ",),
    "blurry": ("a blurry photo of ",),
    "pixelated": ("a pixelated image of ",),
}
SUPER_CATEGORIES = ("shape", "object")  # generic words captions sometimes use instead of the shape's name


def vocabulary(unnamed: bool = False) -> list[str]:
    """Every word a caption can contain, plus the super-category words prompts may use. `unnamed=True` adds the
    words for unnamed attributes, which only the judges' vocabulary (the toy CLIP's) has."""
    words = ["a", "an", "two", "of", "on", "background", "the", "with", "and", "in", "style"]
    for prefixes in RENDERING_PREFIXES.values():
        words += [w for p in prefixes for w in p.split()]
    words += [*SHAPES, *UNNAMED_SHAPES, *SUPER_CATEGORIES, *PLURALS.values(), "crescents", "hearts", "hexagons"]
    words += [*COLOURS, *BACKGROUNDS, *RGB, *PATTERNS, *UNNAMED_PATTERNS]
    return [w for w in dict.fromkeys(words) if unnamed or w not in UNNAMED_WORDS]


@dataclass(frozen=True)
class Thing:
    """One drawn object: its centre and radius in pixels."""

    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """Everything that decides an image; `things` holds one entry per drawn object."""

    shape: str
    colour: str
    pattern: str
    background: str
    rendering: str
    things: tuple[Thing, ...]
    pattern_colour: str | None = None  # None: a darker shade of `colour`
    pattern_phase: float = 0.0

    @property
    def count(self) -> int:
        return len(self.things)

    @property
    def second(self) -> str:
        """The pattern's colour as a label: "shade" for plain objects and the default darker shade."""
        return "shade" if self.pattern == "plain" or self.pattern_colour is None else self.pattern_colour

    @property
    def named_shape(self) -> bool:
        return self.shape in SHAPES

    @property
    def named_appearance(self) -> bool:
        """Whether words can say the object's colour and pattern (one named colour, a named pattern)."""
        return self.colour in COLOURS and self.pattern in PATTERNS and self.second == "shade"

    @property
    def named(self) -> bool:
        return self.named_shape and self.named_appearance


def place_things(rng: np.random.Generator, count: int, radius_range: tuple[float, float] | None = None
                 ) -> tuple[Thing, ...]:
    """Random non-overlapping centres and radii that keep every object inside the image."""
    low, high = radius_range or ((10.0, 20.0) if count == 1 else (7.0, 12.0))
    for _ in range(1000):
        things = []
        for _ in range(count):
            r = float(rng.uniform(low, high))
            things.append(Thing(float(rng.uniform(r + 1, SIZE - r - 1)), float(rng.uniform(r + 1, SIZE - r - 1)), r))
        if all(np.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius + 2
               for i, a in enumerate(things) for b in things[i + 1:]):
            return tuple(things)
    raise RuntimeError(f"could not place {count} objects")


@dataclass(frozen=True)
class World:
    """The seeded distribution of training scenes; `scene(i)` is deterministic in `(seed, i)`."""

    seed: int = 0
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    backgrounds: tuple[str, ...] = BACKGROUNDS
    patterns: tuple[str, ...] = PATTERNS
    renderings: tuple[str, ...] = RENDERINGS
    rendering_weights: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1)
    two_probability: float = 0.3
    unnamed: float = 0.0  # probability, per attribute (shape, colour, pattern, second colour), of an unnamed value

    def rng(self, index: int, stream: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, index, stream])

    def scene(self, index: int) -> Scene:
        rng = self.rng(index)
        colour = self.colours[rng.integers(len(self.colours))]
        backgrounds = [b for b in self.backgrounds if b != colour]
        count = 2 if rng.random() < self.two_probability else 1
        scene = Scene(
            shape=self.shapes[rng.integers(len(self.shapes))], colour=colour,
            pattern=self.patterns[rng.integers(len(self.patterns))],
            background=backgrounds[rng.integers(len(backgrounds))],
            rendering=self.renderings[rng.choice(len(self.renderings), p=np.array(self.rendering_weights))],
            things=place_things(rng, count), pattern_phase=float(rng.uniform(0, 1)),
        )
        return self.unname(scene, self.rng(index, 7)) if self.unnamed else scene

    def unname(self, scene: Scene, rng: np.random.Generator) -> Scene:
        """Swap attributes for unnamed ones, each with probability `unnamed`, from a random stream of their own
        (so the named draws, and a scene that keeps them all, are those of the named world)."""
        draws = rng.random(4) < self.unnamed
        picks = rng.random(4)

        def pick(values, u):
            return values[int(u * len(values))]

        changes = {}
        if draws[0]:
            changes["shape"] = pick(UNNAMED_SHAPES, picks[0])
        if draws[1]:
            changes["colour"] = pick(UNNAMED_COLOURS, picks[1])
        if draws[2]:
            changes["pattern"] = pick(UNNAMED_PATTERNS, picks[2])
        if draws[3]:  # two-coloured: the pattern in a second colour (a plain object gets one)
            body = changes.get("colour", scene.colour)
            if changes.get("pattern", scene.pattern) == "plain":
                changes["pattern"] = pick(("striped", "dotted", "checkered"), rng.random())
            seconds = [c for c in SECOND_COLOURS[1:] if c not in (body, scene.background)]
            changes["pattern_colour"] = pick(seconds, picks[3])
        return replace(scene, **changes) if changes else scene

    def image(self, index: int) -> np.ndarray:
        return render(self.scene(index))

    def caption(self, index: int, variant: int = 0) -> str:
        """Caption `variant` 0 is canonical; others are seeded paraphrases (see `caption`)."""
        return caption(self.scene(index), None if variant == 0 else self.rng(index, variant))


# ----------------------------------------------------------------------------------------------- captions

def caption(scene: Scene, rng: np.random.Generator | None = None, with_colour: bool = True) -> str:
    """The scene in words. With `rng`, a paraphrase: a synonym prefix for photos, sometimes the generic word
    "shape"/"object" for the shape's name, sometimes no pattern word or no background. `with_colour=False` leaves
    out the object's colour ("a striped star on a blue background"). Unnamed attributes are never said: an
    unnamed shape is "a shape" ("an object" in some paraphrases), an unnamed colour, pattern or a second colour
    leaves out the colour or pattern word."""
    noun = scene.shape if scene.named_shape else SUPER_CATEGORIES[0]
    with_colour = with_colour and scene.colour in COLOURS and scene.second == "shade"
    pattern = "" if scene.pattern == "plain" or scene.pattern not in PATTERNS else scene.pattern
    prefix = RENDERING_PREFIXES[scene.rendering][0]
    with_background = True
    if rng is not None:
        options = RENDERING_PREFIXES[scene.rendering]
        prefix = options[rng.integers(len(options))]
        if rng.random() < 0.1 or not scene.named_shape:
            noun = SUPER_CATEGORIES[rng.integers(len(SUPER_CATEGORIES))]
        if rng.random() < 0.1:
            pattern = ""
        with_background = rng.random() >= 0.1
    if scene.count > 1:
        noun = PLURALS[noun]
    words = " ".join(w for w in (scene.colour if with_colour else "", pattern, noun) if w)
    article = COUNT_WORDS[scene.count]
    if article == "a" and words[0] in "aeiou":
        article = "an"
    text = f"{prefix}{article} {words}"
    if with_background:
        text += f" on a {scene.background} background"
    return text


# ------------------------------------------------------------------------------------------------ blends

# How the UNet's training text describes an unnamed value without a word for it: at the word's place, a blend of
# two named words' input embeddings (weights drawn per caption, the blend rescaled to its words' norm; see
# `toyworld.train.blend_embeddings`). No token id produces a blend, so no prompt can ask for the value, but the
# text side now varies with it, as real captions vary with a user's cat ("a ginger cat", "a fluffy cat") although no
# word names that cat. A learned concept, which works in the embedding space, can reach it. Every word here is one
# token of the generator's vocabulary.
BLENDS = {"crescent": ("circle", "ring"), "heart": ("circle", "star"), "hexagon": ("circle", "square"),
          "pink": ("red", "white"), "teal": ("blue", "yellow"), "brown": ("red", "black"),
          "checkered": ("dotted", "square")}
SECOND_WORD = "with"  # a second colour's blend: "with" and the colour (its blend if unnamed)

Blend = tuple[tuple[str, float], ...]  # (word, weight) pairs, weights summing to 1


def blend_of(value: str, rng: np.random.Generator | None = None) -> Blend:
    """The blend that stands for an unnamed value (or the word itself, for a named one), weights ~ U(0.3, 0.7)
    (without `rng`: the midpoint)."""
    if value not in BLENDS:
        return ((value, 1.0),)
    w = 0.5 if rng is None else float(rng.uniform(0.3, 0.7))
    first, second = BLENDS[value]
    return ((first, w), (second, 1 - w))


def compound(parts: list[Blend]) -> Blend:
    """Several descriptors merged into one position, each with an equal share: one token that carries a colour, a
    pattern and a shape together, as one word of a real vocabulary often does ("zebra", "ladybird")."""
    weights: dict[str, float] = {}
    for part in parts:
        for word, w in part:
            weights[word] = weights.get(word, 0.0) + w / len(parts)
    return tuple(weights.items())


def described(scene: Scene, rng: np.random.Generator, with_colour: bool = True, share: float = 0.7,
              compound_share: float = 0.0) -> list[str | Blend]:
    """`caption(scene, rng, with_colour)` as a word list in which each unnamed value, with probability `share`
    (its own draw), is said by its blend: an unnamed shape in the noun's place, an unnamed colour (or a two-coloured
    object's body colour) before the pattern, checks as the pattern, a second colour as "with" blended with that
    colour, before the noun. With probability `compound_share` the object's descriptors (colour, pattern, second
    colour, noun) become one compound position. The caption's own draws come first, from `rng`; the blends' draws
    follow, so the words of `caption` are unchanged. `share=0` and `compound_share=0` give `caption`'s words."""
    words: list[str | Blend] = caption(scene, rng, with_colour).split()
    nouns = {*SHAPES, *SUPER_CATEGORIES, *PLURALS.values()}
    noun = next(i for i, w in enumerate(words) if w in nouns and (i + 1 == len(words) or words[i + 1] == "on"))
    article = next(i for i in range(noun - 1, -1, -1) if words[i] in ("a", "an", "two"))
    draws, picks = rng.random(4) < share, rng.random(4)
    said = [((w, 1.0),) for w in words[article + 1:noun]]  # the caption's colour and pattern words
    if with_colour and draws[0] and not (scene.colour in COLOURS and scene.second == "shade"):
        said.insert(0, blend_of(scene.colour, np.random.default_rng(int(picks[0] * 2 ** 32))))
    if scene.pattern == "checkered" and draws[1]:
        said.append(blend_of("checkered", np.random.default_rng(int(picks[1] * 2 ** 32))))
    if scene.second != "shade" and draws[2]:
        colour = blend_of(scene.second, np.random.default_rng(int(picks[2] * 2 ** 32)))
        said.append(((SECOND_WORD, 0.5), *((w, 0.5 * x) for w, x in colour)))
    name: Blend = ((words[noun], 1.0),)
    if not scene.named_shape and draws[3]:
        name = blend_of(scene.shape, np.random.default_rng(int(picks[3] * 2 ** 32)))
    said.append(name)
    if len(said) > 1 and rng.random() < compound_share:
        said = [compound(said)]
    middle = [part[0][0] if len(part) == 1 else part for part in said]
    return [*words[:article + 1], *middle, *words[noun + 1:]]


# ---------------------------------------------------------------------------------------------- rendering

def _grid() -> tuple[np.ndarray, np.ndarray]:
    n = SIZE * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    return np.meshgrid(coords, coords)  # (x, y), each (n, n) in pixel units


_X, _Y = _grid()


def shape_mask(shape: str, thing: Thing) -> np.ndarray:
    """Boolean (n, n) mask of one object on the supersampled grid."""
    dx, dy = (_X - thing.x) / thing.radius, (_Y - thing.y) / thing.radius  # unit radius
    r = np.hypot(dx, dy)
    if shape == "circle":
        return r <= 1
    if shape == "ring":
        return (r <= 1) & (r >= 0.55)
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.8
    if shape == "triangle":  # upward, centroid at the centre
        return (dy <= 0.5) & (dy >= -1 + 1.732 * abs(dx))
    if shape == "star":  # five points, outer radius 1, inner 0.45
        angle = (np.arctan2(dx, -dy) % (2 * np.pi / 5)) / (2 * np.pi / 5)  # 0..1 between two points
        return r <= 1 - 0.55 * (1 - abs(1 - 2 * angle))
    if shape == "cross":
        return ((abs(dx) <= 0.3) & (abs(dy) <= 1)) | ((abs(dy) <= 0.3) & (abs(dx) <= 1))
    if shape == "crescent":
        return (r <= 1) & (np.hypot(dx - 0.45, dy + 0.2) > 0.8)
    if shape == "heart":
        hx, hy = dx * 1.15, -dy * 1.15 + 0.2
        return (hx ** 2 + hy ** 2 - 1) ** 3 - hx ** 2 * hy ** 3 <= 0
    if shape == "hexagon":
        return (abs(dy) <= 0.866) & (0.866 * abs(dx) + 0.5 * abs(dy) <= 0.866)
    raise ValueError(f"unknown shape {shape!r}; expected one of {ALL_SHAPES}")


def pattern_mask(pattern: str, phase: float, thin: bool = False) -> np.ndarray:
    """Where the pattern's second colour goes, on the supersampled grid (thin: line-art version)."""
    if pattern == "plain":
        return np.zeros_like(_X, dtype=bool)
    if pattern == "striped":
        return ((_X + _Y) / 8 + phase) % 1 < (0.2 if thin else 0.45)
    if pattern == "dotted":
        gx, gy = (_X / 7 + phase) % 1 - 0.5, (_Y / 7 + phase) % 1 - 0.5
        return np.hypot(gx, gy) < (0.14 if thin else 0.25)
    if pattern == "checkered":
        return ((np.floor(_X / 5 + phase) + np.floor(_Y / 5 + phase)) % 2) == 1
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {ALL_PATTERNS}")


def _outline(mask: np.ndarray, width: int = 3) -> np.ndarray:
    inner = mask.copy()
    for axis in (0, 1):
        for shift in (-width, width):
            inner &= np.roll(mask, shift, axis=axis)
    return mask & ~inner


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(3 * sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(k * padded[i:i + image.shape[0]] for i, k in enumerate(kernel))
    return sum(k * rows[:, i:i + image.shape[1]] for i, k in enumerate(kernel))


def render(scene: Scene) -> np.ndarray:
    """The scene as a (64, 64, 3) uint8 RGB array."""
    n = SIZE * _SUPERSAMPLE
    canvas = np.empty((n, n, 3), dtype=np.float32)
    canvas[:] = RGB[scene.background]
    body = np.asarray(RGB[scene.colour], dtype=np.float32)
    second = body * 0.45 if scene.pattern_colour is None else np.asarray(RGB[scene.pattern_colour], np.float32)
    sketch = scene.rendering == "sketch"
    pattern = pattern_mask(scene.pattern, scene.pattern_phase, thin=sketch)
    for thing in scene.things:
        mask = shape_mask(scene.shape, thing)
        if sketch:  # line art: the outline and the pattern's lines in the object's colour
            canvas[_outline(mask) | (mask & pattern)] = body
        else:
            canvas[mask] = body
            canvas[mask & pattern] = second
    image = canvas.reshape(SIZE, _SUPERSAMPLE, SIZE, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    if scene.rendering == "blurry":
        image = _blur(image, 1.8)
    elif scene.rendering == "pixelated":
        block = 4
        small = image.reshape(SIZE // block, block, SIZE // block, block, 3).mean(axis=(1, 3))
        image = small.repeat(block, axis=0).repeat(block, axis=1)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# The judges' attributes, named and unnamed alike (the classifier's heads; `Scene` attributes of the same names).
ATTRIBUTES: dict[str, tuple] = {"shape": ALL_SHAPES, "colour": ALL_COLOURS, "pattern": ALL_PATTERNS,
                                "second": SECOND_COLOURS, "background": BACKGROUNDS, "count": COUNTS,
                                "rendering": RENDERINGS}


def shown(scene: Scene, name: str):
    """The value of attribute `name` that the scene's image shows: the scene's own, except that a sketch draws its
    pattern in the body's colour, so a sketch shows no second colour ("shade")."""
    if name == "second" and scene.rendering == "sketch":
        return "shade"
    return getattr(scene, name)


def symmetric_colours(scene: Scene) -> bool:
    """Whether the image cannot tell the body colour from the pattern's: checks in two colours (half the squares
    each), or stripes in two colours (the stripes cover 42-51% of an object, 5th to 95th percentile, and more than
    half of it in one image in ten). Judges read such colours as an unordered pair."""
    second = shown(scene, "second")
    return scene.pattern in ("checkered", "striped") and second in ALL_COLOURS and second != "shade"


@dataclass(frozen=True)
class Labels:
    """Integer attribute labels of a scene, the classifier's targets (indices into `ATTRIBUTES`)."""

    shape: int
    colour: int
    pattern: int
    second: int
    background: int
    count: int
    rendering: int

    @classmethod
    def of(cls, scene: Scene) -> "Labels":
        return cls(**{name: values.index(shown(scene, name)) for name, values in ATTRIBUTES.items()})


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a canonical-style caption names (shape, colour, pattern, background, count, rendering)."""
    words = text.replace(" background", "").split()
    found: dict[str, str] = {"count": "2" if "two" in words else "1", "pattern": "plain", "rendering": "photo"}
    for rendering, prefixes in RENDERING_PREFIXES.items():
        if rendering != "photo" and text.startswith(prefixes[0]):
            found["rendering"] = rendering
    singular = {p: s for s, p in PLURALS.items()}
    for i, w in enumerate(words):
        w = singular.get(w, w)
        if w in SHAPES:
            found["shape"] = w
        elif w in PATTERNS:
            found["pattern"] = w
        elif w in BACKGROUNDS and i > 0 and words[i - 1] == "a" and "on" in words[:i]:
            found["background"] = w
        elif w in COLOURS and "colour" not in found:
            found["colour"] = w
    return found


def dataset(world: World, start: int, count: int) -> tuple[np.ndarray, list[Scene]]:
    """Images (count, 64, 64, 3) uint8 and scenes for indices start .. start+count-1."""
    scenes = [world.scene(i) for i in range(start, start + count)]
    return np.stack([render(s) for s in scenes]), scenes


__all__ = ["World", "Scene", "Thing", "Labels", "render", "caption", "vocabulary", "parse_caption", "dataset",
           "ATTRIBUTES", "BLENDS", "described", "shown", "symmetric_colours", "SHAPES", "COLOURS", "BACKGROUNDS",
           "PATTERNS", "COUNTS", "RENDERINGS", "RGB", "SIZE", "UNNAMED_SHAPES", "UNNAMED_COLOURS", "UNNAMED_PATTERNS",
           "UNNAMED_WORDS", "SECOND_COLOURS"]
