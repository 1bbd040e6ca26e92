"""Classical algorithms on hand-made wafers with known outputs, and their invariants on real wafers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CALQ
from conftest import wafer as _wafer

from ecqae import baselines, chip, data


def wafer(**charges: int) -> np.ndarray:
    return _wafer(np.int64, **charges)  # the baselines take integer charges


@pytest.fixture(scope="module")
def calq() -> np.ndarray:
    return data.read_csv(CALQ, eta="2.0", max_rows=2000).charges


def test_threshold_cuts_strictly_above_the_mip_fraction():
    # 1.35 MIP_T = 47.25 counts; 2.0 MIP_T = 70 counts.
    w = wafer(t0=47, t1=48, t2=70, t3=71, t47=1000)
    np.testing.assert_array_equal(baselines.threshold(w, 1.35), wafer(t1=48, t2=70, t3=71, t47=1000))
    np.testing.assert_array_equal(baselines.threshold(w, 2.0), wafer(t3=71, t47=1000))


def test_threshold_at_a_budget_keeps_the_largest_that_fit():
    # 20 TCs above threshold; 2 e-links carry 4 of them: the 4 largest.
    w = np.zeros((1, 48), dtype=np.int64)
    w[0, :20] = 100 + np.arange(20)
    w[0, 20:] = 10  # below threshold
    got = baselines.threshold(w, 1.35, elinks=2)
    expected = np.zeros_like(w)
    expected[0, 16:20] = w[0, 16:20]
    np.testing.assert_array_equal(got, expected)
    assert baselines.threshold_truncated(w, 1.35, 2).tolist() == [True]
    assert baselines.threshold_truncated(w, 1.35, 5).tolist() == [True]  # 20 > 14
    assert baselines.threshold_truncated(wafer(t0=100), 1.35, 2).tolist() == [False]


def test_best_choice_keeps_top_n_and_breaks_ties_by_tc_index():
    w = wafer(t3=5, t7=9, t10=9, t20=1, t30=7, t40=9)
    np.testing.assert_array_equal(baselines.best_choice(w, 2), wafer(t7=9, t10=9))
    np.testing.assert_array_equal(baselines.best_choice(w, 4), wafer(t7=9, t10=9, t40=9, t30=7))
    np.testing.assert_array_equal(baselines.best_choice(w, 48), w)
    np.testing.assert_array_equal(baselines.best_choice(wafer(), 4), wafer())


def test_best_choice_counts_by_elink_budget():
    assert [baselines.budget_tcs(e) for e in (2, 3, 4, 5)] == [4, 6, 9, 14]
    with pytest.raises(ValueError, match="e-links"):
        baselines.budget_tcs(7)


def test_super_trigger_cell_puts_each_sector_sum_in_its_largest_tc():
    w = wafer(t0=3, t5=10, t15=2, t33=4, t40=4)  # sector 0: 15 at TC5; sector 1 empty; sector 2: tie 33/40
    np.testing.assert_array_equal(baselines.super_trigger_cell(w), wafer(t5=15, t33=8))


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="integers"):
        baselines.best_choice(np.ones((1, 48)), 4)
    with pytest.raises(ValueError, match="shape"):
        baselines.super_trigger_cell(np.ones((1, 16), dtype=int))
    with pytest.raises(ValueError, match="non-negative"):
        baselines.threshold(-np.ones((1, 48), dtype=int), 2.0)


def test_invariants_on_real_wafers(calq):
    q = calq.astype(np.int64)
    stc = baselines.super_trigger_cell(q)
    np.testing.assert_array_equal(stc.sum(axis=1), q.sum(axis=1))  # STC conserves the charge
    assert np.all((stc > 0).sum(axis=1) <= 3)
    for e, n in chip.BEST_CHOICE_N.items():
        bc = baselines.best_choice(q, n)
        kept = bc > 0
        assert np.all(kept.sum(axis=1) <= n)
        np.testing.assert_array_equal(bc[kept], q[kept])  # kept TCs are sent exactly
        # Nothing dropped is larger than anything kept.
        dropped_max = np.where(kept, 0, q).max(axis=1)
        kept_min = np.where(kept, q, np.iinfo(np.int64).max).min(axis=1)
        has = kept.any(axis=1) & (kept.sum(axis=1) == n)
        assert np.all(dropped_max[has] <= kept_min[has])
        for t in baselines.THRESHOLDS_MIPT:
            th = baselines.threshold(q, t, e)
            assert np.all(th <= q) and np.all((th > 0) <= (q > t * chip.MIP_T))
            assert np.all((th > 0).sum(axis=1) <= n)


def test_run_all_covers_every_setting(calq):
    out = baselines.run_all(calq)
    keys = {(b.name, b.elinks) for b in out}
    assert len(keys) == len(out) == 4 * 4
    for e in (2, 3, 4, 5):
        assert {"threshold_1.35", "threshold_2", "best_choice", "stc"} == {n for n, el in keys if el == e}
    for b in out:
        assert b.reco.shape == calq.shape and b.reco.dtype == np.int64
        if b.name.startswith("threshold"):
            assert 0.0 <= b.info["truncated_fraction"] <= 1.0
    bc2 = next(b for b in out if b.name == "best_choice" and b.elinks == 2)
    assert bc2.label == "best-choice n=4"
