"""The telescope loss against hand-computed values and the reference super-cell table."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import SUPERCELLS

from ecqae import chip, losses


def test_supercells_match_reference_table():
    ref = np.loadtxt(SUPERCELLS, delimiter=",", skiprows=1)
    np.testing.assert_array_equal(ref[:, 1:5].astype(int), losses.SUPERCELLS)
    np.testing.assert_allclose(ref[:, 5], losses.SUPERCELL_WEIGHTS, atol=1e-12)
    assert losses.SUPERCELL_WEIGHTS.sum() == pytest.approx(12.5625)


def _one_hot(i: int) -> np.ndarray:
    y = np.zeros((1, chip.N_TC))
    y[0, i] = 1.0
    return y


@pytest.mark.parametrize(
    "y, yhat, expected",
    [
        # all charge in TC 0, nothing reconstructed: L1 = 1/48; super-cells 0 and 27 (w = 3/8 each); sector 0
        (_one_hot(0), np.zeros((1, 48)), 4 / 48 + 2 * (0.75 / 36) + 1 / 3),
        # moved to neighbour TC 1: two TC errors; super-cells 18 and 28 (w = 1/4) see it; same sector
        (_one_hot(0), _one_hot(1), 4 * 2 / 48 + 2 * (0.5 / 36) + 0.0),
        # moved across sectors, TC 0 -> TC 16 (no shared super-cell): every level sees it
        (_one_hot(0), _one_hot(16), 4 * 2 / 48 + 2 * (0.75 + 0.75) / 36 + 2 / 3),
        # a perfect reconstruction costs nothing
        (_one_hot(5), _one_hot(5), 0.0),
    ],
)
def test_telescope_hand_computed(y, yhat, expected):
    assert losses.telescope_numpy(y, yhat)[0] == pytest.approx(expected, rel=1e-12)
    tf_val = losses.telescope_loss(tf.constant(y, tf.float64), tf.constant(yhat, tf.float64)).numpy()[0]
    assert tf_val == pytest.approx(expected, rel=1e-12)


def test_supercells_of_tc16():
    # the third hand case relies on TC 16 being in super-cells 4 and 33 only, both w = 3/8
    member = np.flatnonzero(losses.SUPERCELL_MATRIX[16])
    assert member.tolist() == [4, 33]
    assert losses.SUPERCELL_WEIGHTS[member].tolist() == [3 / 8, 3 / 8]


def test_half_charge_case():
    # y: half in TC 0, half in TC 4; yhat all in TC 0. Super-cell 0 holds both: no L2 error there.
    y = np.zeros((1, 48))
    y[0, [0, 4]] = 0.5
    yhat = _one_hot(0)
    l1 = (0.25 * 1.0 + 0.25 * 0.5) / 48
    # super-cells with TC 0 only: 27 (Y=.5 vs 1, w 3/8); with TC 4 only: 12 (Y=.5 vs 0, w 3/8)
    l2 = (3 / 8 * 0.25 * 1.0 + 3 / 8 * 0.25 * 0.5) / 36
    assert losses.telescope_numpy(y, yhat)[0] == pytest.approx(4 * l1 + 2 * l2, rel=1e-12)


def test_tf_matches_numpy_on_random_batches():
    rng = np.random.default_rng(3)
    y = rng.dirichlet(np.ones(48) * 0.3, size=64).astype(np.float32)
    yhat = rng.dirichlet(np.ones(48), size=64).astype(np.float32)
    np.testing.assert_allclose(losses.telescope_loss(y, yhat).numpy(), losses.telescope_numpy(y, yhat), rtol=1e-5)
    np.testing.assert_allclose(losses.mse_loss(y, yhat).numpy(), np.mean((y - yhat) ** 2, axis=1), rtol=1e-5)
