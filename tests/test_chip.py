"""TC geometry, the 48 -> 9x9 mapping, the encoded sum and the input grid."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TC_COORDS

from ecqae import chip


def test_mapping_round_trip_every_tc():
    eye = np.eye(chip.N_TC, dtype=np.int64) * (np.arange(chip.N_TC) + 1)[:, None]
    img = chip.tc_to_image(eye)
    assert img.shape == (chip.N_TC, 9, 9, 1)
    np.testing.assert_array_equal(chip.image_to_tc(img), eye)
    # each TC lands on exactly one pixel, distinct for every TC
    assert len(set(chip.TC_FLAT_INDEX.tolist())) == chip.N_TC


def test_padding_and_mask_stay_zero():
    img = chip.tc_to_image(np.ones((1, chip.N_TC)))[0, :, :, 0]
    assert img[8, :].sum() == 0 and img[:, 8].sum() == 0  # zero row and column added
    assert img[4:8, 4:8].sum() == 0  # duplicated TCs are masked
    assert img.sum() == chip.N_TC


def test_layout_matches_reference_table():
    # spot checks from the reference's 8x8 arrangement
    assert chip.LAYOUT_8X8[0, 0] == 28 and chip.LAYOUT_8X8[0, 4] == 0 and chip.LAYOUT_8X8[7, 3] == 32
    assert sorted(chip.LAYOUT_8X8[chip.LAYOUT_8X8 >= 0].tolist()) == list(range(chip.N_TC))


def test_coordinates_match_reference_csv():
    ref = np.loadtxt(TC_COORDS, delimiter=",", skiprows=1)
    np.testing.assert_array_equal(ref[:, 0], np.arange(chip.N_TC))
    np.testing.assert_allclose(chip.TC_XY, ref[:, 1:], atol=1e-4)


def test_image_neighbours_are_wafer_neighbours_within_a_sector():
    pitch = 2.4168015
    pairs = 0
    for r in range(8):
        for c in range(8):
            a = chip.LAYOUT_8X8[r, c]
            for dr, dc in ((0, 1), (1, 0)):
                if r + dr > 7 or c + dc > 7:
                    continue
                b = chip.LAYOUT_8X8[r + dr, c + dc]
                if a < 0 or b < 0 or chip.TC_SECTOR[a] != chip.TC_SECTOR[b]:
                    continue
                d = np.hypot(*(chip.TC_XY[a] - chip.TC_XY[b]))
                assert d == pytest.approx(pitch, rel=1e-4), (a, b)
                pairs += 1
    assert pairs == 3 * 24  # a 4x4 block has 24 horizontal+vertical neighbour pairs


def test_neighbour_distance_is_two_emd_units():
    d = np.hypot(*(chip.TC_XY[0] - chip.TC_XY[1])) * chip.EMD_COORD_SCALE
    assert d == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize(
    "value, word",
    [(0, 0), (1, 1), (15, 15), (16, 16), (31, 31), (32, 32), (33, 32), (35, 33), (100, 57), (chip.CHARGE_MAX, 303)],
)
def test_encode_sum_known_words(value, word):
    assert int(chip.encode_sum(np.array([value]))[0]) == word


def test_decoded_sum_is_the_interval_midpoint():
    v = np.unique(np.concatenate([np.arange(0, 5000), np.geomspace(1, chip.CHARGE_MAX, 5000).astype(np.int64)]))
    word = chip.encode_sum(v)
    dec = chip.decode_sum(word)
    assert np.all(np.abs(dec - v) <= np.maximum(1, v / 32))  # half of 4 mantissa bits after the leading one
    np.testing.assert_array_equal(chip.encode_sum(dec), word)  # the estimate lies inside the word's interval
    big = v > 1000
    assert abs(np.mean((dec[big] - v[big]) / v[big])) < 0.005  # unbiased, unlike flooring
    np.testing.assert_array_equal(dec[v < 32], v[v < 32])
    assert np.all(chip.encode_sum(v) < 2**chip.SUM_WORD_BITS)


def test_sum_beyond_22_bits_saturates_to_all_ones():
    assert int(chip.encode_sum(np.array([chip.CHARGE_MAX + 1]))[0]) == 511


def test_normalise_grid_and_edge_cases():
    q = np.zeros((4, chip.N_TC), dtype=np.int64)
    q[1, 7] = 5  # single hit -> exactly 1.0
    q[2, :3] = (1, 1, 1)  # thirds floor onto the 1/256 grid
    q[3, :] = chip.CHARGE_MAX  # saturating sum: clipped to 1.0, no overflow
    x, s = chip.normalise(q)
    assert x.dtype == np.float32
    assert np.all(x[0] == 0) and s[0] == 0  # empty wafer: zeros, no division by zero
    assert x[1, 7] == 1.0 and x[1].sum() == 1.0
    assert x[2, 0] == np.floor(256 / 3) / 256
    assert np.all((x >= 0) & (x <= 1)) and np.all(np.isfinite(x))
    np.testing.assert_array_equal(x * 256, np.round(x * 256))
    assert s[3] == chip.CHARGE_MAX


def test_latent_bits_follow_elinks():
    assert [chip.latent_bits_for_elinks(e) for e in (2, 3, 4, 5, 6, 14)] == [3, 5, 7, 9, 9, 9]
    with pytest.raises(ValueError):
        chip.latent_bits_for_elinks(1)
