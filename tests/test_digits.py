"""The built-in printed-digits domain: glyphs fill the frame as house-number crops do."""

import numpy as np

from adaptation import digits


def ink(image: np.ndarray) -> np.ndarray:
    """Pixels far from the corner's (background) colour."""
    return np.abs(image.astype(np.int16) - image[0, 0].astype(np.int16)).sum(-1) > 60


def ink_extent(image: np.ndarray) -> tuple[float, float]:
    """Fraction of the rows and of the columns that hold ink."""
    mask = ink(image)
    return mask.any(1).mean(), mask.any(0).mean()


def test_printed_glyphs_fill_most_of_the_frame(monkeypatch):
    monkeypatch.setattr(digits, "FONT_IMAGES_PER_CLASS", 6)
    images, labels = digits.build_fonts(np.random.default_rng(0))
    assert images.shape == (60, digits.SIZE, digits.SIZE, 3) and images.dtype == np.uint8
    assert np.array_equal(np.bincount(labels), np.full(10, 6))
    heights = np.array([ink_extent(img)[0] for img in images])
    # ink spans GLYPH_HEIGHT = 80-98% of the frame before rotation and blur (v1 glyphs: about 60%)
    assert np.median(heights) > 0.7 and heights.min() > 0.55, np.sort(heights)[:5]
    # both polarities stay: the background is the brighter side for some images, the darker for others
    luma = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    bright_background = np.array([l[0, 0] > l[ink(img)].mean() for l, img in zip(luma, images)])
    assert 0.2 < bright_background.mean() < 0.8
