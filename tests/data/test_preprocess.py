"""Image preprocessing: evaluation keeps the aspect (shorter side resized, centre square), training crops
only when data.augment says so, reproducibly."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.data import SharedEpoch, center_square, image_transform
from pipeline.data.records import RandomCrop


def _bands(width: int, height: int) -> Image.Image:
    """Red left quarter, blue right quarter, green in between."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, :] = (0, 255, 0)
    pixels[:, : width // 4] = (255, 0, 0)
    pixels[:, 3 * width // 4:] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_evaluation_resizes_the_shorter_side_and_keeps_the_centre():
    out = center_square(_bands(200, 100), 64)  # 128 x 64 after the resize, then the centre 64 columns
    assert out.size == (64, 64)
    pixels = np.asarray(out)
    assert (pixels[:, :, 1] > 200).all()  # only the green middle: nothing squashed in from the sides
    tall = center_square(_bands(50, 100), 25)
    assert tall.size == (25, 25) and (np.asarray(tall)[:, 0, 0] > 200).all()  # full width kept: red left edge
    square = _bands(64, 64)
    assert center_square(square, 64) is square  # the shapes images: untouched


def test_image_transform_normalises_and_needs_the_statistics():
    t = image_transform(8, [0.5] * 3, [0.25] * 3)(Image.new("RGB", (16, 8), (255, 0, 128)))
    assert t.shape == (3, 8, 8)
    assert torch.allclose(t[:, 0, 0], torch.tensor([2.0, -2.0, (128 / 255 - 0.5) / 0.25]), atol=1e-6)
    with pytest.raises(ValueError, match="data.mean"):
        image_transform(8, None, None)


def test_augmentation_is_off_by_default_and_crops_reproducibly_per_epoch():
    assert load_config("fine_grained.yaml").data.augment == "none"
    base = image_transform(32, [0.5] * 3, [0.25] * 3)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    epoch = SharedEpoch(0)
    crops = [RandomCrop(base, seed=1, epoch=epoch, rank=0) for _ in range(2)]
    first = [crops[0](image) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, [crops[1](image) for _ in range(3)]))  # same seed, same crops
    assert not torch.equal(first[0], first[1])  # a new crop each time
    assert not torch.equal(first[0], base(image))
    epoch.set(1)
    assert not torch.equal(crops[0](image), first[0])  # the next epoch draws anew
