"""Specification of neti.data: every image format and mode in, the right tensors and templates out.

All fixture images are generated here in `tmp_path`; they are a few pixels wide so the file runs in seconds.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image, features

from neti.data import (
    IMAGE_EXTENSIONS,
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    ConceptDataset,
    ImageInputError,
    ImageSet,
    LoadedImage,
    load_images,
    template_kind,
    to_tensor,
)

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def load_one(path) -> Image.Image:
    (loaded,) = load_images([path])
    assert loaded.image.mode == "RGB"
    return loaded.image


def stored_mode(path) -> str:
    with Image.open(path) as image:
        return image.mode


def close(pixel, expected, tolerance=6) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected))


def halves(left, right, size=(16, 8)) -> Image.Image:
    """An RGB image whose left half is `left` and right half `right`."""
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


# --------------------------------------------------------------------------------------------------------------
# Templates


def test_templates_are_the_textual_inversion_lists():
    assert len(OBJECT_TEMPLATES) == 27 and len(STYLE_TEMPLATES) == 19
    assert OBJECT_TEMPLATES[:3] == ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}")
    assert STYLE_TEMPLATES[0] == "a painting in the style of {}"
    assert all(t.count("{}") == 1 for t in OBJECT_TEMPLATES + STYLE_TEMPLATES)


def test_template_kind_maps_names_and_rejects_others():
    assert template_kind("object") is OBJECT_TEMPLATES
    assert template_kind("style") is STYLE_TEMPLATES
    with pytest.raises(ValueError, match=r"'scene'.*\['object', 'style'\]"):
        template_kind("scene")


def test_image_extensions():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


# --------------------------------------------------------------------------------------------------------------
# Formats and modes


@pytest.mark.parametrize(
    "suffix, options",
    [
        (".jpg", {"quality": 95}),
        (".png", {}),
        pytest.param(
            ".webp",
            {"lossless": True},
            marks=pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP"),
        ),
        (".bmp", {}),
        (".tiff", {}),
    ],
)
def test_each_format_loads_as_rgb_with_its_pixels(tmp_path, suffix, options):
    path = tmp_path / f"image{suffix}"
    halves(RED, BLUE).save(path, **options)
    image = load_one(path)
    assert image.size == (16, 8)
    assert close(image.getpixel((2, 4)), RED) and close(image.getpixel((13, 4)), BLUE)


def test_animated_gif_gives_its_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, GREEN, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as stored:
        assert stored.n_frames == 3
    image = load_one(path)
    assert image.getpixel((4, 4)) == RED


def test_exif_orientation_is_applied(tmp_path):
    # Stored 32 wide x 16 high, red 8x8 block at the stored top-left. Orientation 6 = "rotate 90 CW to view".
    stored = Image.new("RGB", (32, 16), (128, 128, 128))
    stored.paste(RED, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, quality=95, exif=exif)
    image = load_one(path)
    assert image.size == (16, 32)  # transposed
    assert close(image.getpixel((12, 3)), RED, tolerance=20)  # top-left moved to top-right
    assert close(image.getpixel((3, 3)), (128, 128, 128), tolerance=20)


def test_rgba_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (4, 0, 8, 4))  # opaque blue
    rgba.putpixel((0, 0), (0, 0, 0, 128))  # half-transparent black
    rgba.save(tmp_path / "rgba.png")
    image = load_one(tmp_path / "rgba.png")
    assert image.getpixel((1, 1)) == WHITE
    assert image.getpixel((6, 1)) == BLUE
    assert close(image.getpixel((0, 0)), (127, 127, 127), tolerance=1)


def test_la_transparency_is_composited_on_white(tmp_path):
    la = Image.new("LA", (4, 4), (0, 0))  # transparent black
    la.putpixel((0, 0), (0, 255))  # opaque black
    la.save(tmp_path / "la.png")
    image = load_one(tmp_path / "la.png")
    assert image.getpixel((2, 2)) == WHITE and image.getpixel((0, 0)) == BLACK


def test_palette_with_transparent_index_is_composited_on_white(tmp_path):
    palette_image = Image.new("P", (4, 4), 0)
    palette_image.putpalette([*RED, *BLUE] + [0] * (256 - 2) * 3)
    palette_image.putpixel((0, 0), 1)
    palette_image.save(tmp_path / "p.png", transparency=0)  # index 0 (red) is transparent
    image = load_one(tmp_path / "p.png")
    assert image.getpixel((2, 2)) == WHITE and image.getpixel((0, 0)) == BLUE


def test_gif_transparency_is_composited_on_white(tmp_path):
    first = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # transparent
    first.putpixel((0, 0), (*GREEN, 255))
    first.save(tmp_path / "t.gif", save_all=True, append_images=[Image.new("RGBA", (8, 8), (*BLUE, 255))])
    image = load_one(tmp_path / "t.gif")
    assert image.getpixel((3, 3)) == WHITE and image.getpixel((0, 0)) == GREEN


def test_palette_without_transparency_keeps_its_colours(tmp_path):
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([*RED, *GREEN] + [0] * (256 - 2) * 3)
    palette_image.save(tmp_path / "p.bmp")
    assert load_one(tmp_path / "p.bmp").getpixel((1, 1)) == GREEN


def test_greyscale_and_bilevel_become_grey_rgb(tmp_path):
    Image.new("L", (4, 4), 77).save(tmp_path / "grey.png")
    bilevel = Image.new("1", (4, 4), 0)
    bilevel.putpixel((0, 0), 1)
    bilevel.save(tmp_path / "bilevel.png")
    assert load_one(tmp_path / "grey.png").getpixel((1, 1)) == (77, 77, 77)
    image = load_one(tmp_path / "bilevel.png")
    assert image.getpixel((0, 0)) == WHITE and image.getpixel((1, 1)) == BLACK


@pytest.mark.parametrize("suffix", [".jpg", ".tiff"])
def test_cmyk_becomes_rgb(tmp_path, suffix):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / f"cmyk{suffix}")  # no cyan, full M+Y = red
    assert close(load_one(tmp_path / f"cmyk{suffix}").getpixel((4, 4)), RED, tolerance=8)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32896, 0, 257]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert stored_mode(tmp_path / "deep.png") == "I;16"
    image = np.asarray(load_one(tmp_path / "deep.png"))
    assert image[0, :, 0].tolist() == [255, 128, 0, 1]
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_32_bit_integer_and_float_tiffs_become_8_bit(tmp_path):
    Image.fromarray(np.array([[65535, 32896]], dtype=np.int32)).save(tmp_path / "int.tif")
    Image.fromarray(np.array([[1.0, 0.5, 0.0]], dtype=np.float32)).save(tmp_path / "float.tif")
    assert stored_mode(tmp_path / "int.tif") == "I" and stored_mode(tmp_path / "float.tif") == "F"
    assert np.asarray(load_one(tmp_path / "int.tif"))[0, :, 0].tolist() == [255, 128]
    assert np.asarray(load_one(tmp_path / "float.tif"))[0, :, 0].tolist() == [255, 128, 0]


def test_embedded_icc_profile_is_applied_and_a_broken_one_ignored(tmp_path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (4, 4), (200, 100, 50)).save(tmp_path / "srgb.png", icc_profile=srgb)
    Image.new("RGB", (4, 4), (200, 100, 50)).save(tmp_path / "broken.png", icc_profile=b"not a profile")
    assert close(load_one(tmp_path / "srgb.png").getpixel((1, 1)), (200, 100, 50), tolerance=2)
    assert load_one(tmp_path / "broken.png").getpixel((1, 1)) == (200, 100, 50)


def test_lab_tiff_is_converted_colorimetrically(tmp_path):
    Image.new("LAB", (4, 4), (128, 128, 128)).save(tmp_path / "lab.tif")  # L* = 50, a* = b* = 0: mid grey
    assert close(load_one(tmp_path / "lab.tif").getpixel((1, 1)), (119, 119, 119), tolerance=3)


# --------------------------------------------------------------------------------------------------------------
# Folders, lists and bad input


def test_folder_is_read_non_recursively_sorted_by_name_ignoring_other_files(tmp_path, caplog):
    for name, colour in [("b.png", GREEN), ("A.jpg", RED), ("c.PNG", BLUE)]:
        Image.new("RGB", (8, 8), colour).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "nested.png")
    with caplog.at_level(logging.DEBUG, logger="neti.data"):
        result = load_images(tmp_path)
    assert isinstance(result, ImageSet) and result.skipped == ()
    assert [item.path.name for item in result] == ["A.jpg", "b.png", "c.PNG"]
    assert [item.image.getpixel((0, 0)) for item in result] == [RED, GREEN, BLUE]
    assert isinstance(result[0], LoadedImage) and len(result.pil_images) == 3
    assert "notes.txt" in caplog.text


def test_listed_files_are_read_whatever_their_extension(tmp_path):
    path = tmp_path / "photo.dat"
    Image.new("RGB", (8, 8), GREEN).save(path, format="PNG")
    assert load_one(path).getpixel((0, 0)) == GREEN


def test_unreadable_files_are_skipped_and_listed_in_one_warning(tmp_path, caplog):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_text("this is text, not a PNG")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="neti.data"):
        result = load_images(tmp_path)
    assert [item.path.name for item in result] == ["good.png"]
    assert [(path.name, reason) for path, reason in result.skipped] == [
        ("corrupt.png", "not an image file Pillow can read"),
        ("empty.jpg", "empty file (0 bytes)"),
    ]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "corrupt.png" in warnings[0].getMessage() and "empty.jpg" in warnings[0].getMessage()


def test_truncated_file_is_skipped(tmp_path):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    result = load_images([tmp_path / "good.png", tmp_path / "truncated.png"])
    assert len(result) == 1 and result.skipped[0][0].name == "truncated.png"


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ImageInputError, match=r"'.*no_such_folder' does not exist"):
        load_images(tmp_path / "no_such_folder")


def test_missing_file_in_a_list_is_an_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with pytest.raises(ImageInputError, match=r"'.*ghost\.jpg' does not exist"):
        load_images([tmp_path / "ok.png", tmp_path / "ghost.jpg"])


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "readme.md").write_text("no images here")
    with pytest.raises(ImageInputError, match=rf"'{tmp_path}' contains no image files"):
        load_images(tmp_path)


def test_empty_list_is_an_error():
    with pytest.raises(ImageInputError, match="list of image files is empty"):
        load_images([])


def test_folder_of_only_corrupt_files_lists_each_with_its_reason(tmp_path):
    (tmp_path / "one.png").write_text("garbage")
    (tmp_path / "two.jpg").write_bytes(b"")
    with pytest.raises(ImageInputError) as raised:
        load_images(tmp_path)
    message = str(raised.value)
    assert "None of the 2 file(s)" in message
    assert "one.png: not an image file Pillow can read" in message and "two.jpg: empty file (0 bytes)" in message


@pytest.mark.parametrize("size, reported", [((40, 40), "40x40 = 1,600 pixels"), ((100, 100), "10,000 pixels")])
def test_decompression_bomb_is_an_error_naming_file_and_size(tmp_path, monkeypatch, size, reported):
    # 40x40 is over the limit (Pillow only warns); 100x100 is over twice the limit (Pillow raises).
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    Image.new("RGB", size).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageInputError, match=rf"'.*huge\.png' is {reported}, over .* limit of 1,000 pixels"):
        with pytest.warns(Image.DecompressionBombWarning) if size == (40, 40) else _no_op():
            load_images(tmp_path)


class _no_op:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_more_than_50_images_warns(tmp_path, caplog):
    for i in range(51):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i:02d}.bmp")
    with caplog.at_level(logging.WARNING, logger="neti.data"):
        assert len(load_images(tmp_path)) == 51
    assert "NeTI uses 3-10; training takes more steps to cover them" in caplog.text


def test_max_images_caps_the_count(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    assert len(load_images(tmp_path, max_images=3)) == 3
    with pytest.raises(ImageInputError, match=rf"'{tmp_path}' has 3 image files, more than max_images=2"):
        load_images(tmp_path, max_images=2)
    with pytest.raises(ImageInputError, match="max_images must be a positive integer"):
        load_images(tmp_path, max_images=0)


# --------------------------------------------------------------------------------------------------------------
# Tensors


def test_to_tensor_shape_dtype_and_range():
    tensor = to_tensor(halves(WHITE, BLACK, size=(48, 24)), resolution=16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert tensor.max() == 1.0 and tensor.min() == -1.0


def test_centre_crop_takes_the_middle_of_a_wide_image():
    # 64x32, red | blue: no resize needed at 32; the centre square is columns 16..47: 16 red then 16 blue.
    tensor = to_tensor(halves(RED, BLUE, size=(64, 32)), resolution=32)
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    blue = torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1)
    assert torch.equal(tensor[:, :, :16], red.expand(3, 32, 16))
    assert torch.equal(tensor[:, :, 16:], blue.expand(3, 32, 16))


def test_short_side_is_resized_then_centre_cropped():
    # 96x32 stripes red|green|blue at resolution 16: resized to 48x16, the centre square is the green stripe.
    stripes = Image.new("RGB", (96, 32), RED)
    stripes.paste(GREEN, (32, 0, 64, 32))
    stripes.paste(BLUE, (64, 0, 96, 32))
    tall = stripes.transpose(Image.Transpose.ROTATE_90)  # 32x96: stripes stacked vertically
    for image in (stripes, tall):
        pixels = ((to_tensor(image, resolution=16) + 1) * 127.5).round()
        inner = pixels[:, 3:13, 3:13]
        assert (inner[1] >= 250).all() and (inner[0] <= 5).all() and (inner[2] <= 5).all()


def test_random_crop_is_reproducible_given_an_rng():
    gradient = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (16, 1))).convert("RGB")  # 256x16
    first = to_tensor(gradient, 16, crop="random", rng=random.Random(7))
    again = to_tensor(gradient, 16, crop="random", rng=random.Random(7))
    assert torch.equal(first, again)
    others = {to_tensor(gradient, 16, crop="random", rng=random.Random(s))[0, 0, 0].item() for s in range(8)}
    assert len(others) > 1


@pytest.mark.parametrize("kwargs, message", [({"resolution": 12}, "multiple of 8 .*got 12"),
                                             ({"resolution": 0}, "got 0"),
                                             ({"resolution": 16, "crop": "left"}, "got 'left'")])
def test_to_tensor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        to_tensor(Image.new("RGB", (16, 16)), **kwargs)


@pytest.mark.parametrize("mode, colour", [("RGBA", (0, 0, 0, 0)), ("La", (0, 0)), ("P", None)])
def test_to_tensor_converts_non_rgb_images(mode, colour):
    image = Image.new(mode, (8, 8), colour)
    if mode == "P":
        image.putpalette([255] * 768)
    assert torch.equal(to_tensor(image, resolution=8), torch.ones(3, 8, 8))


# --------------------------------------------------------------------------------------------------------------
# Dataset


def test_dataset_items_have_pixels_and_an_unfilled_template():
    dataset = ConceptDataset([halves(RED, BLUE, size=(24, 16))] * 2, resolution=16, repeats=3)
    assert len(dataset) == 6
    item = dataset[0]
    assert set(item) == {"pixel_values", "template"}
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert item["template"] in OBJECT_TEMPLATES and "{}" in item["template"]
    styled = ConceptDataset([halves(RED, BLUE)], resolution=8, templates=template_kind("style"))
    assert all(styled[i]["template"] in STYLE_TEMPLATES for i in range(10))
    with pytest.raises(IndexError):
        dataset[6]


def test_dataset_centre_crop_without_flip_matches_to_tensor():
    image = halves(RED, BLUE, size=(40, 24))
    dataset = ConceptDataset([image], resolution=16, flip_p=0.0, repeats=2)
    assert torch.equal(dataset[1]["pixel_values"], to_tensor(image, 16))


def test_dataset_is_deterministic_per_seed_and_index():
    gradient = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (16, 1))).convert("RGB")  # 64x16
    images = [gradient, halves(RED, BLUE, size=(16, 32))]

    def items(seed, order):
        dataset = ConceptDataset(images, resolution=16, crop="random", seed=seed, repeats=10)
        return {i: dataset[i] for i in order}

    forward = items(3, range(20))
    backward = items(3, reversed(range(20)))  # reading order does not matter
    random.seed(12345)
    torch.manual_seed(12345)  # nor does global random state
    for i in range(20):
        assert torch.equal(forward[i]["pixel_values"], backward[i]["pixel_values"])
        assert forward[i]["template"] == backward[i]["template"]
    other = items(4, range(20))
    assert any(forward[i]["template"] != other[i]["template"] for i in range(20))
    assert any(not torch.equal(forward[i]["pixel_values"], other[i]["pixel_values"]) for i in range(20))


def test_dataset_flips_at_about_flip_p():
    dataset = ConceptDataset([halves(BLACK, WHITE, size=(8, 8))], resolution=8, flip_p=0.3, repeats=2000)
    flipped = sum(dataset[i]["pixel_values"][0, 0, 0].item() == 1.0 for i in range(len(dataset)))
    assert 0.25 < flipped / len(dataset) < 0.35  # binomial sd ~0.01


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"resolution": 20}, "multiple of 8 .*got 20"),
        ({"flip_p": 1.5}, r"flip_p .* got 1\.5"),
        ({"crop": "middle"}, "got 'middle'"),
        ({"templates": ()}, "templates is empty"),
        ({"templates": ("a photo of a dog",)}, "exactly one '{}'.*'a photo of a dog'"),
        ({"templates": ("a {} and a {}",)}, r"'a \{\} and a \{\}'"),
        ({"templates": ("a {} in {place}",)}, "other braces"),
        ({"templates": "object"}, r"template_kind\('object'\)"),
        ({"repeats": 0}, "repeats must be a positive integer, got 0"),
    ],
)
def test_dataset_rejects_bad_arguments(kwargs, message):
    arguments = {"images": [Image.new("RGB", (8, 8))], "resolution": 8} | kwargs
    with pytest.raises(ValueError, match=message):
        ConceptDataset(**arguments)


def test_dataset_accepts_loaded_images_and_rejects_none(tmp_path):
    Image.new("RGB", (8, 8), GREEN).save(tmp_path / "g.png")
    dataset = ConceptDataset(load_images(tmp_path), resolution=8, flip_p=0.0, repeats=1)
    assert torch.equal(dataset[0]["pixel_values"][:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match="at least one image"):
        ConceptDataset([], resolution=8)


# ---- captions: an image's own template ------------------------------------------------------------------------

def _png_with_caption(path, caption=None, colour=RED):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if caption is not None:
        info.add_text("caption", caption)
    Image.new("RGB", (8, 8), colour).save(path, pnginfo=info)
    return path


def test_captions_come_from_a_sidecar_txt_or_the_png_caption_chunk(tmp_path):
    _png_with_caption(tmp_path / "a.png", "a {} on a green background")
    _png_with_caption(tmp_path / "b.png", "a {} in the chunk")
    (tmp_path / "b.txt").write_text("a {} on a white background\nsecond line ignored\n")
    _png_with_caption(tmp_path / "c.png")
    loaded = load_images(tmp_path)
    assert [x.path.name for x in loaded] == ["a.png", "b.png", "c.png"]  # the .txt is not an image
    assert [x.caption for x in loaded] == ["a {} on a green background", "a {} on a white background", None]
    renamed = tmp_path / "d.txt"  # a PNG with a .txt name: read by content, and not its own caption file
    renamed.write_bytes((tmp_path / "a.png").read_bytes())
    assert load_images([renamed])[0].caption == "a {} on a green background"


@pytest.mark.parametrize("where", ["sidecar", "chunk"])
def test_a_caption_without_its_placeholder_is_rejected_naming_the_file(tmp_path, where):
    path = _png_with_caption(tmp_path / "x.png", "a cat" if where == "chunk" else None)
    if where == "sidecar":
        (tmp_path / "x.txt").write_text("a cat on a sofa")
    with pytest.raises(ImageInputError, match=r"x\.(png|txt).*exactly one '\{\}'"):
        load_images(tmp_path)


def test_dataset_uses_each_images_caption_and_otherwise_the_same_random_data(tmp_path):
    _png_with_caption(tmp_path / "a.png", "a {} on a blue background", RED)
    _png_with_caption(tmp_path / "b.png", None, GREEN)
    images = list(load_images(tmp_path))
    with_captions = ConceptDataset(images, 8, seed=3)
    without = ConceptDataset(images, 8, seed=3, use_captions=False)
    plain = ConceptDataset([x.image for x in images], 8, seed=3)
    for i in range(20):
        a, b, c = with_captions[i], without[i], plain[i]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(b["pixel_values"], c["pixel_values"])
        assert b["template"] == c["template"] and b["template"] in OBJECT_TEMPLATES
        assert a["template"] == ("a {} on a blue background" if i % 2 == 0 else b["template"])
