"""Firmware stage: types derived from the quantizers, real hls4ml projects compiled by real g++."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS
from hypothesis import given, settings
from hypothesis import strategies as st

from ecqae import chip, firmware
from ecqae.cli import main
from ecqae.config import FirmwareConfig, QuantConfig
from ecqae.errors import EcqaeError

ASIC, VITIS = CONFIGS


def _yaml(tmp_path: Path, text: str, name: str = "fw.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


ASIC_BASE = "backend: Catapult\ntechnology: asic\nasic_libs: nangate-45nm_beh\n"


# ----------------------------------------------------------------------------- precision strings


@pytest.mark.parametrize(
    "text, expected",
    [
        ("fixed<21,9>", firmware.Precision(True, 21, 9)),
        ("ufixed<9,1,RND_CONV,SAT>", firmware.Precision(False, 9, 1, "RND_CONV", "SAT")),
        ("fixed<6,1,TRN,WRAP,0>", firmware.Precision(True, 6, 1)),
        ("ap_ufixed<8,1,AP_RND_CONV,AP_SAT,0>", firmware.Precision(False, 8, 1, "RND_CONV", "SAT")),
        ("ap_fixed<19,6>", firmware.Precision(True, 19, 6)),
        ("ac_fixed<9,1,false,AC_RND_CONV,AC_SAT>", firmware.Precision(False, 9, 1, "RND_CONV", "SAT")),
        ("ac_fixed<22,10,true>", firmware.Precision(True, 22, 10)),
        ("uint<1>", firmware.Precision(False, 1, 1)),
        ("ac_int<1, false>", firmware.Precision(False, 1, 1)),
    ],
)
def test_parse_precision_forms(text, expected):
    assert firmware.parse_precision(text) == expected


@pytest.mark.parametrize(
    "text, problem",
    [
        ("fixd<21,9>", "cannot parse"),
        ("fixed<21>", "integer bits missing"),
        ("fixed<a,9>", "width must be an integer"),
        ("fixed<21,9,RND_HALF,SAT>", "unknown rounding mode"),
        ("fixed<21,9,RND,SATURATE>", "unknown saturation mode"),
        ("fixed<0,0>", "width must be in"),
        ("ufixed<9,1", "cannot parse"),
    ],
)
def test_parse_precision_rejects(text, problem):
    with pytest.raises(ValueError, match=problem):
        firmware.parse_precision(text)


@given(
    signed=st.booleans(),
    width=st.integers(1, 40),
    integer=st.integers(-4, 44),
    rounding=st.sampled_from(firmware.ROUNDING),
    saturation=st.sampled_from(firmware.SATURATION),
)
def test_precision_string_round_trip(signed, width, integer, rounding, saturation):
    p = firmware.Precision(signed, width, integer, rounding, saturation)
    assert firmware.parse_precision(str(p)) == p


# ----------------------------------------------------------------------------- derived types


def _grid(p: firmware.Precision) -> list[Fraction]:
    step = Fraction(2) ** -p.frac
    n = int((p.hi - p.lo) / step) + 1
    return [p.lo + i * step for i in range(n)]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    xb=st.integers(1, 5),
    xi=st.integers(0, 2),
    wb=st.integers(2, 5),
    wi=st.integers(0, 2),
)
def test_accumulator_holds_every_sum_and_is_narrowest(n, xb, xi, wb, wi):
    """Brute force over the quantizer grids: every bias + n-term sum fits, one integer bit less would not."""
    x = firmware.Precision(False, max(xb, xi), xi)
    w = firmware.Precision(True, max(wb, wi + 1), wi + 1)
    acc = firmware.accumulator(n, x, w, w)
    products = [a * b for a, b in itertools.product(_grid(x), _grid(w))]
    lo = n * min(products) + w.lo
    hi = n * max(products) + w.hi
    assert acc.signed and acc.frac == x.frac + w.frac
    assert acc.lo <= lo and hi <= acc.hi
    narrower = firmware.Precision(True, acc.width - 1, acc.integer - 1)
    assert narrower.lo > lo or hi > narrower.hi


def test_default_types_follow_the_quantizers():
    """Seed quantizers: conv = 9 taps of ufixed<9,1> x fixed<6,1> + bias: |sum| <= 9*(511/256) + 1 < 2^5,
    on the 2^-13 grid -> fixed<19,6>; dense = 128 of ufixed<8,1> x fixed<6,1> + bias reaches -256 exactly
    on the 2^-12 grid -> fixed<21,9>. Activations keep their quantizer's grid with RND_CONV + SAT."""
    t = firmware.derive_types(QuantConfig(latent_bits=9))
    assert str(t["wafer", "result"]) == f"ufixed<{chip.INPUT_BITS},1>"
    assert str(t["conv2d", "weight"]) == "fixed<6,1>"
    assert str(t["conv2d", "accum"]) == "fixed<19,6>" == str(t["conv2d", "result"])
    assert str(t["conv_act", "result"]) == "ufixed<8,1,RND_CONV,SAT>"
    assert str(t["dense", "accum"]) == "fixed<21,9>" == str(t["dense", "result"])
    assert str(t["latent", "result"]) == "ufixed<9,1,RND_CONV,SAT>"
    t3 = firmware.derive_types(QuantConfig(latent_bits=3))
    assert str(t3["latent", "result"]) == "ufixed<3,1,RND_CONV,SAT>"
    wide = firmware.derive_types(QuantConfig(weight_bits=8, weight_integer=1, conv_act_bits=10, latent_bits=9))
    assert wide["dense", "weight"] == firmware.Precision(True, 8, 2)
    assert wide["dense", "accum"].frac == 9 + 6  # conv_act 10 bits, 1 integer; weight 8 bits, 2 integer


# ----------------------------------------------------------------------------- config validation


def test_shipped_configs_load():
    asic, vitis = firmware.load_config(ASIC), firmware.load_config(VITIS)
    assert (asic.backend, asic.technology, asic.io_type, asic.name) == ("Catapult", "asic", "io_parallel", "econt_asic")
    assert asic.ac_types and asic.asic_libs and asic.clock_period > 0
    assert (vitis.backend, vitis.io_type, vitis.name) == ("Vitis", "io_parallel", "fpga_vitis")
    assert not vitis.ac_types and vitis.part
    # Nothing in them pins a bit width: a retrained model flows through unedited.
    assert asic.latent_bits is None and vitis.latent_bits is None


@pytest.mark.parametrize(
    "text, problem",
    [
        (ASIC_BASE + "clock: 5\n", r"unknown key\(s\) clock"),
        (ASIC_BASE + "layers:\n  conv3: {}\n", r"fw\.yaml: layers: unknown key\(s\) conv3"),
        (ASIC_BASE + "layers:\n  dense: {accum: 'fixd<21,9>'}\n", r"layers\.dense\.accum: cannot parse"),
        (ASIC_BASE + "layers:\n  latent: {result: 'ufixed<9,1,RND_HALF,SAT>'}\n", r"layers\.latent\.result: unknown"),
        (ASIC_BASE + "layers:\n  latent: {accum: 'fixed<21,9>'}\n", r"layers\.latent\.accum: only conv2d and dense"),
        (ASIC_BASE + "layers:\n  dense: {strategy: fast}\n", "strategy must be one of Latency, Resource"),
        (ASIC_BASE + "io_type: io_stream\n", "io_type must be io_parallel"),
        (ASIC_BASE + "reuse_factor: '1'\n", r"reuse_factor: expected an integer"),
        (ASIC_BASE + "latent_bits: 1\n", "latent_bits must be in 2..16"),
        ("backend: Quartus\npart: x\n", "backend must be one of Catapult, Vitis, Vivado"),
        ("part: x\n", "backend is required"),
        ("backend: Vitis\n", "part is required for the Vitis backend"),
        ("backend: Vitis\npart: x\ntechnology: asic\n", "technology applies to the Catapult backend only"),
        ("backend: Catapult\ntechnology: asic\n", "asic_libs is required"),
        ("backend: Catapult\ntechnology: asic\nasic_libs: a\nconfig_file: x\n", r"unknown key\(s\) config_file"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path, text, problem):
    path = _yaml(tmp_path, text)
    with pytest.raises(EcqaeError, match=problem) as err:
        firmware.load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_config_backend_is_case_insensitive(tmp_path):
    fw = firmware.load_config(_yaml(tmp_path, "backend: vitis\npart: xcvu9p-flga2104-2-e\nstrategy: resource\n"))
    assert (fw.backend, fw.strategy, fw.name) == ("Vitis", "Resource", "fw")


def test_latent_width_must_match_the_model(tmp_path):
    quant = QuantConfig(latent_bits=9)
    fw = firmware.load_config(_yaml(tmp_path, ASIC_BASE + "latent_bits: 3\n"))
    with pytest.raises(EcqaeError, match=r"fw\.yaml: latent_bits: 3 but the trained model has 9-bit latents"):
        firmware.resolve_types(fw, quant)
    fw = firmware.load_config(_yaml(tmp_path, ASIC_BASE + "layers:\n  latent: {result: 'ufixed<8,1,RND_CONV,SAT>'}\n"))
    with pytest.raises(EcqaeError, match=r"layers\.latent\.result: .*quantized_relu\(9,1\)"):
        firmware.resolve_types(fw, quant)
    fw = firmware.load_config(_yaml(tmp_path, ASIC_BASE + "layers:\n  wafer: {result: 'ufixed<10,1>'}\n"))
    with pytest.raises(EcqaeError, match=r"layers\.wafer\.result: .*input grid"):
        firmware.resolve_types(fw, quant)
    # Rounding may be overridden (make verify then judges it); the grid stays the model's.
    fw = firmware.load_config(_yaml(tmp_path, ASIC_BASE + "layers:\n  latent: {result: 'ufixed<9,1,TRN,SAT>'}\n"))
    assert firmware.resolve_types(fw, quant)["latent", "result"] == firmware.Precision(False, 9, 1, "TRN", "SAT")


def test_cli_hls_rejects_a_contradicting_config_before_writing(tmp_path, calq_run, capsys):
    bad = _yaml(tmp_path, ASIC_BASE + "latent_bits: 3\n", "asic3.yaml")
    out = tmp_path / "hls"
    code = main(["hls", "--run", str(calq_run), "--out", str(out), str(ASIC), str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("ecqae: error: ") and "asic3.yaml: latent_bits: 3" in err and err.count("\n") == 1
    assert not (out / "econt_asic").exists()  # nothing converted: every config is checked first


def test_cli_hls_missing_run(tmp_path, capsys):
    code = main(["hls", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "hls"), str(ASIC)])
    assert code == 2 and "no such run directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hls4ml traps, caught


@pytest.fixture(scope="module")
def encoder9(calq_run):
    from ecqae import train

    return train.load_run(calq_run).encoder()


def test_unpinned_linear_cast_is_caught(encoder9, tmp_path):
    """hls4ml keeps a QDense's 'linear' activation as a cast to the default type unless pinned."""
    import hls4ml

    fw = firmware.load_config(VITIS)
    types = firmware.resolve_types(fw, QuantConfig(latent_bits=9))
    hc = firmware.hls_config(encoder9, fw, types)
    hc["LayerName"]["dense_linear"]["Precision"]["result"] = "fixed<16,6>"
    hm = hls4ml.converters.convert_from_keras_model(
        encoder9, hls_config=hc, output_dir=str(tmp_path / "p"), backend="Vitis", part=fw.part, io_type="io_parallel"
    )
    assert "dense_linear" in [layer.name for layer in hm.get_layers()]  # the trap is real
    with pytest.raises(EcqaeError, match="a layer was dropped or a cast inserted"):
        firmware.check_graph(hm, encoder9, types, "fpga_vitis.yaml")


@pytest.mark.parametrize("config", CONFIGS, ids=["catapult", "vitis"])
def test_defines_check_fails_loudly(encoder9, tmp_path, config):
    """A written defines.h is checked type by type; a changed typedef is an error naming it."""
    fw = firmware.load_config(config)
    types = firmware.resolve_types(fw, QuantConfig(latent_bits=9))
    hm = firmware.build_graph(encoder9, fw, types, tmp_path / "p")
    hm.write()
    defines = tmp_path / "p" / "firmware" / "defines.h"
    typedefs = firmware.check_defines(defines, hm, encoder9, types, fw.ac_types)
    assert firmware.parse_precision(typedefs["result_t"]) == types["latent", "result"]
    text = defines.read_text()
    wrong = text.replace("AC_RND_CONV,AC_SAT> result_t", "AC_TRN,AC_SAT> result_t").replace(
        "AP_RND_CONV,AP_SAT,0> result_t", "AP_TRN,AP_SAT,0> result_t"
    )
    assert wrong != text
    defines.write_text(wrong)
    with pytest.raises(EcqaeError, match=r"latent result is result_t = .*TRN.*expected ufixed<9,1,RND_CONV,SAT>"):
        firmware.check_defines(defines, hm, encoder9, types, fw.ac_types)


# ----------------------------------------------------------------------------- emitted projects


HLS4ML_FILES = ("firmware/defines.h", "firmware/parameters.h", "firmware/econt_encoder.cpp", "build_prj.tcl")


@pytest.mark.parametrize("name", ["econt_asic", "fpga_vitis"])
def test_projects_emitted_and_compiled(hls9, calq_run, name):
    from ecqae import artifacts, train

    project = hls9[name]
    run = train.load_run(calq_run)
    assert artifacts.read_complete(project) is not None
    for f in (*HLS4ML_FILES, "econt_encoder_test.cpp", "econt_encoder_bridge.cpp", "build_lib.sh"):
        assert (project / f).is_file(), f
    record = json.loads((project / firmware.RECORD).read_text())
    assert record["run_id"] == run.run_id
    assert (project / record["library"]).is_file()
    assert record["compiled_in"] == str(project.resolve())
    assert record["timings"]["compile_seconds"] > 0
    ac = name == "econt_asic"
    assert record["hls_types"] == ("ac_fixed" if ac else "ap_fixed")
    # Every typedef in defines.h is what the quantizers ask for, in the backend's own form.
    typedefs = firmware.read_typedefs(project / "firmware" / "defines.h")
    assert typedefs["input_t"] == ("ac_fixed<9,1,false>" if ac else "ap_ufixed<9,1>")
    assert typedefs["result_t"] == (
        "ac_fixed<9,1,false,AC_RND_CONV,AC_SAT>" if ac else "ap_ufixed<9,1,AP_RND_CONV,AP_SAT,0>"
    )
    types = firmware.resolve_types(firmware.load_config(ASIC if ac else VITIS), run.config.model.quant)
    for key, text in record["types"].items():
        assert firmware.parse_precision(text) == types[tuple(key.split("."))]
    # No trace of the temporary build directory (.<name>.XXXX.tmp); paths point at the project itself.
    tmp_name = re.compile(rf"\.{name}\.\w+\.tmp".encode())
    for rel in firmware.project_files(project):
        assert not tmp_name.search((project / rel).read_bytes()), rel
    assert f"OutputDir: {project.resolve()}\n" in (project / "hls4ml_config.yml").read_text()
    if ac:
        bridge = (project / "econt_encoder_bridge.cpp").read_text()
        assert f'"{project.resolve()}/firmware/weights"' in bridge


@pytest.mark.parametrize("name", ["econt_asic", "fpga_vitis"])
def test_testbench_vectors_are_the_qkeras_latents(hls9, calq_run, name):
    from ecqae import model, train

    project = hls9[name]
    encoder = train.load_run(calq_run).encoder()
    tb = project / firmware.TB_DIR
    x = np.loadtxt(tb / firmware.TB_INPUT, ndmin=2)
    y = np.loadtxt(tb / firmware.TB_OUTPUT, ndmin=2)
    with np.load(tb / firmware.TB_WAFERS) as z:
        charges = z["charges"]
    assert x.shape == (len(charges), 81) and y.shape == (len(charges), 16)
    assert np.array_equal(x, firmware.encoder_images(charges).reshape(len(charges), -1))
    assert np.all(x * 256 == np.rint(x * 256))  # on the ufixed<9,1> grid
    assert np.array_equal(y, model.encode(encoder, x.reshape(-1, 9, 9, 1).astype(np.float32)))
    assert len(charges) >= 2000  # 908 test wafers + the corner cases
    if name == "econt_asic":
        tcl = (project / "build_prj.tcl").read_text()
        assert 'INVOKE_ARGS "$sfd/firmware/weights $sfd/tb_data/tb_input_features.dat' in tcl


def test_hls4ml_testbench_reproduces_the_vectors(hls9, tmp_path):
    """The vendor-style C simulation (hls4ml's testbench, g++) on tb_data gives the expected latents."""
    project = hls9["econt_asic"]
    got = firmware.run_testbench(project, tmp_path)
    want = np.loadtxt(project / firmware.TB_DIR / firmware.TB_OUTPUT, ndmin=2)
    assert got.shape == want.shape
    assert np.array_equal(np.rint(got * 256), want * 256)
    assert np.max(np.abs(got * 256 - np.rint(got * 256))) < 1e-3  # printed values sit on the latent grid


def test_latent_width_flows_to_the_firmware(hls3, hls9):
    """A 3-bit model (2 e-links) through the same, unedited configs: the types follow."""
    for name, ac in (("econt_asic", True), ("fpga_vitis", False)):
        t3 = firmware.read_typedefs(hls3[name] / "firmware" / "defines.h")
        t9 = firmware.read_typedefs(hls9[name] / "firmware" / "defines.h")
        assert t3["result_t"] == (
            "ac_fixed<3,1,false,AC_RND_CONV,AC_SAT>" if ac else "ap_ufixed<3,1,AP_RND_CONV,AP_SAT,0>"
        )
        assert t9["result_t"] == (
            "ac_fixed<9,1,false,AC_RND_CONV,AC_SAT>" if ac else "ap_ufixed<9,1,AP_RND_CONV,AP_SAT,0>"
        )
        y3 = np.loadtxt(hls3[name] / firmware.TB_DIR / firmware.TB_OUTPUT)
        assert np.all(y3 * 4 == np.rint(y3 * 4)) and y3.max() <= 1.75  # the 3-bit latent grid
        record = json.loads((hls3[name] / firmware.RECORD).read_text())
        assert record["quant"]["latent_bits"] == 3
        assert record["testbench"]["csim_mismatched_latents"] == 0


# ----------------------------------------------------------------------------- build and integrity failures


def test_gpp_error_is_a_build_error(hls9, tmp_path):
    """Catapult's build_lib.sh has no 'set -e': the failure must still read as g++'s error."""
    broken = tmp_path / "broken"
    shutil.copytree(hls9["econt_asic"], broken)
    src = broken / "firmware" / "econt_encoder.cpp"
    text = src.read_text()
    broken_text = text.replace('#include "econt_encoder.h"\n', '#include "econt_encoder.h"\nundeclared_t broken;\n', 1)
    assert broken_text != text
    src.write_text(broken_text)
    with pytest.raises(EcqaeError) as err:
        firmware.compile_project(broken, log=lambda _m: None)
    msg = str(err.value)
    assert "g++ build failed" in msg and "error:" in msg and "econt_encoder.cpp" in msg and "\n" not in msg
    assert not firmware.library_path(broken).exists()
    assert "error" in (broken / firmware.BUILD_LOG).read_text()


def test_moved_changed_or_unfinished_projects_are_refused(hls9, tmp_path):
    src = hls9["econt_asic"]
    firmware.open_project(src)  # the real one opens
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    with pytest.raises(EcqaeError, match="compiled in .*moved or copied project must be rebuilt"):
        firmware.open_project(moved)
    (moved / "firmware" / "defines.h").write_text("// edited\n")
    with pytest.raises(EcqaeError, match=r"defines\.h: missing or changed since make hls"):
        firmware.open_project(moved)
    (moved / "COMPLETE").unlink()
    with pytest.raises(EcqaeError, match="project is incomplete"):
        firmware.open_project(moved)
    with pytest.raises(EcqaeError, match="no HLS project here"):
        firmware.open_project(tmp_path / "absent")


def test_project_from_another_config_or_run_is_refused(hls9, tmp_path):
    from dataclasses import replace

    fw = firmware.load_config(ASIC)
    firmware.open_project(hls9["econt_asic"], fw)
    with pytest.raises(EcqaeError, match="built from a different version"):
        firmware.open_project(hls9["econt_asic"], replace(fw, clock_period=10.0))
    with pytest.raises(EcqaeError, match="not run 0123456789ab"):
        firmware.open_project(hls9["econt_asic"], fw, run_id="0123456789ab")


def test_firmware_config_dataclass_defaults():
    fw = FirmwareConfig(backend="Vitis", part="xcvu9p-flga2104-2-e")
    assert fw.io_type == "io_parallel" and fw.strategy == "Latency" and fw.reuse_factor == 1
