"""Metrics against hand-made wafers whose answers are known exactly, and on real wafers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CALQ, TC_COORDS, wafer

from ecqae import baselines, chip, data, metrics


def dist(i: int, j: int) -> float:
    """Distance between TC centres in EMD units, straight from chip.TC_XY."""
    return float(np.hypot(*(chip.TC_XY[i] - chip.TC_XY[j])) * chip.EMD_COORD_SCALE)


@pytest.fixture(scope="module")
def calq() -> np.ndarray:
    return data.read_csv(CALQ, eta="2.0", max_rows=3000).charges


def test_ground_distance_matches_reference_coordinates():
    ref = np.loadtxt(TC_COORDS, delimiter=",", skiprows=1)
    assert np.array_equal(ref[:, 0], np.arange(48))
    xy = ref[:, 1:] * chip.EMD_COORD_SCALE
    d_ref = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    np.testing.assert_allclose(metrics.GROUND_DISTANCE, d_ref, atol=1e-4)
    assert metrics.MAX_DISTANCE == pytest.approx(13.7568, abs=1e-3)


def test_neighbour_shift_costs_two_units():
    # TCs 0 and 1 are neighbours in the same column of sector 0.
    assert dist(0, 1) == pytest.approx(2.0, abs=1e-12)
    got = metrics.emd(wafer(t0=137), wafer(t1=5))  # the amounts differ: EMD compares shapes
    assert got[0] == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize(("i", "j"), [(0, 3), (5, 40), (16, 47), (12, 44), (31, 0)])
def test_point_to_point_is_the_distance(i, j):
    assert metrics.emd(wafer(**{f"t{i}": 3}), wafer(**{f"t{j}": 11}))[0] == pytest.approx(dist(i, j), abs=1e-6)


def test_splitting_charge_between_two_tcs():
    # 30% goes 5 -> 4, 70% goes 5 -> 9: the plan is forced.
    got = metrics.emd(wafer(t5=100), wafer(t4=30, t9=70))[0]
    assert got == pytest.approx(0.3 * dist(5, 4) + 0.7 * dist(5, 9), abs=1e-6)
    # Half of TC0 and half of TC1 both move to TC2 along the column: 0.5*4 + 0.5*2.
    assert metrics.emd(wafer(t0=8, t1=8), wafer(t2=1))[0] == pytest.approx(3.0, abs=1e-6)


def test_transport_plan_is_optimal_not_just_feasible():
    # TCs 0,1,2,3 lie on a line 2 units apart. Moving {0,2} -> {1,3}: pairing
    # 0->1, 2->3 costs 2; the crossed pairing 0->3, 2->1 would cost 4.
    assert metrics.emd(wafer(t0=1, t2=1), wafer(t1=1, t3=1))[0] == pytest.approx(2.0, abs=1e-6)
    # Uneven: input 0.5@TC0 + 0.5@TC2, output 0.25@TC1 + 0.75@TC3. On a line the EMD is
    # the integral of |CDF difference|: 2*(0.5 + 0.25 + 0.75) = 3.0.
    assert metrics.emd(wafer(t0=2, t2=2), wafer(t1=1, t3=3))[0] == pytest.approx(3.0, abs=1e-6)


def test_wafer_with_itself_is_zero(calq):
    q = calq[:500]
    np.testing.assert_allclose(metrics.emd(q, q), 0.0, atol=1e-9)
    np.testing.assert_allclose(metrics.emd(q, 7 * q), 0.0, atol=1e-9)  # scale does not matter
    np.testing.assert_allclose(metrics.centroid_distance(q, q), 0.0, atol=1e-9)
    np.testing.assert_allclose(metrics.rms_diff(q, q), 0.0, atol=1e-9)


def test_empty_input_and_output_conventions():
    true = np.vstack([wafer(), wafer(), wafer(t0=5), wafer(t0=5)])
    reco = np.vstack([wafer(), wafer(t3=1), wafer(), wafer(t1=5)])
    np.testing.assert_allclose(metrics.emd(true, reco), [-1.0, -1.0, -0.5, 2.0], atol=1e-12)
    np.testing.assert_allclose(metrics.centroid_distance(true, reco), [-1.0, -1.0, -0.5, 2.0], atol=1e-12)
    np.testing.assert_allclose(metrics.rms_diff(true, reco), [-1.0, -1.0, -0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(metrics.sum_ratio(true, reco), [-1.0, -1.0, 0.0, 1.0], atol=1e-12)
    v = metrics.compute(true, reco, processes=1)
    np.testing.assert_array_equal(v["empty_input"], [True, True, False, False])
    np.testing.assert_array_equal(v["empty_output"], [False, False, True, False])
    np.testing.assert_array_equal(metrics.valid_mask(v, "emd"), [False, False, False, True])
    np.testing.assert_array_equal(metrics.valid_mask(v, "sum_ratio"), [False, False, True, True])


def test_centroid_and_width_known_values():
    # A point moved one neighbour along the column: centroid moves 2 units, width stays 0.
    assert metrics.centroid_distance(wafer(t0=9), wafer(t1=9))[0] == pytest.approx(2.0, abs=1e-9)
    # Splitting a point evenly over TC0 and TC2 (4 units apart) around TC1: same centroid,
    # width 2 (each half is 2 units from the centroid).
    assert metrics.centroid_distance(wafer(t1=4), wafer(t0=2, t2=2))[0] == pytest.approx(0.0, abs=1e-9)
    assert metrics.rms_diff(wafer(t1=4), wafer(t0=2, t2=2))[0] == pytest.approx(2.0, abs=1e-9)
    assert metrics.rms_diff(wafer(t0=2, t2=2), wafer(t1=4))[0] == pytest.approx(-2.0, abs=1e-9)


def test_occupancy_counts_strictly_above_one_mip():
    w = wafer(t0=35, t1=36, t2=1000, t3=34.9, t4=35.01)
    assert metrics.occupancy(w)[0] == 3
    assert metrics.occupancy(np.zeros((2, 48))).tolist() == [0, 0]


def test_sum_ratio():
    np.testing.assert_allclose(metrics.sum_ratio(wafer(t0=100, t1=100), wafer(t7=50)), [0.25])


def test_bad_shapes_and_values_are_refused():
    with pytest.raises(ValueError, match="shape"):
        metrics.emd(np.ones((3, 48)), np.ones((2, 48)))
    with pytest.raises(ValueError, match=r"\(N, 48\)"):
        metrics.emd(np.ones((3, 47)), np.ones((3, 47)))
    with pytest.raises(ValueError, match="negative"):
        metrics.emd(np.ones((1, 48)), -np.ones((1, 48)))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.centroid_distance(np.ones((1, 48)), np.full((1, 48), np.nan))


def test_real_wafers_bounded_symmetric_and_parallel_equals_serial(calq):
    reco = baselines.super_trigger_cell(calq)
    serial = metrics.emd(calq, reco, processes=1)
    assert np.all(serial >= 0) and np.all(serial <= metrics.MAX_DISTANCE + 1e-9)
    assert serial.max() > 0.5  # STC moves charge: not a trivial all-zero answer
    np.testing.assert_allclose(metrics.emd(reco, calq, processes=1), serial, atol=1e-9)
    parallel = metrics.emd(calq, reco, processes=2, chunk=700)  # 5 chunks over 2 worker processes
    np.testing.assert_array_equal(parallel, serial)
    # Triangle inequality through the best-choice reconstruction (EMD is a metric).
    bc = baselines.best_choice(calq, 4)
    lhs = metrics.emd(calq, reco, processes=1)
    rhs = metrics.emd(calq, bc, processes=1) + metrics.emd(bc, reco, processes=1)
    assert np.all(lhs <= rhs + 1e-9)


def test_summarise():
    s = metrics.summarise(np.arange(101, dtype=float))
    assert s == {"n": 101, "mean": 50.0, "median": 50.0, "p16": 16.0, "p84": 84.0}
    assert metrics.summarise(np.array([]))["median"] is None
