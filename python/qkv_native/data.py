"""The handwritten digits dataset as token sequences (needs scikit-learn).

``sklearn.datasets.load_digits`` ships inside scikit-learn (no download): 1797
8x8 grey images with pixel values 0..16, 10 classes. Each image becomes a
sequence of tokens for an attention model:

* ``layout="rows"``:    8 tokens of 8 pixels (one image row each)     -> (n, 8, 8)
* ``layout="patches"``: 16 tokens of 4 pixels (2x2 patches, row-major) -> (n, 16, 4)

Pixels are scaled to [0, 1], float32; labels are int64.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .functional import _check_int, _real

__all__ = ["load_digits_images", "tokenize_images", "stratified_split", "load_digits_tokens"]

LAYOUTS = ("rows", "patches")


def load_digits_images() -> Tuple[np.ndarray, np.ndarray]:
    """images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64. Offline."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install scikit-learn (or qkv_native[train])"
        ) from None
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def tokenize_images(images: np.ndarray, layout: str = "rows") -> np.ndarray:
    """images (n, 8, 8) -> tokens (n, 8, 8) for "rows", (n, 16, 4) for "patches"."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy.ndarray, got {type(images).__name__}")
    if images.ndim != 3 or images.shape[1:] != (8, 8):
        raise ValueError(f"images must have shape (n, 8, 8), got {images.shape}")
    n = images.shape[0]
    if layout == "rows":
        return np.ascontiguousarray(images, dtype=np.float32)
    # (n, 4 patch rows, 2 pixel rows, 4 patch cols, 2 pixel cols) -> (n, 4, 4, 2, 2)
    patches = images.reshape(n, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(patches.reshape(n, 16, 4), dtype=np.float32)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx): each class contributes round(test_fraction * count)
    test samples, drawn with numpy.random.default_rng(seed); both index arrays sorted.

    labels: a non-empty 1-D array; seed: an integer >= 0. Raises ValueError when
    the split would leave no train or no test sample."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if not 0.0 < _real(test_fraction, "test_fraction") < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    _check_int(seed, "seed", 0)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):  # one iteration per class, not per sample
        idx = np.flatnonzero(labels == c)
        test.append(rng.permutation(idx)[: int(round(test_fraction * len(idx)))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    if len(test_idx) == 0 or len(train_idx) == 0:
        side = "test" if len(test_idx) == 0 else "train"
        raise ValueError(
            f"test_fraction {test_fraction} leaves no {side} sample ({len(labels)} samples; "
            f"each class contributes round(test_fraction * count) test samples)"
        )
    return train_idx, test_idx


def load_digits_tokens(layout: str = "rows", test_fraction: float = 0.2, seed: int = 0):
    """(x_train, y_train, x_test, y_test): tokenised digits with a stratified held-out test split."""
    images, labels = load_digits_images()
    x = tokenize_images(images, layout)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    return x[train_idx], labels[train_idx], x[test_idx], labels[test_idx]
