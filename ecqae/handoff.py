"""Hand-off stage: a self-describing release bundle for ASIC engineers, and its re-check.

``make_bundle`` (``make handoff``) writes ``hls/release/<name>/`` and
``hls/release/<name>.tar.gz``, only after ``verify.verify_all`` has shown
QKeras = C simulation = golden integer model:

  README.md                       what each file is; how to run the vendor C simulation
  MANIFEST.json                   run id, training config, firmware configs, package
                                  versions, verification result, sha256 of every file
  <config>/firmware_config.yaml   the firmware config the project was made from
  <config>/hls/                   the HLS project as ``make hls`` wrote it (without the
                                  machine-specific build products); its tb_data/ holds
                                  the vectors below in the hls4ml test-bench format
  <config>/register_image.hex     2,144 weight words (golden.py states the order)
  <config>/register_image.csv     the same, one row per word with layer/tensor/index/value
  <config>/vectors/charges.csv            N x 48 TC charges (the chip's input)
  <config>/vectors/inputs.csv             N x 81 encoder input codes (9x9, value = code/256)
  <config>/vectors/expected_latents.csv   N x 16 latent codes
  <config>/vectors/expected_output_words.txt  N output words, hex

``check_bundle`` (``ecqae check-bundle``) re-verifies a received bundle from its
files alone: every sha256 in the manifest, then the golden model rebuilt from
each register image run on that config's charges must give its input codes,
expected latents, output words and test-bench files exactly.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, artifacts, chip, golden
from .config import QuantConfig, from_dict, to_dict
from .data import load_wafers
from .errors import EcqaeError

Log = Callable[[str], None]

RELEASE_ROOT = Path("hls/release")
MANIFEST = "MANIFEST.json"
README = "README.md"
FORMAT = "ecqae-release-1"
FW_CONFIG = "firmware_config.yaml"
HLS_DIR = "hls"
REG_HEX = "register_image.hex"
REG_CSV = "register_image.csv"
CHARGES = "vectors/charges.csv"
INPUTS = "vectors/inputs.csv"
LATENTS = "vectors/expected_latents.csv"
WORDS = "vectors/expected_output_words.txt"
TB_INPUT = "tb_data/tb_input_features.dat"  # names the hls4ml test bench reads
TB_OUTPUT = "tb_data/tb_output_predictions.dat"
TB_WAFERS = "tb_data/tb_wafers.npz"
# Project files not shipped: the compiled Python-bridge library (built for the
# machine and directory it was made in), its build log and the local COMPLETE marker.
SKIP_NAMES = ("COMPLETE", "build.log")
SKIP_SUFFIXES = (".so", ".o")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

CHARGE_COLUMNS = [f"CALQ_{i}" for i in range(chip.N_TC)]
INPUT_COLUMNS = [f"x_{r}_{c}" for r in range(chip.IMAGE_SIZE) for c in range(chip.IMAGE_SIZE)]
LATENT_COLUMNS = [f"latent_{i}" for i in range(chip.N_LATENT)]


# ----------------------------------------------------------------------------- vector files


def _table(columns: list[str], rows: np.ndarray) -> str:
    buf = io.StringIO()
    buf.write(",".join(columns) + "\n")
    for row in np.asarray(rows, dtype=np.int64).tolist():
        buf.write(",".join(map(str, row)) + "\n")
    return buf.getvalue()


def read_table(path: Path, columns: list[str]) -> np.ndarray:
    """An integer CSV with exactly these columns -> (N, len(columns)) int64; errors name file and line."""
    text = artifacts.read_text(path)
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != columns:
        raise EcqaeError(f"{path}: header must be {columns[0]},...,{columns[-1]} ({len(columns)} columns)")
    rows = []
    for n, row in enumerate(reader, 2):
        if len(row) != len(columns):
            raise EcqaeError(f"{path}: line {n}: {len(row)} fields, expected {len(columns)}")
        try:
            rows.append([int(c) for c in row])
        except ValueError:
            raise EcqaeError(f"{path}: line {n}: not all integers") from None
    return np.array(rows, dtype=np.int64).reshape(len(rows), len(columns))


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        raise EcqaeError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EcqaeError(f"{path}: cannot read ({exc})") from None


def _read_dat(path: Path, width: int) -> np.ndarray:
    """An hls4ml test-bench .dat file (space-separated values, one wafer per line)."""
    lines = _read_lines(path)
    try:
        rows = [[float(v) for v in ln.split()] for ln in lines]
    except ValueError:
        raise EcqaeError(f"{path}: not all numbers") from None
    if any(len(r) != width for r in rows):
        raise EcqaeError(f"{path}: expected {width} values per line")
    return np.array(rows, dtype=np.float64).reshape(len(rows), width)


def _first_row_differing(a: np.ndarray, b: np.ndarray) -> int | None:
    if a.shape != b.shape:
        return -1
    bad = np.flatnonzero(np.any(a.reshape(len(a), -1) != b.reshape(len(b), -1), axis=1))
    return int(bad[0]) if bad.size else None


# ----------------------------------------------------------------------------- README


def gxx_command(backend: str, project_name: str) -> str:
    """Build-and-run of the hls4ml test bench with g++ alone (no vendor tool), run inside ``hls/``."""
    if backend == "Catapult":
        inc = "-Ifirmware -Ifirmware/ac_types/include -Ifirmware/ac_math/include -Ifirmware/ac_simutils/include"
        run = f"./{project_name}_csim firmware/weights {TB_INPUT} {TB_OUTPUT}"
    else:
        inc = "-DWEIGHTS_DIR='\"firmware/weights\"' -Ifirmware -Ifirmware/ap_types"
        run = f"./{project_name}_csim"
    return (
        f"g++ -O1 -std=c++11 {inc} -Ifirmware/nnet_utils {project_name}_test.cpp firmware/{project_name}.cpp "
        f"-o {project_name}_csim && {run}"
    )


def vendor_command(backend: str) -> str:
    """The vendor tool's C simulation only (no synthesis), run inside ``hls/``."""
    if backend == "Catapult":
        return "catapult -product ultra -shell -f build_prj.tcl -eval 'set ::argv \"csim=1 synth=0\"'"
    if backend == "Vitis":
        return (
            "printf 'array set opt {\\n reset 1\\n csim 1\\n synth 0\\n cosim 0\\n validation 0\\n export 0\\n"
            " vsynth 0\\n fifo_opt 0\\n}\\n' > build_opt.tcl && vitis-run --tcl build_prj.tcl --mode hls"
        )
    return 'vivado_hls -f build_prj.tcl "reset=1 csim=1 synth=0 cosim=0 validation=0 export=0 vsynth=0"'


def _readme(manifest: dict[str, Any]) -> str:
    m = manifest["model"]
    q = m["quant"]
    bits, scale = q["latent_bits"], 2 ** (q["latent_bits"] - q["latent_integer"])
    configs = manifest["configs"]
    lines = [
        f"# ECON-T encoder release `{manifest['name']}`",
        "",
        f"Encoder of training run `{m['run_id']}`: {bits}-bit latents ({m['elinks']} e-links), "
        f"weights {m['quantizers']['weight']}, conv activation {m['quantizers']['conv_act']}, "
        f"latent {m['quantizers']['latent']}. Made {manifest['created']} with ecqae {manifest['packages']['ecqae']}.",
        "",
        f"Verified before release: {manifest['verification']['compared']} bit for bit "
        f"({manifest['verification']['summary']}). Check this copy with `ecqae check-bundle <this directory>`",
        "(every sha256 in MANIFEST.json, and the golden model rebuilt from each register image run on the",
        "vectors must give the expected latents and output words).",
        "",
        "## Files",
        "",
        "| file | what it is |",
        "|---|---|",
        f"| `{README}` | this file |",
        f"| `{MANIFEST}` | run id, training config, firmware configs, package versions, verification result, "
        "sha256 of every file |",
    ]
    for c in configs:
        d = c["dir"]
        lines += [
            f"| `{d}/{FW_CONFIG}` | the firmware config of `{d}` ({c['backend']}, {c['hls_types']}) |",
            f"| `{d}/{HLS_DIR}/` | the HLS project (hls4ml {manifest['packages'].get('hls4ml', '')}); top function "
            f"`{c['project_name']}` in `firmware/{c['project_name']}.cpp`, types in `firmware/defines.h`, "
            "provenance in `ecqae.json` |",
            f"| `{d}/{HLS_DIR}/{TB_INPUT}`, `{TB_OUTPUT}` | the vectors below in the test bench's format: input values "
            f"(code / 256) and expected latent values (code / {scale}) |",
            f"| `{d}/{REG_HEX}` | the {chip.N_REGISTER_WORDS:,} weight registers, one 2-digit hex word per line "
            "(6-bit two's complement, value = code / 32); `//` lines state the order and the activation widths |",
            f"| `{d}/{REG_CSV}` | the same, one row per word: word, layer, tensor, index (flat, C order), value, "
            "code, hex |",
            f"| `{d}/{CHARGES}` | {c['vectors']:,} wafers: 48 integer TC charges each (CALQ order) |",
            f"| `{d}/{INPUTS}` | the encoder input of each wafer: 81 codes, 9x9 row-major (value = code / 256) |",
            f"| `{d}/{LATENTS}` | the 16 latent codes the chip must send for each wafer |",
            f"| `{d}/{WORDS}` | the chip's output word for each wafer, hex, one per line |",
        ]
    lines += [
        "",
        "## Formats",
        "",
        "- **Input**: TC charges are 22-bit unsigned (clipped, not wrapped). The encoder sees "
        "x = floor(q * 256 / S) / 256 with S the wafer sum saturated at 22 bits (ufixed<9,1>), placed in the "
        "9x9 image (8x8 layout plus a zero row and column; `vectors/inputs.csv` gives it directly).",
        "- **Register image order**: words 0-71 conv2d kernel [row, col, channel, filter]; 72-79 conv2d bias; "
        "80-2127 dense kernel [n, latent] with n = (row*4 + col)*8 + filter of the 4x4x8 conv output; "
        "2128-2143 dense bias. Each tensor in C order (last index fastest).",
        f"- **Arithmetic**: accumulators are exact; the conv and latent activations round half to even and "
        f"saturate (RND_CONV, SAT). Latent code = value x {scale}, unsigned, {bits} bits.",
        f"- **Output word**: {chip.output_word_bits(bits)} bits, {chip.output_word_hex_digits(bits)} hex digits, "
        f"most significant first. Latent i occupies bits [{bits}*i, {bits}*i + {bits - 1}], the 9-bit encoded "
        f"sum bits [{chip.output_sum_lsb(bits)}, {chip.output_sum_lsb(bits) + chip.SUM_WORD_BITS - 1}]: Verilog "
        "`{sum_word, latent[15], ..., latent[0]}`. The sum word is 5 exponent + 4 mantissa bits: below 32 the "
        "value itself; above, exponent = bit length - 4 and the mantissa the 4 bits after the leading one; "
        "all ones when the sum exceeds 22 bits. Decoded: exponent 0 -> mantissa, else (16 + mantissa) << "
        "(exponent - 1).",
        "",
        "## Running the C simulation",
        "",
        "Inside `<config>/hls/`. The test bench reads `tb_data/tb_input_features.dat`, runs the top function "
        "on every line and writes `tb_data/csim_results.log`; every line must equal the same line of "
        "`tb_data/tb_output_predictions.dat`.",
        "",
    ]
    for c in configs:
        lines += [
            f"`{c['dir']}` ({c['backend']}), with the vendor tool:",
            "",
            "```sh",
            f"cd {c['dir']}/{HLS_DIR}",
            vendor_command(c["backend"]),
            "```",
            "",
            "or with g++ alone (the type headers ship inside the project):",
            "",
            "```sh",
            gxx_command(c["backend"], c["project_name"]),
            "```",
            "",
        ]
    lines += [
        "Compare (results are printed to a few digits, so compare the codes):",
        "",
        "```sh",
        f"python3 -c \"import numpy as n; a=n.loadtxt('tb_data/csim_results.log'); "
        f"b=n.loadtxt('tb_data/tb_output_predictions.dat'); print(int((n.rint(a*{scale})!=n.rint(b*{scale})).sum()), "
        "'mismatched latents')\"",
        "```",
        "",
        f"`{configs[0]['project_name']}_bridge.cpp` and `build_lib.sh` build the Python bridge hls4ml uses; the "
        "bridge names the weights directory where the project was built, so it needs that path edited "
        "elsewhere. The vendor flows and the g++ line above do not use it.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- making the bundle


def _copy_project(src: Path, dst: Path) -> None:
    def ignore(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if n in SKIP_NAMES or n.endswith(SKIP_SUFFIXES) or n.startswith(".")}

    shutil.copytree(src, dst, ignore=ignore)


def _write_vectors(cfg_dir: Path, enc: golden.IntegerEncoder, charges: np.ndarray) -> dict[str, Any]:
    """Vector files for ``charges``; the test-bench files already in the project must agree with them."""
    codes = enc.input_codes(charges)
    latents = enc.latent_codes(charges)
    where = cfg_dir / HLS_DIR / "tb_data"
    tb_in = _read_dat(cfg_dir / HLS_DIR / TB_INPUT, chip.IMAGE_SIZE**2)
    tb_out = _read_dat(cfg_dir / HLS_DIR / TB_OUTPUT, chip.N_LATENT)
    if _first_row_differing(tb_in * (1 << chip.INPUT_FRAC_BITS), codes.reshape(len(codes), -1)) is not None:
        raise EcqaeError(f"{where}: test-bench inputs are not the normalised tb_wafers charges")
    row = _first_row_differing(tb_out * enc.latent_scale, latents)
    if row is not None:
        raise EcqaeError(
            f"{where}: QKeras expected latents differ from the golden model's at wafer {row}; no bundle written"
        )
    vec = cfg_dir / "vectors"
    vec.mkdir()
    (cfg_dir / CHARGES).write_text(_table(CHARGE_COLUMNS, charges))
    (cfg_dir / INPUTS).write_text(_table(INPUT_COLUMNS, codes.reshape(len(codes), -1)))
    (cfg_dir / LATENTS).write_text(_table(LATENT_COLUMNS, latents))
    (cfg_dir / WORDS).write_text("\n".join(enc.output_words(charges)) + "\n")
    golden.write_register_image(enc, cfg_dir / REG_HEX, cfg_dir / REG_CSV)
    return {"vectors": len(charges), "nonzero_latents": int(np.count_nonzero(latents))}


def _bundle_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _tar(src: Path, name: str, dest: Path) -> None:
    """Reproducible-ish tarball: sorted members, no owner names."""

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def writer(tmp: Path) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(src, arcname=name, recursive=False, filter=clean)
            for p in sorted(src.rglob("*")):
                tar.add(p, arcname=f"{name}/{p.relative_to(src)}", recursive=False, filter=clean)

    artifacts.write_with(dest, writer)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def make_bundle(
    run_dir: Path,
    config_paths: list[Path],
    hls_dir: Path,
    name: str | None = None,
    out_root: Path = RELEASE_ROOT,
    n_wafers: int = 0,
    log: Log = print,
) -> Path:
    """``make handoff``: verify, then write ``out_root/<name>/`` and ``<name>.tar.gz``; returns the directory.

    Refuses (EcqaeError, nothing written) when verification fails, when a
    project is missing, stale or from another run, or when the bundle does not
    pass ``check_bundle`` itself.
    """
    from . import firmware, train, verify
    from . import model as mdl

    if not config_paths:
        raise EcqaeError("no firmware configs given (firmware_configs/*.yaml)")
    run = train.load_run(run_dir)
    name = name or f"econt-{run.run_id}"
    if not _NAME_RE.fullmatch(name):
        raise EcqaeError(f"bundle name must be a plain directory name, got {name!r}")
    fws = [firmware.load_config(p) for p in config_paths]
    seen: dict[str, str] = {}
    for fw in fws:
        if fw.name in seen:
            raise EcqaeError(f"{fw.config_file}: project name '{fw.name}' is also used by {seen[fw.name]}")
        seen[fw.name] = fw.config_file
    projects = [firmware.open_project(Path(hls_dir) / fw.name, fw, run.run_id) for fw in fws]

    log(f"handoff: verifying {len(fws)} config(s) before writing a bundle")
    if not verify.verify_all(Path(run_dir), list(config_paths), Path(hls_dir), n_wafers=n_wafers, log=log):
        raise EcqaeError("verification failed (QKeras, C simulation and golden model disagree); no bundle written")
    report = json.loads((Path(hls_dir) / "verify.json").read_text())

    encoder = run.encoder()
    quant = mdl.check_encoder(encoder)
    enc = golden.IntegerEncoder.from_keras(encoder, str(Path(run_dir) / "encoder.h5"))
    out_root = Path(out_root)
    dest = out_root / name
    configs: list[dict[str, Any]] = []
    with artifacts.atomic_dir(dest) as tmp:
        for fw, project, path in zip(fws, projects, config_paths, strict=True):
            cfg_dir = tmp / fw.name
            cfg_dir.mkdir()
            _copy_project(project.path, cfg_dir / HLS_DIR)
            shutil.copyfile(path, cfg_dir / FW_CONFIG)
            tb = load_wafers(project.path / TB_WAFERS)
            stats = _write_vectors(cfg_dir, enc, tb.charges.astype(np.int64))
            rep = report["configs"][fw.name]
            fw_dict = to_dict(fw)
            fw_dict.pop("config_file", None)
            configs.append(
                {
                    "name": fw.name,
                    "dir": fw.name,
                    "backend": fw.backend,
                    "hls_types": project.record.get("hls_types"),
                    "project_name": fw.project_name,
                    "firmware_config": fw_dict,
                    "types": project.record.get("types"),
                    "vectors": stats["vectors"],
                    "testbench": project.record.get("testbench"),
                    "verified": {k: rep[k] for k in ("wafers", "sources", "latents", "compared", "ok")},
                }
            )
            log(f"handoff: {fw.name}: project, register image and {stats['vectors']:,} test vectors")
        record = json.loads((Path(run_dir) / "config.json").read_text())
        packages = dict(train.stack_versions())
        packages["ecqae"] = __version__
        packages["g++"] = firmware.compiler_version()
        per_config = sorted({c["verified"]["wafers"] for c in configs})
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "name": name,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "model": {
                "run_id": run.run_id,
                "elinks": run.config.model.elinks,
                "training_config": to_dict(run.config),
                "data": record.get("data"),
                "quant": to_dict(quant),
                "quantizers": {
                    "weight": quant.weight_quantizer,
                    "conv_act": quant.conv_act_quantizer,
                    "latent": quant.latent_quantizer,
                },
            },
            "configs": configs,
            "packages": packages,
            "verification": {
                "passed": True,
                "compared": "QKeras = C simulation = golden integer model",
                "summary": f"{' / '.join(f'{n:,}' for n in per_config)} wafers (test split and corner cases) "
                f"for each of {len(configs)} config(s), 0 mismatched latents",
                "wafers": {c["name"]: c["verified"]["wafers"] for c in configs},
            },
            "files": {},
        }
        (tmp / README).write_text(_readme(manifest))
        manifest["files"] = {rel: artifacts.sha256_file(tmp / rel) for rel in _bundle_files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if not check_bundle(tmp, log=lambda _m: None):
            problems: list[str] = []
            check_bundle(tmp, log=problems.append)
            raise EcqaeError(f"the new bundle fails its own check ({problems[0]}); no bundle written")
        _tar(tmp, name, out_root / f"{name}.tar.gz")
    n_files = len(manifest["files"]) + 1
    log(
        f"handoff: wrote {dest} ({n_files} files, {_size(dest) / 1e6:.1f} MB) and "
        f"{out_root / (name + '.tar.gz')} ({_size(out_root / (name + '.tar.gz')) / 1e6:.1f} MB)"
    )
    return dest


# ----------------------------------------------------------------------------- checking a bundle


def _check_config(root: Path, c: dict[str, Any], quant: QuantConfig, fail: Log) -> int:
    """Golden model from the register image against every vector file of one config; returns wafers checked."""
    d = root / c["dir"]
    try:
        enc = golden.read_register_image(d / REG_HEX)
    except EcqaeError as exc:
        fail(str(exc))
        return 0
    if enc.quant != quant:
        fail(f"{d / REG_HEX}: states {enc.quant}, MANIFEST says {quant}")
        return 0
    try:
        csv_enc = golden.read_register_image(d / REG_CSV, enc.quant)
        if not np.array_equal(csv_enc.register_codes(), enc.register_codes()):
            bad = int(np.flatnonzero(csv_enc.register_codes() != enc.register_codes())[0])
            fail(f"{d / REG_CSV}: word {bad} differs from {REG_HEX}")
    except EcqaeError as exc:
        fail(str(exc))
    try:
        charges = read_table(d / CHARGES, CHARGE_COLUMNS)
    except EcqaeError as exc:
        fail(str(exc))
        return 0
    codes = enc.input_codes(charges).reshape(len(charges), -1)
    latents = enc.latent_codes(charges)
    words = enc.output_words(charges)
    checks: list[tuple[str, Callable[[], np.ndarray], np.ndarray, str]] = [
        (INPUTS, lambda: read_table(d / INPUTS, INPUT_COLUMNS), codes, "normalised charges"),
        (LATENTS, lambda: read_table(d / LATENTS, LATENT_COLUMNS), latents, "golden model latents"),
        (WORDS, lambda: np.array(_read_lines(d / WORDS)), np.array(words), "golden model output words"),
        (
            f"{HLS_DIR}/{TB_INPUT}",
            lambda: _read_dat(d / HLS_DIR / TB_INPUT, chip.IMAGE_SIZE**2) * (1 << chip.INPUT_FRAC_BITS),
            codes,
            "normalised charges",
        ),
        (
            f"{HLS_DIR}/{TB_OUTPUT}",
            lambda: _read_dat(d / HLS_DIR / TB_OUTPUT, chip.N_LATENT) * enc.latent_scale,
            latents,
            "golden model latents",
        ),
    ]
    for rel, read, want, what in checks:
        try:
            got = read()
        except EcqaeError as exc:
            fail(str(exc))
            continue
        row = _first_row_differing(got, want)
        if row == -1:
            fail(f"{d / rel}: {len(got)} rows, expected {len(want)} (one per wafer of {CHARGES})")
        elif row is not None:
            fail(f"{d / rel}: wafer {row} differs from the {what} ({REG_HEX} run on {CHARGES})")
    try:
        unpacked = golden.unpack_output_word(_read_lines(d / WORDS), enc.latent_bits, str(d / WORDS))
        _, total = chip.normalise(charges)
        if not np.array_equal(unpacked.sum_word, chip.encode_sum(total)):
            fail(f"{d / WORDS}: encoded sums differ from the sums of {CHARGES}")
    except EcqaeError as exc:
        fail(str(exc))
    return len(charges)


def check_bundle(path: Path, log: Log = print) -> bool:
    """Re-verify a bundle directory (or its .tar.gz) from its files alone; prints each failing file."""
    p = Path(path)
    if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
        with tempfile.TemporaryDirectory(prefix=".check-bundle.") as tmp:
            try:
                with tarfile.open(p) as tar:
                    tar.extractall(tmp, filter="data")
            except (tarfile.TarError, OSError) as exc:
                raise EcqaeError(f"{p}: not a readable bundle tarball ({exc})") from None
            inner = [d for d in Path(tmp).iterdir() if d.is_dir()]
            if len(inner) != 1:
                raise EcqaeError(f"{p}: expected one bundle directory inside, found {len(inner)}")
            shown = f"{p}:{inner[0].name}"
            return check_bundle(inner[0], lambda m: log(m.replace(str(inner[0]), shown)))
    if not p.is_dir():
        raise EcqaeError(f"{p}: no bundle here (expected a release directory or its .tar.gz)")

    failures: list[str] = []

    def fail(msg: str) -> None:
        failures.append(msg)
        log(f"FAIL {msg}")

    try:
        manifest = json.loads((p / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
        files: dict[str, str] = manifest["files"]
        quant = from_dict(QuantConfig, manifest["model"]["quant"], f"{p / MANIFEST}: model.quant")
        configs = manifest["configs"]
    except FileNotFoundError:
        fail(f"{p / MANIFEST}: missing")
        return False
    except (OSError, ValueError, KeyError, TypeError, EcqaeError) as exc:
        fail(f"{p / MANIFEST}: unreadable ({exc})")
        return False

    for rel, digest in sorted(files.items()):
        f = p / rel
        if not f.is_file():
            fail(f"{f}: missing (listed in {MANIFEST})")
        elif artifacts.sha256_file(f) != digest:
            fail(f"{f}: sha256 differs from {MANIFEST} (changed after release)")
    for rel in sorted(set(_bundle_files(p)) - set(files)):
        fail(f"{p / rel}: not listed in {MANIFEST}")
    n_hashed = len(files)
    if not manifest.get("verification", {}).get("passed"):
        fail(f"{p / MANIFEST}: verification result is not 'passed'")

    wafers = 0
    for c in configs:
        wafers += _check_config(p, c, quant, fail)
    if failures:
        log(f"check-bundle: {p}: FAILED ({len(failures)} problem(s))")
        return False
    log(
        f"check-bundle: {p}: OK ({n_hashed} files match their sha256; golden model from the register image "
        f"reproduces the expected latents and output words of {wafers:,} wafers over {len(configs)} config(s))"
    )
    return True
