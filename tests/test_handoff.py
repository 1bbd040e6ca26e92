"""Golden model = QKeras = C simulation on real wafers; the release bundle is made, checked and tamper-evident."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import CALQ, ROOT, TTBAR

from ecqae import artifacts, chip, cli, data, firmware, golden, handoff, verify
from ecqae.errors import EcqaeError

pytestmark = pytest.mark.slow

ASIC = """backend: Catapult
name: asic
technology: asic
asic_libs: nangate-45nm_beh
testbench_wafers: 300
"""
FPGA = """backend: Vitis
name: fpga
part: xcvu13p-flga2577-2-e
testbench_wafers: 300
"""
# Rounds latent ties away from zero instead of to even: C simulation and QKeras must then disagree.
ASIC_RND = ASIC.replace("name: asic", "name: asic_rnd") + "layers:\n  latent:\n    result: ufixed<9,1,RND,SAT>\n"


def _configs(root: Path, **texts: str) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in texts.items():
        (root / f"{name}.yaml").write_text(text)
        paths.append(root / f"{name}.yaml")
    return paths


@pytest.fixture(scope="module")
def real_charges() -> np.ndarray:
    """All 44,432 real wafers of both shared samples, then the corner cases."""
    real = [data.read_csv(path, eta="2.2").charges for path in (TTBAR, CALQ)]
    return np.concatenate([*real, verify.corner_cases().charges]).astype(np.int64)


@pytest.fixture(scope="module")
def hls9(calq_run, tmp_path_factory):
    """ASIC (Catapult, ac_fixed) and FPGA (Vitis, ap_fixed) projects of the 9-bit model, compiled once."""
    root = tmp_path_factory.mktemp("handoff9")
    configs = _configs(root / "configs", asic=ASIC, fpga=FPGA)
    firmware.convert_all(calq_run, configs, root / "hls", log=lambda _m: None)
    return calq_run, configs, root / "hls"


@pytest.fixture(scope="module")
def hls3(calq_run_3bit, tmp_path_factory):
    """The ASIC project of the 3-bit model."""
    root = tmp_path_factory.mktemp("handoff3")
    configs = _configs(root / "configs", asic=ASIC)
    firmware.convert_all(calq_run_3bit, configs, root / "hls", log=lambda _m: None)
    return calq_run_3bit, configs, root / "hls"


@pytest.fixture(scope="module")
def bundle(hls9, tmp_path_factory):
    run_dir, configs, hls_dir = hls9
    out = tmp_path_factory.mktemp("release")
    lines: list[str] = []
    path = handoff.make_bundle(run_dir, configs, hls_dir, name="rel", out_root=out, log=lines.append)
    return path, lines


# ----------------------------------------------------------------------------- golden = QKeras = C-sim


@pytest.mark.parametrize("which, bits, projects", [("hls9", 9, ("asic", "fpga")), ("hls3", 3, ("asic",))])
def test_golden_equals_qkeras_and_csim_on_real_wafers(request, real_charges, which, bits, projects):
    from ecqae import model, train

    run_dir, _, hls_dir = request.getfixturevalue(which)
    run = train.load_run(run_dir)
    charges = np.concatenate([real_charges, run.test_wafers().charges.astype(np.int64)])
    assert len(charges) >= 10_000
    enc = golden.IntegerEncoder.from_keras(run.encoder())
    assert enc.latent_bits == bits
    want = enc.latent_codes(charges)
    images = chip.tc_to_image(chip.normalise(charges)[0])
    qk = model.encode(run.encoder(), images).astype(np.float64) * enc.latent_scale
    assert int(np.sum(qk != want)) == 0, "golden != QKeras"
    for name in projects:
        project = firmware.open_project(hls_dir / name)
        cs = project.csim().run(images) * enc.latent_scale
        assert int(np.sum(cs != want)) == 0, f"golden != C simulation ({name}, {project.record['hls_types']})"
    assert np.count_nonzero(want) > 0.05 * want.size  # a live encoder, not a comparison of zeros


# ----------------------------------------------------------------------------- the bundle


def test_bundle_contents_and_check(bundle, hls9, capsys):
    from ecqae import train

    path, lines = bundle
    run_dir, configs, _ = hls9
    run = train.load_run(run_dir)
    assert any("golden vs qkeras" in ln and " 0 mismatches" in ln for ln in lines)  # verify ran, with golden
    manifest = json.loads((path / handoff.MANIFEST).read_text())
    on_disk = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], handoff.MANIFEST]) == on_disk
    assert manifest["model"]["run_id"] == run.run_id
    assert manifest["model"]["training_config"]["model"]["elinks"] == 5
    assert manifest["verification"]["passed"] is True
    assert {"tensorflow", "qkeras", "hls4ml", "numpy", "ecqae"} <= set(manifest["packages"])
    assert [c["firmware_config"]["backend"] for c in manifest["configs"]] == ["Catapult", "Vitis"]
    enc = golden.IntegerEncoder.from_keras(run.encoder())
    for c, cfg_path in zip(manifest["configs"], configs, strict=True):
        d = path / c["dir"]
        for rel in (handoff.FW_CONFIG, handoff.REG_HEX, handoff.REG_CSV, handoff.CHARGES, handoff.INPUTS):
            assert (d / rel).is_file(), rel
        assert (d / handoff.FW_CONFIG).read_text() == cfg_path.read_text()
        assert (d / "hls" / "firmware" / "defines.h").is_file() and not list(d.rglob("*.so"))
        assert np.array_equal(golden.read_register_image(d / handoff.REG_HEX).register_codes(), enc.register_codes())
        charges = handoff.read_table(d / handoff.CHARGES, handoff.CHARGE_COLUMNS)
        assert len(charges) == c["vectors"] == 300 + len(verify.corner_cases())
        words = (d / handoff.WORDS).read_text().split()
        assert all(len(w) == 39 for w in words)
        back = golden.unpack_output_word(words, 9)
        assert np.array_equal(back.latents, handoff.read_table(d / handoff.LATENTS, handoff.LATENT_COLUMNS))
        assert np.array_equal(back.sum_word, chip.encode_sum(chip.normalise(charges)[1]))
    readme = (path / handoff.README).read_text()
    for rel in manifest["files"]:
        if "/hls/" not in rel:
            assert Path(rel).name in readme, rel
    tar = path.parent / "rel.tar.gz"
    with tarfile.open(tar) as t:
        names = {m.name for m in t.getmembers() if m.isfile()}
    assert names == {f"rel/{f}" for f in on_disk}

    assert handoff.check_bundle(path) is True
    assert cli.main(["check-bundle", str(tar)]) == 0
    out = capsys.readouterr().out
    assert f"OK ({len(manifest['files'])} files match their sha256" in out and "FAIL" not in out


def test_bundle_csim_with_gxx_reproduces_expected_latents(bundle, tmp_path):
    """The README's g++ line runs the shipped ASIC project on the shipped vectors: same latents."""
    path, _ = bundle
    work = tmp_path / "asic"
    shutil.copytree(path / "asic", work)
    manifest = json.loads((path / handoff.MANIFEST).read_text())
    cmd = handoff.gxx_command("Catapult", manifest["configs"][0]["project_name"])
    assert cmd in (path / handoff.README).read_text()
    proc = subprocess.run(cmd, shell=True, cwd=work / "hls", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.loadtxt(work / "hls" / "tb_data" / "csim_results.log", ndmin=2) * 256
    want = handoff.read_table(work / handoff.LATENTS, handoff.LATENT_COLUMNS)
    assert got.shape == want.shape and np.array_equal(np.rint(got), want)


def _tampered(bundle, tmp_path) -> Path:
    copy = tmp_path / "rel"
    shutil.copytree(bundle[0], copy)
    return copy


def _change_byte(path: Path, old: bytes, new: bytes, after: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    i = raw.index(old, after)
    raw[i : i + len(old)] = new
    path.write_bytes(bytes(raw))


def test_check_bundle_names_a_changed_register_word(bundle, tmp_path, capsys):
    copy = _tampered(bundle, tmp_path)
    hex_path = copy / "asic" / handoff.REG_HEX
    text = hex_path.read_text()
    first_word = text.index("\n", text.index("// quant:")) + 1
    digit = text[first_word]
    flipped = "0" if digit != "0" else "3"  # one byte: the sign bit (and more) of word 0
    _change_byte(hex_path, digit.encode(), flipped.encode(), first_word)
    assert cli.main(["check-bundle", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {hex_path}: sha256 differs from MANIFEST.json" in out
    assert f"FAIL {copy / 'asic' / handoff.LATENTS}: wafer" in out  # the golden model now disagrees too
    assert not [ln for ln in out.splitlines() if ln.startswith("FAIL") and "/fpga/" in ln]  # untouched config passes
    assert "FAILED" in out


def test_check_bundle_names_a_changed_hls_weight_file(bundle, tmp_path, capsys):
    copy = _tampered(bundle, tmp_path)
    w = copy / "fpga" / "hls" / "firmware" / "weights" / "w6.txt"
    raw = w.read_bytes()
    digit = next(i for i, b in enumerate(raw) if chr(b).isdigit() and chr(b) != "0")
    w.write_bytes(raw[:digit] + b"0" + raw[digit + 1 :])
    assert cli.main(["check-bundle", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {w}: sha256 differs from MANIFEST.json" in out
    assert out.count("FAIL ") == 1


def test_check_bundle_catches_consistent_hashes_with_wrong_vectors(bundle, tmp_path, capsys):
    """Hashes recomputed after an edit do not fool the golden check of the vectors."""
    copy = _tampered(bundle, tmp_path)
    lat = copy / "asic" / handoff.LATENTS
    rows = lat.read_text().splitlines()
    cells = rows[5].split(",")
    cells[3] = str(int(cells[3]) ^ 1)
    rows[5] = ",".join(cells)
    lat.write_text("\n".join(rows) + "\n")
    manifest = json.loads((copy / handoff.MANIFEST).read_text())
    manifest["files"]["asic/" + handoff.LATENTS] = artifacts.sha256_file(lat)
    (copy / handoff.MANIFEST).write_text(json.dumps(manifest))
    assert handoff.check_bundle(copy) is False
    out = capsys.readouterr().out
    assert f"FAIL {lat}: wafer 4 differs from the golden model latents" in out


def test_check_bundle_refuses_what_is_not_a_bundle(tmp_path, capsys):
    assert cli.main(["check-bundle", str(tmp_path / "nothing")]) == 2
    assert "no bundle here" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["check-bundle", str(tmp_path / "empty")]) == 1
    assert "MANIFEST.json: missing" in capsys.readouterr().out


def test_handoff_refuses_a_bundle_whose_verification_fails(calq_run, tmp_path, capsys):
    configs = _configs(tmp_path / "configs", asic_rnd=ASIC_RND)
    hls_dir = tmp_path / "hls"
    firmware.convert_all(calq_run, configs, hls_dir, log=lambda _m: None)
    out = tmp_path / "release"
    argv = ["handoff", "--run", str(calq_run), "--hls", str(hls_dir), "--out", str(out), "--name", "bad"]
    assert cli.main([*argv, *map(str, configs)]) == 2
    captured = capsys.readouterr()
    csim_line = next(ln for ln in captured.out.splitlines() if ln.strip().startswith("csim   vs qkeras"))
    assert " 0 mismatches" not in csim_line  # RND instead of RND_CONV: ties round differently
    assert "verification failed" in captured.err and "no bundle written" in captured.err
    assert not (out / "bad").exists() and not (out / "bad.tar.gz").exists()
    assert not out.exists() or not any(out.iterdir())


def test_handoff_rejects_a_bad_name(hls9, tmp_path):
    run_dir, configs, hls_dir = hls9
    with pytest.raises(EcqaeError, match="plain directory name"):
        handoff.make_bundle(run_dir, configs, hls_dir, name="../x", out_root=tmp_path)


def test_check_bundle_needs_no_training_framework(bundle):
    """A receiving engineer can re-check the bundle without TensorFlow, Keras or hls4ml being imported."""
    script = (
        "import sys; from ecqae import cli; rc = cli.main(['check-bundle', sys.argv[1]]); "
        "mods = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'qkeras', 'hls4ml')]; "
        "print('MODS', mods); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(bundle[0])], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MODS []" in proc.stdout
