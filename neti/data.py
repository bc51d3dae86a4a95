"""Images in, tensors out: the training data pipeline of NeTI (Alaluf et al. 2023, Sec. 4).

NeTI trains on the data pipeline of Textual Inversion (Gal et al. 2022, Sec. 4 and its code): 3-10 images of
the concept, resized to the model resolution and cropped, randomly flipped (p = 0.5), each paired with a random
prompt template ("a photo of a {}", ...) whose `{}` the trainer fills with the placeholder token. This module
holds that pipeline and everything users' files need before it:

- `load_images` reads a folder or a list of files of any common format, applies the EXIF orientation, takes
  the first frame of animations, applies embedded ICC profiles, composites transparency on white and converts
  every Pillow mode (greyscale, palette, CMYK, L*a*b*, 16-bit, float) to 8-bit sRGB. Unreadable files are
  skipped and reported in one warning; inputs that leave nothing to train on raise `ImageInputError`.
- `to_tensor` turns one image into a (3, R, R) float tensor in [-1, 1] (short side resized, bicubic; centre or
  random crop).
- `ConceptDataset` yields `{"pixel_values", "template"}` items whose randomness depends only on (seed, index),
  so a resumed run sees exactly the data of an uninterrupted one.
- Captions (our addition, as kohya_ss's caption files): an image may carry its own template, e.g. "a {} on a
  white background", in a sidecar `<name>.txt` or a PNG text chunk `caption`; it replaces the random template
  for that image, so that what the words already explain (the background) is not learnt into the concept.
"""

from __future__ import annotations

import io
import logging
import operator
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import CROP_MODES, TEMPLATE_KINDS, check_template_kind

try:  # colour management needs Pillow built with LittleCMS (the default wheels are)
    from PIL import ImageCms
except ImportError:  # pragma: no cover - depends on the Pillow build
    ImageCms = None

__all__ = [
    "IMAGE_EXTENSIONS",
    "OBJECT_TEMPLATES",
    "STYLE_TEMPLATES",
    "ConceptDataset",
    "ImageInputError",
    "ImageSet",
    "LoadedImage",
    "CAPTION_CHUNK",
    "check_image",
    "load_images",
    "read_caption",
    "read_image",
    "template_kind",
    "to_tensor",
]

logger = logging.getLogger(__name__)

# The object templates of Textual Inversion (`imagenet_templates_small`), used unchanged by NeTI.
OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

# The style templates of Textual Inversion (`imagenet_style_templates_small`). The two repeated entries are in
# the original list; they are kept so that sampling frequencies match the reference implementation.
STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

_TEMPLATE_KINDS: dict[str, tuple[str, ...]] = dict(zip(TEMPLATE_KINDS, (OBJECT_TEMPLATES, STYLE_TEMPLATES)))

# Extensions picked up when `load_images` is given a folder (compared case-insensitively). Files passed
# explicitly in a list are read whatever their extension: their content decides.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


# NeTI and Textual Inversion use 3-10 images; above this many, warn that training needs more steps.
FEW_IMAGES = 3  # NeTI uses 3-10 images
MANY_IMAGES_WARNING = 50

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ICC_MODES = {"RGB": "RGB", "RGBA": "RGBA", "CMYK": "RGB"}  # modes whose embedded ICC profile we apply -> output


class ImageInputError(ValueError):
    """A user's training images cannot be used; the message names the file or value and what to do."""


@dataclass(frozen=True)
class LoadedImage:
    """One training image, decoded and normalised."""

    path: Path  # the file it was read from
    image: Image.Image  # 8-bit RGB, EXIF orientation applied, transparency composited on white
    caption: str | None = None  # its own prompt template with {} (see `read_caption`), if it has one


@dataclass(frozen=True)
class ImageSet(Sequence[LoadedImage]):
    """What `load_images` returns: the readable images, in order, and the files that were skipped.

    Behaves as a read-only sequence of `LoadedImage` (`len`, indexing, iteration), so it can be used wherever a
    `list[LoadedImage]` is expected.
    """

    images: tuple[LoadedImage, ...]  # the readable images, in input order (folders: sorted by file name)
    skipped: tuple[tuple[Path, str], ...] = ()  # (file, reason) for each unreadable file, in input order

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int | slice) -> LoadedImage | tuple[LoadedImage, ...]:  # type: ignore[override]
        return self.images[index]

    def __iter__(self) -> Iterator[LoadedImage]:
        return iter(self.images)

    @property
    def pil_images(self) -> tuple[Image.Image, ...]:
        """The RGB images alone, e.g. for `ConceptDataset`."""
        return tuple(item.image for item in self.images)

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(item.path for item in self.images)


def image_warnings(images: Sequence[Image.Image | LoadedImage], resolution: int) -> list[str]:
    """What a user should know before training on `images` at `resolution`: too few of them, or too small."""
    warnings = []
    if len(images) < FEW_IMAGES:
        warnings.append(
            f"only {len(images)} training image(s): NeTI uses 3-10 views of the concept; with fewer it tends to copy "
            "the photo (pose, background, framing) and follows new prompts less well. Add more views if you can."
        )
    small = []
    for index, item in enumerate(images):
        image = item.image if isinstance(item, LoadedImage) else item
        if min(image.size) < resolution:
            name = item.path.name if isinstance(item, LoadedImage) else f"image {index + 1}"
            small.append(f"{name} is {image.size[0]}x{image.size[1]}")
    if small:
        warnings.append(
            f"{len(small)} image(s) smaller than the model's {resolution}x{resolution} px ({', '.join(small[:3])}"
            f"{', ...' if len(small) > 3 else ''}): they are upscaled, so the concept learns blurred, blocky "
            f"detail and generations look soft. Use photos of at least {resolution} px on the short side."
        )
    return warnings


def template_kind(name: str) -> tuple[str, ...]:
    """Return the prompt templates for a learnable property: "object" or "style"."""
    return _TEMPLATE_KINDS[check_template_kind(name)]


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_images(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    max_images: int | None = None,
) -> ImageSet:
    """Read training images from a folder or a list of files; return them as 8-bit RGB with the skipped files.

    A folder is read non-recursively: files whose extension is in `IMAGE_EXTENSIONS` (any case), sorted by
    name (case-insensitively); hidden files, sub-folders and other files are ignored (logged at debug level).
    A path to a single file is read as a one-file list. In a list, every file is read whatever its extension.

    Each image gets its EXIF orientation applied; animations give their first frame; an embedded ICC profile
    (RGB, RGBA, CMYK) is applied to give sRGB; transparency is composited on white; greyscale, bilevel,
    palette, CMYK, L*a*b*, 16-bit integer (scaled by 1/257) and float images (values in [0, 1] scaled by 255,
    other values clipped to [0, 255]) become 8-bit RGB.

    Files that cannot be decoded are skipped: all of them are named, with reasons, in one logged warning and in
    `ImageSet.skipped`. Raises `ImageInputError` when the folder or a listed file does not exist, a folder holds
    no image files, there are more candidate files than `max_images`, no file is readable, or an image is over
    Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`).
    """
    if max_images is not None and (
        isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1
    ):
        raise ImageInputError(f"max_images must be a positive integer or None, got {max_images!r}.")

    files, where = _candidate_files(source)
    if max_images is not None and len(files) > max_images:
        raise ImageInputError(
            f"{where} has {len(files)} image files, more than max_images={max_images}. "
            f"Choose the best {max_images} or fewer (NeTI uses 3-10), or raise max_images."
        )

    images: list[LoadedImage] = []
    skipped: list[tuple[Path, str]] = []
    for path in files:
        loaded, reason = check_image(path)
        if loaded is None:
            skipped.append((path, reason))
        else:
            images.append(loaded)

    if not images:
        listing = "; ".join(f"{path.name}: {reason}" for path, reason in skipped)
        raise ImageInputError(
            f"None of the {len(files)} file(s) in {where} could be read as an image ({listing}). "
            "Re-export them as JPEG or PNG, or choose other files."
        )
    if skipped:
        listing = "; ".join(f"{path} ({reason})" for path, reason in skipped)
        logger.warning(
            "Skipped %d unreadable file(s) of %d in %s: %s. Training uses the other %d image(s).",
            len(skipped),
            len(files),
            where,
            listing,
            len(images),
        )
    if len(images) > MANY_IMAGES_WARNING:
        logger.warning(
            "Loaded %d images from %s, more than %d: NeTI uses 3-10; training takes more steps to cover them.",
            len(images),
            where,
            MANY_IMAGES_WARNING,
        )
    return ImageSet(images=tuple(images), skipped=tuple(skipped))


def _candidate_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[Path], str]:
    """Resolve `source` into the files to read and a phrase naming it for messages."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if folder.is_file():
            return [folder], f"'{folder}'"
        if not folder.exists():
            raise ImageInputError(
                f"Image folder '{folder}' does not exist. Check the path, or pass a list of image files."
            )
        if not folder.is_dir():
            raise ImageInputError(f"'{folder}' is neither a folder nor a file; pass a folder of images.")
        files: list[Path] = []
        for entry in sorted(folder.iterdir(), key=lambda p: (p.name.casefold(), p.name)):
            if entry.name.startswith("."):
                logger.debug("Ignoring hidden entry %s", entry)
            elif not entry.is_file():
                logger.debug("Ignoring %s: not a file (folders are read non-recursively)", entry)
            elif entry.suffix.lower() not in IMAGE_EXTENSIONS:
                logger.debug("Ignoring %s: extension %r is not an image extension", entry, entry.suffix)
            else:
                files.append(entry)
        if not files:
            raise ImageInputError(
                f"Image folder '{folder}' contains no image files (looked for "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}). Add 3-10 images of the concept to it."
            )
        return files, f"folder '{folder}'"

    if not isinstance(source, Sequence):
        raise ImageInputError(
            f"Images must be given as a folder path or a list of file paths, got {type(source).__name__}."
        )
    files = []
    for item in source:
        if not isinstance(item, (str, os.PathLike)):
            raise ImageInputError(f"Image paths must be strings or paths, got {item!r} ({type(item).__name__}).")
        path = Path(item)
        if not path.exists():
            raise ImageInputError(f"Image file '{path}' does not exist. Check the path or remove it from the list.")
        if path.is_dir():
            raise ImageInputError(
                f"'{path}' is a folder, not an image file. Pass the folder itself instead of a list, "
                "or list its image files."
            )
        files.append(path)
    if not files:
        raise ImageInputError("The list of image files is empty. Give at least one image (NeTI uses 3-10).")
    return files, f"the {len(files)} listed file(s)"


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


CAPTION_CHUNK = "caption"  # the PNG text chunk that may hold an image's caption
MAX_CAPTION_CHARS = 1000  # a prompt template; the text encoder reads 77 tokens of it at most


def read_caption(path: str | os.PathLike) -> str | None:
    """An image's own prompt template: the sidecar `<name>.txt` (first line), else the PNG text chunk `caption`;
    None when it has neither. A caption must hold exactly one `{}` where the concept goes."""
    path = Path(path)
    sidecar = path.with_suffix(".txt")
    caption, source = None, ""
    if sidecar != path and sidecar.is_file():  # an image renamed .txt is not its own caption
        with open(sidecar, encoding="utf-8", errors="replace") as f:
            head = f.read(MAX_CAPTION_CHARS + 2)  # a caption is one short line: never read a huge file whole
        lines = head.strip().splitlines()
        caption, source = (lines[0].strip() if lines else ""), f"caption file {sidecar}"
    else:
        try:
            with Image.open(path) as opened:
                caption = (getattr(opened, "text", None) or {}).get(CAPTION_CHUNK)
        except Exception:  # not an image Pillow reads: read_image reports it
            return None
        source = f"the '{CAPTION_CHUNK}' text chunk of {path}"
    if caption is None:
        return None
    if len(caption) > MAX_CAPTION_CHARS:
        raise ImageInputError(f"{source}: the caption is {len(caption):,} characters long, more than "
                              f"{MAX_CAPTION_CHARS:,}; a caption is a short prompt such as 'a {{}} on a white "
                              "background'. Shorten it or remove it")
    try:
        return _check_templates([caption])[0]
    except ValueError as error:
        raise ImageInputError(f"{source}: {error}") from None


def check_image(path: str | os.PathLike, max_bytes: int | None = None) -> tuple[LoadedImage | None, str]:
    """One training image file, judged by its content as every caller judges it (`load_images`, the app's
    uploads): (the image with its caption, "") or (None, the reason it cannot be used: unreadable, empty, over
    `max_bytes`, not decodable). Raises `ImageInputError` for a decompression bomb or a malformed caption."""
    path = Path(path)
    if max_bytes is not None and path.is_file() and (size := path.stat().st_size) > max_bytes:
        return None, f"{size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit per file"
    image, reason = read_image(path)
    if image is None:
        return None, reason
    return LoadedImage(path=path, image=image, caption=read_caption(path)), ""


def read_image(path: str | os.PathLike) -> tuple[Image.Image | None, str]:
    """Decode one file to RGB; return (image, "") or (None, the reason it cannot be used).

    Raises `ImageInputError` only for a decompression bomb (over `PIL.Image.MAX_IMAGE_PIXELS`).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return None, "empty file (0 bytes)"
    except OSError as error:
        return None, f"cannot be read ({error.strerror or error})"

    limit = Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if limit is not None and width * height > limit:
                # Pillow only warns between the limit and twice the limit; either way it is not decoded here.
                raise _bomb_error(path, f"{width}x{height} = {width * height:,} pixels", limit)
            opened.load()  # the first frame of an animation
            try:
                oriented = ImageOps.exif_transpose(opened)
            except Exception as error:  # a malformed EXIF block must not cost the image
                logger.debug("Ignoring the EXIF orientation of %s: %s", path, error)
                oriented = opened.copy()
    except Image.DecompressionBombError as error:
        match = _BOMB_PIXELS.search(str(error))
        size = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
        raise _bomb_error(path, size, limit) from error
    except ImageInputError:
        raise
    except Image.UnidentifiedImageError:
        return None, "not an image file Pillow can read"
    except Exception as error:  # truncated or corrupt data, unreadable file
        return None, f"cannot be decoded ({type(error).__name__}: {error})"

    try:
        return _to_rgb(oriented), ""
    except ValueError as error:
        return None, str(error)


def _bomb_error(path: Path, size: str, limit: int | None) -> ImageInputError:
    return ImageInputError(
        f"Image '{path}' is {size}, over Pillow's decompression-bomb limit of {limit:,} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS). Downscale it (training uses at most the model resolution), or raise "
        "PIL.Image.MAX_IMAGE_PIXELS if you trust the file."
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white. Always returns a new image."""
    image = _to_srgb(image)
    mode = image.mode
    if mode in _INT_MODES:
        # 16-bit data: 65535 -> 255 (divide by 257, round), never clip the high byte away.
        values = np.asarray(image).astype(np.float64) / 257.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0  # a [0, 1] float image
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "LAB":
        return _lab_to_rgb(image)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        unpremultiplied = image.convert("LA") if mode == "La" else image  # Pillow has no La -> RGBA
        rgba = unpremultiplied.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # also copies when already RGB
    except (ValueError, OSError) as error:
        raise ValueError(f"Pillow cannot convert image mode {mode!r} to RGB ({error})") from error


def _to_srgb(image: Image.Image) -> Image.Image:
    """Apply an embedded ICC profile (Display P3 phone photos, CMYK print profiles) to get sRGB values.

    Images without a profile, in other modes, or with a profile LittleCMS rejects are returned unchanged
    (their values are taken as sRGB, as Textual Inversion's loader does).
    """
    icc = image.info.get("icc_profile")
    if not icc or ImageCms is None or image.mode not in _ICC_MODES:
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(
            image, source, ImageCms.createProfile("sRGB"), outputMode=_ICC_MODES[image.mode]
        )
    except Exception as error:  # a broken or mismatched profile must not cost the image
        logger.debug("Ignoring an embedded ICC profile that cannot be applied: %s", error)
        return image
    converted.info = {key: value for key, value in image.info.items() if key != "icc_profile"}
    return converted


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    """CIE L*a*b* (e.g. CIELab TIFFs) to sRGB; Pillow's plain `convert` copies the channels instead."""
    if ImageCms is None:  # pragma: no cover - depends on the Pillow build
        raise ValueError("L*a*b* images need Pillow with LittleCMS (ImageCms); convert the file to RGB")
    transform = ImageCms.buildTransform(
        ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
    )
    return ImageCms.applyTransform(image, transform)


# --------------------------------------------------------------------------------------------------------------
# Tensors


def _check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % 8:
        raise ValueError(
            f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {resolution!r}; "
            "use the model's resolution, e.g. 512 for Stable Diffusion 1.x."
        )


def _check_crop(crop: str) -> None:
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}.")


def _resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    """Resize (bicubic) so that the short side is `resolution`, keeping the aspect ratio."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size == image.size:
        return image
    return image.resize(size, resample=Image.Resampling.BICUBIC)


def _crop_origin(width: int, height: int, resolution: int, crop: str, rng: random.Random) -> tuple[int, int]:
    """Top-left corner (left, top) of a `resolution` square inside a (width, height) image."""
    if crop == "center":
        return (width - resolution) // 2, (height - resolution) // 2
    return rng.randint(0, width - resolution), rng.randint(0, height - resolution)


def _to_uint8_chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.to(torch.float32) / 127.5 - 1.0  # uint8 [0, 255] -> float32 [-1, 1]


def to_tensor(
    image: Image.Image,
    resolution: int,
    crop: str = "center",
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Resize the short side to `resolution` (bicubic), crop a square; return (3, R, R) float32 in [-1, 1].

    `crop="random"` draws the square's position from `rng` (a fresh, OS-seeded `random.Random` when None: pass
    one for reproducible crops). Images that are not RGB are converted as `load_images` does.
    """
    _check_resolution(resolution)
    _check_crop(crop)
    if not isinstance(image, Image.Image):
        raise TypeError(f"to_tensor expects a PIL image, got {type(image).__name__}.")
    rgb = image if image.mode == "RGB" else _to_rgb(image)
    resized = _resize_short_side(rgb, resolution)
    left, top = _crop_origin(*resized.size, resolution, crop, rng if rng is not None else random.Random())
    square = resized.crop((left, top, left + resolution, top + resolution))
    return _normalise(_to_uint8_chw(square))


class ConceptDataset(torch.utils.data.Dataset):
    """The concept's training items: `{"pixel_values": (3, R, R) float32 in [-1, 1], "template": str}`.

    Item `i` shows image `i % len(images)`, cropped (centre or random) and flipped horizontally with
    probability `flip_p`, with a template drawn from `templates`, or the image's own caption when it is a
    `LoadedImage` with one and `use_captions` is set; the template keeps its `{}`, which the trainer fills with
    the placeholder. All of an item's randomness comes from its own `random.Random` seeded
    with (seed, i), drawn in the order template, flip, crop: an item never depends on global random state or on
    which items were read before it, so resuming training reproduces the same data.
    """

    def __init__(
        self,
        images: Sequence[Image.Image | LoadedImage],
        resolution: int,
        templates: Sequence[str] = OBJECT_TEMPLATES,
        flip_p: float = 0.5,
        crop: str = "center",
        seed: int = 0,
        repeats: int = 100,
        use_captions: bool = True,
    ) -> None:
        _check_resolution(resolution)
        _check_crop(crop)
        if isinstance(flip_p, bool) or not isinstance(flip_p, (int, float)) or not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be a probability in [0, 1], got {flip_p!r}; the paper uses 0.5.")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        self.templates: tuple[str, ...] = _check_templates(templates)

        pils = [item.image if isinstance(item, LoadedImage) else item for item in images]
        self.captions: tuple[str | None, ...] = tuple(
            item.caption if use_captions and isinstance(item, LoadedImage) else None for item in images)
        if not pils:
            raise ValueError("ConceptDataset needs at least one image; got none (NeTI uses 3-10).")
        for index, pil in enumerate(pils):
            if not isinstance(pil, Image.Image):
                raise TypeError(f"images[{index}] is a {type(pil).__name__}, not a PIL image; use load_images().")

        self.resolution = resolution
        self.flip_p = float(flip_p)
        self.crop = crop
        self.seed = seed
        self.repeats = repeats
        # Resized once here so that an item only slices, flips and scales: (3, H, W) uint8, min(H, W) == R.
        self._pixels: tuple[torch.Tensor, ...] = tuple(
            _to_uint8_chw(_resize_short_side(pil if pil.mode == "RGB" else _to_rgb(pil), resolution))
            for pil in pils
        )

    @property
    def num_images(self) -> int:
        return len(self._pixels)

    def __len__(self) -> int:
        return self.num_images * self.repeats

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        index = operator.index(index)  # ints, NumPy ints and 0-d integer tensors
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"index {index} is out of range for a ConceptDataset of {length} items.")
        index %= length  # negative indices read the same item as their positive twin
        rng = random.Random(f"{self.seed}/{index}")  # str seeds hash with SHA-512: stable across processes
        template = rng.choice(self.templates)  # drawn even when a caption replaces it: same data either way
        template = self.captions[index % self.num_images] or template
        flip = rng.random() < self.flip_p
        pixels = self._pixels[index % self.num_images]
        _, height, width = pixels.shape
        left, top = _crop_origin(width, height, self.resolution, self.crop, rng)
        square = pixels[:, top : top + self.resolution, left : left + self.resolution]
        if flip:
            square = square.flip(-1)
        return {"pixel_values": _normalise(square), "template": template}


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        raise ValueError(
            f"templates must be a sequence of prompt templates, got the string {templates!r}; "
            f"for a named list use template_kind({templates!r})."
        )
    checked = tuple(templates)
    if not checked:
        raise ValueError("templates is empty; pass OBJECT_TEMPLATES, STYLE_TEMPLATES or your own list.")
    for template in checked:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(
                f"Each template must be a string with exactly one '{{}}' where the concept goes, got {template!r} "
                "(e.g. 'a photo of a {}')."
            )
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as error:
            raise ValueError(
                f"Template {template!r} has other braces besides '{{}}' ({error}); double literal braces as '{{{{'."
            ) from error
    return checked
