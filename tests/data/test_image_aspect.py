"""data.image_aspect: `pad` (LLaVA's expand2square) puts a wide or tall image, centred and whole, on a square
of the image processor's mean colour before resizing; `resize` lets the processor centre-crop it."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mllm.processing import pad_to_square
from mllm.schema import ConfigError, from_dict
from mllm.train.config import DataSpec

RED = (200, 20, 20)


def test_pad_to_square_centres_the_image_on_mean_colour_bars():
    fill = (122, 116, 104)  # CLIP's mean * 255, truncated as LLaVA does
    wide = pad_to_square(Image.new("RGB", (96, 48), RED), fill)
    assert wide.size == (96, 96)
    assert [wide.getpixel((40, y)) for y in (0, 23, 24, 71, 72, 95)] == [fill, fill, RED, RED, fill, fill]
    tall = pad_to_square(Image.new("RGB", (30, 90), RED), fill)
    assert tall.size == (90, 90)
    assert [tall.getpixel((x, 45)) for x in (0, 29, 30, 59, 60, 89)] == [fill, fill, RED, RED, fill, fill]
    square = Image.new("RGB", (8, 8), RED)
    assert pad_to_square(square, fill) is square


def test_pad_keeps_the_whole_image_and_its_bars_normalise_to_zero(tiny, tokenizer):
    processor = tiny.processor(tokenizer, tiny.config())  # CLIP: resize short side to 48, centre-crop 48x48
    image = Image.new("RGB", (96, 48), RED)
    for x in range(8):  # a blue stripe at the left edge: the crop of `resize` loses it, `pad` keeps it
        for y in range(48):
            image.putpixel((x, y), (20, 20, 200))
    padded = processor.preprocess_images([image], aspect="pad")[0]  # [3, 48, 48]
    resized = processor.preprocess_images([image], aspect="resize")[0]
    assert padded.shape == resized.shape == (3, 48, 48)
    # Rows 0-11 and 36-47 are bars: the mean colour (up to LLaVA's truncation to integers) normalises to ~0.
    assert padded[:, :11].abs().max() < 0.03 and padded[:, 37:].abs().max() < 0.03
    red = processor.preprocess_images([Image.new("RGB", (48, 48), RED)])[0, :, 24, 24]
    torch.testing.assert_close(padded[:, 14:34, 24:40], red[:, None, None].expand(3, 20, 16))  # content, centred
    assert padded[2, 24, 1] > padded[0, 24, 1]  # the blue stripe survives at the left edge ...
    assert resized[0, 24, 1] > resized[2, 24, 1]  # ... and the centre crop of `resize` cut it away
    with pytest.raises(ValueError, match="resize, pad"):
        processor.preprocess_images([image], aspect="crop")


def test_image_aspect_is_a_checked_config_key():
    assert from_dict(DataSpec, {"image_aspect": "pad"}).image_aspect == "pad"
    assert from_dict(DataSpec, {"image_aspect": "anyres"}).image_aspect == "anyres"
    with pytest.raises(ConfigError, match="'resize', 'pad', 'anyres'"):
        from_dict(DataSpec, {"image_aspect": "crop"})
