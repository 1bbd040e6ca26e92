"""CSV reader, embedded generator, model inputs and splits, on the real wafer files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from conftest import CALQ, TTBAR

from ecqae import chip, data
from ecqae.errors import EcqaeError

HEADER = ",".join(f"CALQ_{i}" for i in range(48))


def _write(tmp_path, text: str, name: str = "w.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_reads_real_files():
    w = data.read_csv(CALQ, eta="2.2")
    assert len(w) == 6050 and w.charges.shape == (6050, 48) and w.charges.dtype == np.int32
    assert np.all(w.eta == np.float32(2.2))
    assert w.charges.min() >= 0 and np.all(w.charges.sum(axis=1) > 0)
    # first row as in the file
    first = [int(v) for v in CALQ.read_text().splitlines()[1].split(",")]
    assert w.charges[0].tolist() == first
    t = data.read_csv(TTBAR, eta="1.6:2.9", max_rows=1000, seed=4)
    assert len(t) == 1000 and 1.6 <= t.eta.min() and t.eta.max() <= 2.9


def test_eta_range_is_seeded():
    a = data.read_csv(CALQ, eta="1.6:2.9", max_rows=50, seed=1).eta
    b = data.read_csv(CALQ, eta="1.6:2.9", max_rows=50, seed=1).eta
    c = data.read_csv(CALQ, eta="1.6:2.9", max_rows=50, seed=2).eta
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_columns_found_by_name_extras_ignored_eta_column(tmp_path):
    cols = [f"CALQ_{i}" for i in range(48)]
    order = cols[::-1]
    row = {f"CALQ_{i}": i for i in range(48)}
    text = "layer,eta," + ",".join(order) + "\n" + "7,2.5," + ",".join(str(row[c]) for c in order) + "\n"
    w = data.read_csv(_write(tmp_path, text))
    assert w.charges[0].tolist() == list(range(48))
    assert w.eta[0] == np.float32(2.5)


def test_gzip_and_semicolon(tmp_path):
    body = HEADER.replace(",", ";") + "\n" + ";".join(["3"] * 48) + "\n"
    p = tmp_path / "w.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write(body)
    w = data.read_csv(p, eta="2.0")
    assert w.charges.sum() == 144


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "file is empty"),
        (HEADER + "\n", "no data rows"),
        ("a,b,c\n1,2,3\n", "no CALQ_* columns"),
        (",".join(f"CALQ_{i}" for i in range(47)) + "\n" + ",".join(["1"] * 47) + "\n", "47 CALQ columns"),
        (HEADER + "\n" + ",".join(["1"] * 47 + ["x"]) + "\n", "row 2, column CALQ_47: not a number"),
        (HEADER + "\n" + ",".join(["1"] * 47 + ["nan"]) + "\n", "row 2, column CALQ_47"),
        (
            HEADER + "\n" + ",".join(["1"] * 48) + "\n" + ",".join(["-1"] + ["1"] * 47) + "\n",
            "row 3, column CALQ_0: negative",
        ),
        (HEADER + "\n" + ",".join(["1.5"] + ["1"] * 47) + "\n", "fractional charge"),
        (HEADER + "\n" + ",".join(["1"] * 40) + "\n", "row 2: 40 fields"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, text, message):
    p = _write(tmp_path, text)
    with pytest.raises(EcqaeError) as exc:
        data.read_csv(p, eta="2.0")
    msg = str(exc.value)
    assert str(p) in msg and message in msg and "\n" not in msg


def test_missing_file_and_missing_eta(tmp_path):
    with pytest.raises(EcqaeError, match="file not found"):
        data.read_csv(tmp_path / "nope.csv", eta="2")
    with pytest.raises(EcqaeError, match="no 'eta' column"):
        data.read_csv(CALQ)


def test_charges_above_22_bits_are_clipped(tmp_path, capsys):
    p = _write(tmp_path, HEADER + "\n" + ",".join([str(2**23)] + ["0"] * 47) + "\n")
    w = data.read_csv(p, eta="2")
    assert w.charges[0, 0] == chip.CHARGE_MAX
    assert "clipped" in capsys.readouterr().err


def test_generator_deterministic_and_realistic():
    a, b = data.generate(20_000, seed=3), data.generate(20_000, seed=3)
    np.testing.assert_array_equal(a.charges, b.charges)
    assert not np.array_equal(a.charges, data.generate(20_000, seed=4).charges)
    assert a.charges.dtype == np.int32 and a.charges.min() >= 0 and a.charges.max() <= chip.CHARGE_MAX
    assert np.all(a.charges.sum(axis=1) > 0)
    assert chip.ETA_MIN <= a.eta.min() and a.eta.max() <= chip.ETA_MAX
    occ = (a.charges > 0).sum(axis=1)
    region = chip.thickness_region(a.eta)
    # pileup rises with eta: more hit TCs in the 120 um region than in the 300 um one
    assert occ[region == 2].mean() > occ[region == 0].mean() + 2.5
    # shower cores spread over neighbours: the hottest TC's neighbours often carry charge too
    hot = a.charges.argmax(axis=1)
    nb = np.hypot(*(chip.TC_XY[:, None, :] - chip.TC_XY[None, :, :]).transpose(2, 0, 1)) < 2.5
    np.fill_diagonal(nb, False)
    shared = ((a.charges > 0) & nb[hot]).any(axis=1)
    assert shared.mean() > 0.3


def test_prepare_consistent_with_chip():
    w = data.read_csv(CALQ, eta="2.2", max_rows=500)
    p = data.prepare(w)
    assert p.images.shape == (500, 9, 9, 1) and p.cond.shape == (500, 2) and p.target.shape == (500, 48)
    np.testing.assert_allclose(p.target.sum(axis=1), 1.0, rtol=1e-5)
    x, s = chip.normalise(w.charges)
    np.testing.assert_array_equal(chip.image_to_tc(p.images), x)
    np.testing.assert_array_equal(p.sum_decoded, chip.decode_sum(chip.encode_sum(s)))
    assert np.all(np.isfinite(p.cond))


def test_split_disjoint_and_seeded():
    tr, va, te = data.split_indices(1000, 0.15, 0.15, seed=0)
    assert len(te) == 150 and len(va) == 150 and len(tr) == 700
    assert len(set(tr) | set(va) | set(te)) == 1000
    tr2, _, te2 = data.split_indices(1000, 0.15, 0.15, seed=0)
    np.testing.assert_array_equal(te, te2)
    assert not np.array_equal(te, data.split_indices(1000, 0.15, 0.15, seed=1)[2])
