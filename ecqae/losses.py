"""Training losses on the 48 real TCs (never on padded or duplicated pixels).

Telescope loss (C. Herwig), reference §5, per wafer on normalised TC values:
  L1 = mean_i (y_i - yhat_i)^2 max(y_i, yhat_i)            over 48 TCs
  L2 = mean_k w_k (Y_k - Yhat_k)^2 max(Y_k, Yhat_k)        over 36 2x2 super-cells
  L3 = mean_s (Z_s - Zhat_s)^2 max(Z_s, Zhat_s)            over the 3 16-TC sectors
  loss = 4 L1 + 2 L2 + L3
The max() factor weights errors by energy, so the loss cares about where the
charge is, and the super-cell and sector terms reward getting it nearly right.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from . import chip

# 36 overlapping 2x2 super-cells (four TCs each) and their weights; checked
# against the community's reference table in the tests.
SUPERCELLS = np.array(
    [
        (0, 1, 4, 5), (2, 3, 6, 7), (8, 9, 12, 13), (10, 11, 14, 15),
        (16, 17, 20, 21), (18, 19, 22, 23), (24, 25, 28, 29), (26, 27, 30, 31),
        (32, 33, 36, 37), (34, 35, 38, 39), (40, 41, 44, 45), (42, 43, 46, 47),
        (4, 5, 8, 9), (6, 7, 10, 11), (20, 21, 24, 25), (22, 23, 26, 27),
        (36, 37, 40, 41), (38, 39, 42, 43), (1, 2, 5, 6), (9, 10, 13, 14),
        (17, 18, 21, 22), (25, 26, 29, 30), (33, 34, 37, 38), (41, 42, 45, 46),
        (5, 6, 9, 10), (21, 22, 25, 26), (37, 38, 41, 42), (0, 1, 27, 31),
        (1, 2, 23, 27), (2, 3, 19, 23), (3, 7, 34, 35), (7, 11, 33, 34),
        (11, 15, 32, 33), (16, 17, 47, 43), (17, 18, 43, 39), (18, 19, 39, 35),
    ],
    dtype=np.int64,
)  # fmt: skip
SUPERCELL_WEIGHTS = np.array(
    [3 / 8, 1 / 3, 9 / 16, 3 / 8] * 3
    + [3 / 8, 1 / 4] * 3
    + [1 / 4, 3 / 8] * 3
    + [1 / 4] * 3
    + [3 / 8, 1 / 4, 5 / 12, 5 / 12, 1 / 4, 3 / 8, 3 / 8, 1 / 4, 5 / 12]
)


def _membership(groups: list[np.ndarray] | np.ndarray) -> np.ndarray:
    m = np.zeros((chip.N_TC, len(groups)), dtype=np.float32)
    for k, tcs in enumerate(groups):
        m[np.asarray(tcs), k] = 1.0
    return m


SUPERCELL_MATRIX = _membership(SUPERCELLS)  # (48, 36)
SECTOR_MATRIX = _membership([np.flatnonzero(chip.TC_SECTOR == s) for s in range(chip.N_SECTORS)])  # (48, 3)
L_WEIGHTS = (4.0, 2.0, 1.0)


def _weighted_sq(a, b):  # noqa: ANN001, ANN202 - works on numpy and tf alike
    d = a - b
    return d * d


def telescope_numpy(y: np.ndarray, yhat: np.ndarray) -> np.ndarray:
    """Per-wafer telescope loss in float64, the reference the TF version is tested against."""
    y, yhat = np.asarray(y, np.float64), np.asarray(yhat, np.float64)
    l1 = np.mean(_weighted_sq(y, yhat) * np.maximum(y, yhat), axis=-1)
    ys, yhs = y @ SUPERCELL_MATRIX, yhat @ SUPERCELL_MATRIX
    l2 = np.mean(SUPERCELL_WEIGHTS * _weighted_sq(ys, yhs) * np.maximum(ys, yhs), axis=-1)
    zs, zhs = y @ SECTOR_MATRIX, yhat @ SECTOR_MATRIX
    l3 = np.mean(_weighted_sq(zs, zhs) * np.maximum(zs, zhs), axis=-1)
    return L_WEIGHTS[0] * l1 + L_WEIGHTS[1] * l2 + L_WEIGHTS[2] * l3


def telescope_loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Keras loss: per-wafer telescope loss of (batch, 48) normalised TC values."""
    y_true = tf.cast(y_true, y_pred.dtype)
    l1 = tf.reduce_mean(_weighted_sq(y_true, y_pred) * tf.maximum(y_true, y_pred), axis=-1)
    sc = tf.constant(SUPERCELL_MATRIX, dtype=y_pred.dtype)
    w = tf.constant(SUPERCELL_WEIGHTS, dtype=y_pred.dtype)
    ys, yhs = tf.matmul(y_true, sc), tf.matmul(y_pred, sc)
    l2 = tf.reduce_mean(w * _weighted_sq(ys, yhs) * tf.maximum(ys, yhs), axis=-1)
    sec = tf.constant(SECTOR_MATRIX, dtype=y_pred.dtype)
    zs, zhs = tf.matmul(y_true, sec), tf.matmul(y_pred, sec)
    l3 = tf.reduce_mean(_weighted_sq(zs, zhs) * tf.maximum(zs, zhs), axis=-1)
    return L_WEIGHTS[0] * l1 + L_WEIGHTS[1] * l2 + L_WEIGHTS[2] * l3


def mse_loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Per-wafer mean squared error over the 48 TCs (the pre-training stage)."""
    y_true = tf.cast(y_true, y_pred.dtype)
    return tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)


LOSSES = {"mse": mse_loss, "telescope": telescope_loss}
