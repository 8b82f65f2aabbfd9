"""Training geometry follows the model's resize mode, as its eval preprocessing does."""

import numpy as np
import pytest
import torch
from PIL import Image

from clipret.data.transforms import AugmentConfig, eval_transform, train_transform

OFF = dict(crop=False, flip=False, color_jitter=0.0, grayscale=0.0, erasing=0.0)


def _pre(mode, size):
    return {"size": size, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear",
            "resize_mode": mode, "fill_color": 0}


def _image(w, h):
    # A smooth gradient plus noise: any shift, stretch or crop of it changes the pixels.
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
    pixels = np.clip(ramp + rng.integers(0, 6, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("mode", ["squash", "longest", "shortest"])
@pytest.mark.parametrize("size", [16, [16, 24], [24, 16]])
@pytest.mark.parametrize("wh", [(40, 24), (24, 40)])
def test_train_without_random_crop_has_the_eval_geometry(mode, size, wh):
    img = _image(*wh)
    expected = eval_transform(_pre(mode, size))(img)  # open_clip.image_transform(is_train=False)
    out = train_transform(_pre(mode, size), AugmentConfig(**OFF))(img)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["squash", "longest", "shortest"])
@pytest.mark.parametrize("size", [16, [16, 24]])
def test_train_with_random_crop_gives_the_model_input_size(mode, size):
    hw = (size, size) if isinstance(size, int) else tuple(size)
    out = train_transform(_pre(mode, size), AugmentConfig(**{**OFF, "crop": True}))(_image(40, 24))
    assert out.shape == (3, *hw)


def test_squash_and_centre_crop_differ_on_this_image():
    # Guards the test above: the modes must give different pixels here, or it could not fail.
    img = _image(40, 24)
    squash, shortest = (eval_transform(_pre(m, 16))(img) for m in ("squash", "shortest"))
    assert not torch.allclose(squash, shortest, atol=0.05)
