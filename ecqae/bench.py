"""Benchmarks: speed and peak memory of every stage, printed beside the project's targets.

``make bench`` (``ecqae bench``) generates wafers with the embedded generator at
a fixed seed and measures each stage the way the pipeline runs it: the data
layer, training (``train.train`` itself), the QKeras encoder, the golden
integer model, ``make hls`` for every ``firmware_configs/*.yaml``, the C
simulation of each project, ``make verify`` and the EMD. Every figure is the
median of several repetitions, with min and max; ``bench.json`` also records
the machine, the package versions and the load average, since a shared machine
makes numbers noisy.

Each stage runs in a fresh child interpreter (``python -m ecqae.bench``) and the
parent reads that child's peak resident memory from ``os.wait4``: ``ru_maxrss``
only ever grows inside a process, so stages sharing one would hide each other's
peaks, and a stage that crashes (a C-simulation segfault) costs only its row.
The smoke version (for CI) groups the TensorFlow stages into one child to pay
for the TensorFlow import once; its memory figures are those of the group.

A stage whose module has not landed yet (or lacks the function measured) is
reported as ``n/a: module missing``, never with a made-up number.
"""

from __future__ import annotations

import ast
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from . import artifacts
from .errors import EcqaeError

Log = Callable[[str], None]

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = PACKAGE_DIR.parent
FIRMWARE_CONFIGS = ROOT / "firmware_configs"

SEED = 0  # the generator seed of every benchmark dataset
DEFAULT_REPS = 3
SMOKE_WAFERS = 1_000
SMOKE_REPS = 2
SCALING_SIZES = (10_000, 100_000, 1_000_000)
SMOKE_SCALING_SIZES = (500, 1_000, 2_000)
TRAIN_WARMUP_EPOCHS = 2  # one MSE epoch, then the first telescope epoch (each traces a new graph)
MIB = 1024 * 1024
PACKAGES = ("tensorflow", "keras", "qkeras", "hls4ml", "numpy", "POT", "matplotlib", "h5py")
CHILD_TAG = "[bench] "  # child lines with this prefix are progress, forwarded to the parent's log

# Targets on the project's 2-core machine (issue 7). The figure each one judges is
# the row with the same key; "at" is the dataset size the target is stated for.
TARGETS: dict[str, dict[str, Any]] = {
    "train.epoch": {"text": ">= 50,000 wafers/s", "min": 50_000},
    "train.memory": {"text": "peak < 4 GiB at 1,000,000 wafers", "max_mib": 4 * 1024, "at": 1_000_000},
    "inference.qkeras": {"text": ">= 200,000 wafers/s", "min": 200_000},
    "inference.csim": {"text": ">= 100,000 wafers/s", "min": 100_000},
    "verify.all": {"text": "1,000,000 wafers < 60 s", "max_s": 60.0, "at": 1_000_000},
    "evaluation.emd": {"text": ">= 20,000 wafers/s", "min": 20_000},
    "firmware.make_hls": {"text": "all configs < 60 s", "max_s": 60.0},
}

# Module -> top-level names a stage calls; checked by reading the source, so a
# missing or half-written module is reported without importing it.
NEEDS: dict[str, dict[str, tuple[str, ...]]] = {
    "setup": {"data": ("generate", "save_wafers")},
    "generate": {"data": ("generate",)},
    "csv": {"data": ("read_csv", "load_wafers")},
    "train": {"train": ("train", "load_run")},
    "qkeras": {"train": ("load_run",), "model": ("encode",), "firmware": ("encoder_images",)},
    "reference": {"train": ("load_run",), "evaluate": ("reconstruct",)},
    "register": {"train": ("load_run",), "golden": ("IntegerEncoder", "write_register_image")},
    "golden": {"golden": ("IntegerEncoder", "read_register_image")},
    "firmware": {"firmware": ("convert_all", "open_project")},
    "csim": {"firmware": ("open_project", "encoder_images")},
    "verify": {"verify": ("verify_all",)},
    "emd": {"metrics": ("emd",)},
}


# ----------------------------------------------------------------------------- helpers


def _missing(stage: str) -> str | None:
    """Why a stage cannot run yet ('n/a: module missing ...'), or None."""
    for module, names in NEEDS.get(stage, {}).items():
        path = PACKAGE_DIR / f"{module}.py"
        if not path.is_file():
            return f"n/a: module missing (ecqae/{module}.py)"
        try:
            tree = ast.parse(path.read_text())
        except SyntaxError as exc:
            return f"n/a: ecqae/{module}.py does not parse (line {exc.lineno})"
        defined: set[str] = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined.update(t.id for t in targets if isinstance(t, ast.Name))
        lack = [n for n in names if n not in defined]
        if lack:
            return f"n/a: module missing (ecqae/{module}.py has no {', '.join(lack)})"
    return None


def _rss_mib() -> float:
    """Current resident memory of this process (not the peak)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / MIB


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory, Python and the package versions the numbers depend on."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": platform.processor() or "unknown",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / MIB, 1)
    except OSError:
        pass
    quota = Path("/sys/fs/cgroup/cpu.max")
    if quota.is_file():
        info["cgroup_cpu_max"] = quota.read_text().strip()
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    info["packages"] = packages
    try:
        out = subprocess.run(["g++", "--version"], capture_output=True, text=True, check=False).stdout
        info["compiler"] = out.splitlines()[0] if out else "unknown"
    except OSError:
        info["compiler"] = "g++ not found"
    return info


# ----------------------------------------------------------------------------- stages (run in the child)


@dataclass
class _Ctx:
    """What a stage tells the parent besides its figures: its memory baseline and progress."""

    baseline_mib: float | None = None

    def baseline(self) -> None:
        """Resident memory once the stage's libraries are imported, before it holds any data.

        Peak minus baseline is what the stage's data costs: the figure that
        should stay flat as wafers grow if the stage works in batches.
        """
        self.baseline_mib = _rss_mib()

    @staticmethod
    def log(msg: str) -> None:
        print(CHILD_TAG + msg, flush=True)


def _figure(key: str, label: str, unit: str, wafers: int, seconds: list[float], **info: Any) -> dict[str, Any]:
    """One measured figure: per-repetition seconds for ``wafers`` wafers each."""
    return {"key": key, "label": label, "unit": unit, "wafers": wafers, "seconds": seconds, "info": info}


def _timed(fn: Callable[[], Any], reps: int) -> tuple[list[float], Any]:
    seconds, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
    return seconds, out


def _stage_setup(ctx: _Ctx, wafers: int, seed: int, npz: str, csv: str) -> dict[str, Any]:
    """The benchmark's dataset: generated wafers as .npz (for the stages) and as a CALQ CSV."""
    import numpy as np

    from . import data

    ctx.baseline()
    w = data.generate(wafers, seed)
    data.save_wafers(npz, w)
    t0 = time.perf_counter()
    header = ",".join([f"CALQ_{i}" for i in range(w.charges.shape[1])] + ["eta"])
    table = np.column_stack([w.charges.astype(np.float64), w.eta.astype(np.float64)])
    fmt = ["%d"] * w.charges.shape[1] + ["%.9g"]  # 9 significant digits: float32 eta reads back exactly
    artifacts.write_with(csv, lambda p: np.savetxt(p, table, fmt=fmt, delimiter=",", header=header, comments=""))
    return {"figures": [], "info": {"csv_bytes": Path(csv).stat().st_size, "csv_write_s": time.perf_counter() - t0}}


def _stage_generate(ctx: _Ctx, wafers: int, seed: int, reps: int) -> dict[str, Any]:
    from . import data

    ctx.baseline()
    data.generate(1000, seed)  # warm-up: first-call costs are not throughput
    seconds, _ = _timed(lambda: data.generate(wafers, seed), reps)
    return {"figures": [_figure("data.generate", "generate (embedded)", "wafers/s", wafers, seconds)]}


def _stage_csv(ctx: _Ctx, wafers: int, reps: int, npz: str, csv: str) -> dict[str, Any]:
    import numpy as np

    from . import data

    ctx.baseline()
    seconds, got = _timed(lambda: data.read_csv(csv, eta="eta"), reps)
    ref = data.load_wafers(npz)
    if not (np.array_equal(got.charges, ref.charges) and np.array_equal(got.eta, ref.eta)):
        raise EcqaeError(f"{csv}: read back differently from the wafers written")
    mib = Path(csv).stat().st_size / MIB
    return {"figures": [_figure("data.csv", f"load CSV ({mib:.0f} MiB)", "wafers/s", wafers, seconds)]}


def _stage_train(ctx: _Ctx, wafers: int, seed: int, reps: int, out: str) -> dict[str, Any]:
    """``train.train`` on the default model and batch size; throughput of the epochs after warm-up.

    Epoch 0 (MSE) and epoch 1 (the first telescope epoch) each trace a new
    graph, so they are the warm-up; the timed epochs are the telescope epochs
    that make up most of a default training. Seconds are train.py's own
    per-epoch ``fit`` time; validation and checkpoints are in the wall time.
    """
    from . import config, train

    ctx.baseline()
    epochs = TRAIN_WARMUP_EPOCHS + reps
    cfg = config.RunConfig(
        data=config.DataConfig(source="embedded", n_wafers=wafers, seed=seed),
        train=config.TrainConfig(epochs=epochs, mse_fraction=1.0 / epochs, patience=epochs, seed=seed),
    )
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    run = train.train(cfg, Path(out), log=ctx.log)
    wall = time.perf_counter() - t0
    hist = run.metrics()["history"]
    timed = hist[TRAIN_WARMUP_EPOCHS:]
    n_train = int(json.loads((Path(out) / "config.json").read_text())["data"]["train"])
    return {
        "figures": [
            _figure(
                "train.epoch",
                f"train epoch ({n_train:,} train wafers, batch {cfg.train.batch_size})",
                "wafers/s",
                n_train,
                [h["seconds"] for h in timed],
                warmup_wafers_per_s=[round(h["wafers_per_s"], 1) for h in hist[:TRAIN_WARMUP_EPOCHS]],
                wall_s=round(wall, 2),
                epochs=epochs,
                dataset_wafers=wafers,
            )
        ],
        "info": {"run_id": run.run_id},
    }


def _stage_qkeras(ctx: _Ctx, run: str, npz: str, wafers: int, reps: int) -> dict[str, Any]:
    from . import data, firmware, train
    from . import model as mdl

    ctx.baseline()
    encoder = train.load_run(run).encoder()
    images = firmware.encoder_images(data.load_wafers(npz).charges)
    mdl.encode(encoder, images[:4096])  # warm-up: builds the predict function
    seconds, _ = _timed(lambda: mdl.encode(encoder, images), reps)
    return {"figures": [_figure("inference.qkeras", "QKeras encoder (predict)", "wafers/s", wafers, seconds)]}


def _stage_reference(ctx: _Ctx, run: str, npz: str, wafers: int, reps: int, reco: str) -> dict[str, Any]:
    """AE reconstructions (encoder + decoder, as ``evaluate`` makes them) for the EMD stage."""
    import numpy as np

    from . import data, evaluate, train
    from . import model as _  # noqa: F401  (TensorFlow is in the baseline, not in the stage's memory)

    ctx.baseline()
    r = train.load_run(run)
    w = data.load_wafers(npz)
    enc, dec = r.encoder(), r.decoder()
    evaluate.reconstruct(enc, dec, w.take(np.arange(min(len(w), 4096))))  # warm-up
    seconds, out = _timed(lambda: evaluate.reconstruct(enc, dec, w), reps)
    np.save(reco, out)
    return {"figures": [_figure("evaluation.reconstruct", "AE reconstruction", "wafers/s", wafers, seconds)]}


def _stage_register(ctx: _Ctx, run: str, path: str) -> dict[str, Any]:
    """The trained encoder's register image: the golden stage then needs no TensorFlow."""
    from . import golden, train

    ctx.baseline()
    enc = golden.IntegerEncoder.from_keras(train.load_run(run).encoder())
    golden.write_register_image(enc, path)
    return {"figures": []}


def _stage_golden(ctx: _Ctx, register: str, npz: str, wafers: int, reps: int) -> dict[str, Any]:
    from . import data, golden

    ctx.baseline()
    enc = golden.read_register_image(register)
    charges = data.load_wafers(npz).charges
    enc.latent_codes(charges[:1000])
    seconds, _ = _timed(lambda: enc.latent_codes(charges), reps)
    return {"figures": [_figure("inference.golden", "golden integer model", "wafers/s", wafers, seconds)]}


def _stage_firmware(ctx: _Ctx, run: str, configs: list[str], hls: str) -> dict[str, Any]:
    """``make hls`` in-process: convert + write + g++ compile of every config."""
    import hls4ml  # noqa: F401  (imported before the baseline: libraries are not the stage's memory)

    from . import firmware
    from . import model as _  # noqa: F401

    ctx.baseline()
    t0 = time.perf_counter()
    paths = firmware.convert_all(Path(run), [Path(c) for c in configs], Path(hls), log=ctx.log)
    total = time.perf_counter() - t0
    projects = {}
    for p in paths:
        record = json.loads((p / firmware.RECORD).read_text())
        projects[p.name] = {
            "backend": record["backend"],
            "write_s": record["timings"]["write_seconds"],
            "compile_s": record["timings"]["compile_seconds"],
            "path": str(p),
        }
    return {"figures": [], "info": {"convert_all_s": total, "projects": projects}}


def _stage_csim(ctx: _Ctx, project: str, npz: str, wafers: int, reps: int) -> dict[str, Any]:
    from . import data, firmware

    ctx.baseline()
    proj = firmware.open_project(project)
    sim = proj.csim()
    images = firmware.encoder_images(data.load_wafers(npz).charges)
    sim.run(images[:200])
    seconds, _ = _timed(lambda: sim.run(images), reps)
    name, backend = Path(project).name, proj.record["backend"]
    return {
        "figures": [_figure(f"inference.csim.{name}", f"C simulation {name} ({backend})", "wafers/s", wafers, seconds)]
    }


def _stage_verify(ctx: _Ctx, run: str, configs: list[str], hls: str, npz: str, reps: int) -> dict[str, Any]:
    """``make verify`` on the run's test split, the corner cases and the benchmark wafers."""
    from . import data, verify
    from . import model as _  # noqa: F401  (TensorFlow is in the baseline, not in the stage's memory)

    ctx.baseline()
    extra = data.load_wafers(npz)
    lines: list[str] = []
    seconds, ok = _timed(
        lambda: verify.verify_all(Path(run), [Path(c) for c in configs], Path(hls), extra=extra, log=lines.append), reps
    )
    summary = json.loads((Path(hls) / "verify.json").read_text())
    per = summary["configs"]
    wafers = min(c["wafers"] for c in per.values())
    mismatches = sum(e["mismatches"] for c in per.values() for e in c["compared"].values())
    ctx.log(lines[-1] if lines else "verify: no output")
    return {
        "figures": [
            _figure(
                "verify.all",
                f"verify, {len(per)} configs x {wafers:,} wafers",
                "s",
                wafers,
                seconds,
                bit_exact=bool(ok),
                mismatches=mismatches,
                wafers_per_s={name: c["wafers_per_s"] for name, c in per.items()},
            )
        ]
    }


def _stage_emd(ctx: _Ctx, npz: str, reco: str, wafers: int, reps: int) -> dict[str, Any]:
    """``metrics.emd`` as ``evaluate`` calls it (worker processes for large inputs)."""
    import numpy as np

    from . import data, metrics

    ctx.baseline()
    charges = data.load_wafers(npz).charges
    r = np.load(reco)
    metrics.emd(charges[:200], r[:200], processes=1)
    seconds, _ = _timed(lambda: metrics.emd(charges, r), reps)
    workers = metrics.DEFAULT_PROCESSES if wafers >= metrics.PARALLEL_MIN else 1
    return {
        "figures": [
            _figure("evaluation.emd", f"EMD ({workers} process{'es' * (workers > 1)})", "wafers/s", wafers, seconds)
        ]
    }


STAGES: dict[str, Callable[..., dict[str, Any]]] = {
    "setup": _stage_setup,
    "generate": _stage_generate,
    "csv": _stage_csv,
    "train": _stage_train,
    "qkeras": _stage_qkeras,
    "reference": _stage_reference,
    "register": _stage_register,
    "golden": _stage_golden,
    "firmware": _stage_firmware,
    "csim": _stage_csim,
    "verify": _stage_verify,
    "emd": _stage_emd,
}


def _child_main(argv: list[str]) -> int:
    """Run the steps of one job spec, writing results after each (a later crash keeps them)."""
    spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    results: dict[str, Any] = {}
    for step in spec["steps"]:
        failed = [n for n in step["needs"] if n in results and not results[n]["ok"]]
        if failed:
            results[step["id"]] = {"ok": False, "error": f"n/a: needs {failed[0].split('@')[0]} (failed)"}
        else:
            ctx = _Ctx()
            load = os.getloadavg()[0]
            try:
                out = STAGES[step["stage"]](ctx, **step["args"])
                results[step["id"]] = {"ok": True, "baseline_mib": ctx.baseline_mib, "load": load, **out}
            except Exception as exc:  # one failed stage is one row, not the end of the benchmark
                traceback.print_exc()
                results[step["id"]] = {"ok": False, "error": f"failed: {_first_line(exc)}"}
        artifacts.write_json(result_path, results)
    return 0


# ----------------------------------------------------------------------------- jobs (the parent side)


@dataclass
class Step:
    """One stage call in a child: ``needs`` are ids of steps whose output it reads."""

    id: str
    stage: str
    args: dict[str, Any]
    needs: list[str] = field(default_factory=list)


@dataclass
class JobResult:
    peak_mib: float
    wall_s: float
    load: float
    error: str | None = None


def run_child(cmd: list[str], log: Log, cwd: Path = ROOT, forward_all: bool = False) -> JobResult:
    """Run ``cmd`` to the end; its peak RSS (and its waited-for children's) comes from ``os.wait4``.

    Lines the child tags as progress go to ``log`` (all lines with ``forward_all``).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("PYTHONWARNINGS", "ignore")
    load = os.getloadavg()[0]
    tail: deque[str] = deque(maxlen=30)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if line.startswith(CHILD_TAG):
                log("    " + line[len(CHILD_TAG) :])
            elif forward_all:
                log("    " + line)
            if not line.startswith(CHILD_TAG) and line.strip():
                tail.append(line)
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    error = None
    if code != 0:
        last = next((ln.strip() for ln in reversed(tail) if ln.strip()), "")
        error = (f"killed by signal {-code}" if code < 0 else f"exit status {code}") + (f": {last}" if last else "")
    return JobResult(usage.ru_maxrss / 1024, wall, load, error)  # ru_maxrss is in KiB on Linux


class _Runner:
    """Launches child jobs and keeps every step's result; steps that cannot run get their reason."""

    def __init__(self, workdir: Path, log: Log) -> None:
        self.workdir = workdir
        self.log = log
        self.results: dict[str, dict[str, Any]] = {}
        self.jobs = 0

    def run(self, steps: list[Step], title: str) -> None:
        todo: list[Step] = []
        for s in steps:
            why = _missing(s.stage)
            for n in s.needs:
                if why is None and n not in {t.id for t in todo}:  # same-job needs are the child's to check
                    r = self.results.get(n)
                    if r is None or not r["ok"]:
                        why = f"n/a: needs {n.split('@')[0]} ({'failed' if r is not None else 'not run'})"
            if why:
                self.results[s.id] = {"ok": False, "error": why}
            else:
                todo.append(s)
        if not todo:
            return
        self.jobs += 1
        spec = self.workdir / f"job{self.jobs}.json"
        result = self.workdir / f"job{self.jobs}.result.json"
        spec.write_text(json.dumps({"steps": [vars(s) for s in todo]}))
        self.log(f"bench: {title}")
        job = run_child([sys.executable, "-m", "ecqae.bench", str(spec), str(result)], self.log)
        got = json.loads(result.read_text()) if result.is_file() else {}
        for s in todo:
            r = got.get(s.id) or {"ok": False, "error": f"failed: {job.error or 'no result'}"}
            r.update(peak_mib=job.peak_mib, job_wall_s=job.wall_s, job_steps=len(todo), job_load=job.load)
            self.results[s.id] = r
            if not r["ok"]:
                self.log(f"  {s.id}: {r['error']}")


# ----------------------------------------------------------------------------- plan


@dataclass
class _Size:
    """One dataset size and its files in the work directory."""

    n: int
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)


@dataclass
class _Shared:
    """What every size's model stages use: the base run, the HLS projects, the register image."""

    run_step: str
    run: str
    configs: list[str]
    hls: str
    projects: list[str]
    register: str


def _plan(size: _Size, reps: int, shared: _Shared, base: bool) -> dict[str, list[Step]]:
    """A size's steps in groups: data (numpy only), tf (TensorFlow), firmware, free (no TensorFlow), verify.

    Training always trains this size's own run (its speed and memory are the
    figures); every model stage uses the base run, so sizes differ only in wafers.
    """
    n, tag = size.n, f"@{size.n}"
    npz, csv, setup = size.path("wafers.npz"), size.path("wafers.csv"), f"setup{tag}"
    common = {"npz": npz, "wafers": n, "reps": reps}
    groups: dict[str, list[Step]] = {
        "data": [
            Step(setup, "setup", {"wafers": n, "seed": SEED, "npz": npz, "csv": csv}),
            Step(f"generate{tag}", "generate", {"wafers": n, "seed": SEED, "reps": reps}),
            Step(f"csv{tag}", "csv", {"wafers": n, "reps": reps, "npz": npz, "csv": csv}, [setup]),
        ],
        "tf": [
            Step(f"train{tag}", "train", {"wafers": n, "seed": SEED, "reps": reps, "out": size.path("run")}),
            Step(f"qkeras{tag}", "qkeras", {"run": shared.run, **common}, [shared.run_step, setup]),
            Step(
                f"reference{tag}",
                "reference",
                {"run": shared.run, **common, "reco": size.path("reco.npy")},
                [shared.run_step, setup],
            ),
        ],
        "firmware": [],
        "free": [Step(f"golden{tag}", "golden", {"register": shared.register, **common}, ["register", setup])],
        "verify": [
            Step(
                f"verify{tag}",
                "verify",
                {"run": shared.run, "configs": shared.configs, "hls": shared.hls, "npz": npz, "reps": reps},
                ["firmware", setup, shared.run_step],
            )
        ],
    }
    for p in shared.projects:
        groups["free"].append(Step(f"csim{tag}:{Path(p).name}", "csim", {"project": p, **common}, ["firmware", setup]))
    groups["free"].append(Step(f"emd{tag}", "emd", {"reco": size.path("reco.npy"), **common}, [f"reference{tag}"]))
    if base:
        groups["tf"].append(
            Step("register", "register", {"run": shared.run, "path": shared.register}, [shared.run_step])
        )
        fw_args = {"run": shared.run, "configs": shared.configs, "hls": shared.hls}
        groups["firmware"] = [Step("firmware", "firmware", fw_args, [shared.run_step])]
        groups["firmware"] += [Step(f"firmware#{i}", "firmware", fw_args, ["firmware"]) for i in range(2, reps + 1)]
    return groups


def _execute(runner: _Runner, groups: dict[str, list[Step]], smoke: bool, n: int) -> list[Step]:
    """Full mode: one child per step. Smoke: data, TensorFlow (+ firmware, verify) and the rest: three children."""
    if smoke:
        jobs = [
            ("data stages", groups["data"]),
            ("TensorFlow stages, make hls, verify", groups["tf"] + groups["firmware"][:1] + groups["verify"]),
            ("golden model, C simulation, EMD", groups["free"]),
        ]
        for title, steps in jobs:
            runner.run(steps, f"{title} ({n:,} wafers, one child)")
        return [s for _, steps in jobs for s in steps]
    order = groups["data"] + groups["tf"] + groups["firmware"] + groups["free"] + groups["verify"]
    for s in order:
        what = s.stage if s.stage != "firmware" else f"make hls ({s.id})"
        runner.run([s], f"{what}, {n:,} wafers")
    return order


# ----------------------------------------------------------------------------- rows and targets

# The figure each stage yields (key, label, unit), for its 'n/a' or 'failed' row.
EXPECTED = {
    "generate": ("data.generate", "generate (embedded)", "wafers/s"),
    "csv": ("data.csv", "load CSV", "wafers/s"),
    "train": ("train.epoch", "train epoch", "wafers/s"),
    "qkeras": ("inference.qkeras", "QKeras encoder (predict)", "wafers/s"),
    "golden": ("inference.golden", "golden integer model", "wafers/s"),
    "csim": ("inference.csim", "C simulation", "wafers/s"),
    "verify": ("verify.all", "verify, all configs", "s"),
    "reference": ("evaluation.reconstruct", "AE reconstruction", "wafers/s"),
    "emd": ("evaluation.emd", "EMD", "wafers/s"),
}


def _judge(key: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """The target beside a row, with pass/short, or None when the row has no target."""
    base = "inference.csim" if key.startswith("inference.csim.") else key
    t = TARGETS.get(base)
    if t is None or row.get("median") is None:
        return None
    out: dict[str, Any] = {"target": t["text"], "value": row["median"]}
    if "min" in t:
        out["status"] = "pass" if row["median"] >= t["min"] else "short"
    elif base == "verify.all":
        out["value"] = round(row["median"] / row["wafers"] * t["at"], 2)
        projected = row["wafers"] < t["at"]
        out["note"] = f"{'projected from' if projected else 'scaled from'} {row['wafers']:,} wafers"
        exact = row["info"].get("bit_exact", False)
        out["status"] = ("pass" if exact and out["value"] < t["max_s"] else "short") + (" (projected)" * projected)
        if not exact:
            out["note"] += f"; NOT bit-exact ({row['info'].get('mismatches')} mismatched latents)"
    else:
        out["status"] = "pass" if row["median"] < t["max_s"] else "short"
    return out


def _row(
    key: str,
    label: str,
    unit: str,
    wafers: int | None,
    values: list[float],
    seconds: list[float],
    result: dict[str, Any],
    info: dict[str, Any],
) -> dict[str, Any]:
    shared = result.get("job_steps", 1) > 1
    row = {
        "key": key,
        "stage": key.split(".")[0],
        "label": label,
        "unit": unit,
        "wafers": wafers,
        "reps": len(values),
        **{k: round(v, 3) for k, v in _stats(values).items()},
        "seconds": [round(s, 6) for s in seconds],
        "peak_mib": round(result["peak_mib"], 1),
        "baseline_mib": round(result["baseline_mib"], 1) if result.get("baseline_mib") else None,
        "memory": f"peak of a child shared by {result['job_steps']} stages" if shared else "own child",
        "load": round(result.get("load", result.get("job_load", 0.0)), 2),
        "status": "ok",
        "info": info,
    }
    row["target"] = _judge(key, row)
    return row


def _na_row(key: str, label: str, unit: str, wafers: int | None, why: str) -> dict[str, Any]:
    return {
        "key": key,
        "stage": key.split(".")[0],
        "label": label,
        "unit": unit,
        "wafers": wafers,
        "median": None,
        "min": None,
        "max": None,
        "status": why,
        "target": None,
        "info": {},
    }


def _rows(runner: _Runner, steps: list[Step], n: int) -> list[dict[str, Any]]:
    """Rows of one size's steps (firmware apart); values from per-repetition seconds."""
    rows: list[dict[str, Any]] = []
    for s in steps:
        r = runner.results.get(s.id)
        if r is None or s.stage == "firmware":
            continue
        if not r["ok"]:
            if s.stage in EXPECTED:
                key, label, unit = EXPECTED[s.stage]
                if s.stage == "csim":
                    name = Path(s.args["project"]).name
                    key, label = f"{key}.{name}", f"{label} {name}"
                rows.append(_na_row(key, label, unit, n, r["error"]))
            else:
                rows.append(_na_row(f"prepare.{s.stage}", f"prepare ({s.stage})", "", n, r["error"]))
            continue
        for fig in r.get("figures", []):
            secs = fig["seconds"]
            values = [fig["wafers"] / x for x in secs] if fig["unit"] == "wafers/s" else list(secs)
            rows.append(_row(fig["key"], fig["label"], fig["unit"], fig["wafers"], values, secs, r, fig["info"]))
    for row in rows:
        row["info"]["dataset"] = n
    return rows


def _firmware_rows(runner: _Runner, steps: list[Step]) -> list[dict[str, Any]]:
    """Per config: hls4ml convert+write and g++ compile seconds; all configs: ``make hls`` wall time."""
    oks = [runner.results[s.id] for s in steps if runner.results.get(s.id, {}).get("ok")]
    if not oks:
        why = next((runner.results[s.id]["error"] for s in steps if s.id in runner.results), "n/a: not run")
        return [_na_row("firmware.make_hls", "make hls (all configs)", "s", None, why)]
    rows = []
    for name, first in oks[0]["info"]["projects"].items():
        for what, label in (("write_s", "convert + write (hls4ml)"), ("compile_s", "compile (g++)")):
            vals = [r["info"]["projects"][name][what] for r in oks]
            key = f"firmware.{name}.{what[:-2]}"
            rows.append(_row(key, f"{name} ({first['backend']}): {label}", "s", None, vals, vals, oks[0], {}))
    if all(r["job_steps"] == 1 for r in oks):  # own interpreter: its wall time is make hls's, imports included
        walls, label = [r["job_wall_s"] for r in oks], "make hls, all configs (fresh interpreter)"
    else:
        walls, label = [r["info"]["convert_all_s"] for r in oks], "make hls, all configs (in-process)"
    rows.append(
        _row("firmware.make_hls", label, "s", None, walls, walls, oks[0], {"configs": list(oks[0]["info"]["projects"])})
    )
    for row in rows:
        row["peak_mib"] = round(max(r["peak_mib"] for r in oks), 1)
    return rows


def _memory_target(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Training peak memory at 1,000,000 wafers: judged only where it was measured, in its own child."""
    t = TARGETS["train.memory"]
    big = [r for r in rows if r["key"] == "train.epoch" and r["status"] == "ok" and r["info"]["dataset"] >= t["at"]]
    if not big:
        return {"target": t["text"], "status": "n/a: not measured (needs --scaling or BENCH_WAFERS=1000000)"}
    r = max(big, key=lambda x: x["info"]["dataset"])
    status = "pass" if r["peak_mib"] < t["max_mib"] else "short"
    if r["memory"] != "own child":
        status = "n/a: measured in a shared child"
    return {
        "target": t["text"],
        "value": r["peak_mib"],
        "unit": "MiB",
        "status": status,
        "note": f"training on {r['info']['dataset']:,} generated wafers",
    }


def _targets(rows: list[dict[str, Any]], all_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target once: its figure, value and pass/short (or why it was not measured).

    Speeds are judged at the benchmark's size; the two targets stated for
    1,000,000 wafers use a measurement at that size when scaling made one.
    """
    out = []
    for key, t in TARGETS.items():
        if key == "train.memory":
            out.append({"key": key, **_memory_target(all_rows)})
            continue
        matching = [r for r in rows if r["key"] == key or (key == "inference.csim" and r["key"].startswith(key + "."))]
        at = t.get("at", 0)
        measured = [r for r in all_rows if r["key"] == key and r["status"] == "ok" and (r["wafers"] or 0) >= at > 0]
        if measured:
            matching = [min(measured, key=lambda r: r["wafers"])]
        if not matching:
            out.append({"key": key, "target": t["text"], "status": "n/a: not measured"})
        for r in matching:
            judged = r["target"] or {"target": t["text"], "status": r["status"]}
            out.append({"key": r["key"], "label": r["label"], **judged})
    return out


def _scaling_summary(rows: list[dict[str, Any]], sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per figure: seconds per repetition and memory at each size, and how they grow from size to size."""
    out = []
    for key in dict.fromkeys(r["key"] for r in rows if r["status"] == "ok"):
        by_n = {r["info"]["dataset"]: r for r in rows if r["key"] == key and r["status"] == "ok"}
        pts = []
        for n in sizes:
            r = by_n.get(n)
            if r is not None:
                own = (
                    r["memory"] == "own child" and r["baseline_mib"] is not None
                )  # a shared child's peak is not this stage's
                above = round(r["peak_mib"] - r["baseline_mib"], 1) if own else None
                pts.append(
                    {
                        "wafers": n,
                        "seconds": statistics.median(r["seconds"]),
                        "peak_mib": r["peak_mib"],
                        "above_baseline_mib": above,
                    }
                )
        growth = []
        for a, b in zip(pts, pts[1:], strict=False):
            g = {"wafers_x": round(b["wafers"] / a["wafers"], 2), "time_x": round(b["seconds"] / a["seconds"], 2)}
            if a["above_baseline_mib"] and b["above_baseline_mib"] is not None and a["above_baseline_mib"] > 0:
                g["memory_x"] = round(b["above_baseline_mib"] / a["above_baseline_mib"], 2)
            growth.append(g)
        per_wafer = None
        if pts and pts[-1]["above_baseline_mib"] is not None:
            per_wafer = round(pts[-1]["above_baseline_mib"] * MIB / pts[-1]["wafers"])
        out.append({"key": key, "points": pts, "growth": growth, "bytes_per_wafer_above_baseline": per_wafer})
    return out


# ----------------------------------------------------------------------------- the benchmark


def _project_names(configs: list[Path]) -> list[str]:
    """hls/<name> of each config (its 'name', else the file's stem), read without hls4ml."""
    from .config import read_yaml

    names = []
    for c in configs:
        name = read_yaml(c).get("name")
        names.append(str(name) if name else c.stem)
    return names


def run(
    n_wafers: int = 100_000,
    out: str | Path = "bench.json",
    scaling: bool = False,
    smoke: bool = False,
    chain: bool = False,
    reps: int | None = None,
    configs: list[Path] | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Measure every stage on ``n_wafers`` generated wafers; print the table and write ``out`` (JSON).

    ``smoke``: the quick CI version (at most 1,000 wafers, 2 repetitions, three
    children). ``scaling``: also 10^4, 10^5 and 10^6 wafers (smoke: 500, 1,000,
    2,000) to show how time and memory grow. ``chain``: also the wall time of
    ``make`` on the embedded default (long). Returns the report; ``report['ok']``
    is False when a stage failed (a target falling short is not a failure).
    """
    if n_wafers < 100:
        raise EcqaeError(f"--wafers must be at least 100, got {n_wafers}")
    reps = reps if reps is not None else (SMOKE_REPS if smoke else DEFAULT_REPS)
    if reps < 1:
        raise EcqaeError(f"--reps must be >= 1, got {reps}")
    if smoke:
        n_wafers = min(n_wafers, SMOKE_WAFERS)
    configs = [Path(c) for c in (configs if configs is not None else sorted(FIRMWARE_CONFIGS.glob("*.yaml")))]
    for c in configs:
        if not c.is_file():
            raise EcqaeError(f"{c}: firmware config not found")
    out = Path(out)
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            "wafers": n_wafers,
            "seed": SEED,
            "reps": reps,
            "smoke": smoke,
            "scaling": scaling,
            "chain": chain,
            "configs": [str(c) for c in configs],
        },
        "machine": machine(),
        "load_average": {"start": [round(x, 2) for x in os.getloadavg()]},
    }
    m = report["machine"]
    log(
        f"bench: {n_wafers:,} wafers (seed {SEED}), {reps} repetitions, {m['usable_cores']} cores "
        f"({m['cpu_model']}), load {report['load_average']['start'][0]:.2f}" + (", smoke" if smoke else "")
    )
    workdir = Path(tempfile.mkdtemp(prefix="ecqae-bench-"))
    try:
        runner = _Runner(workdir, log)
        base = _Size(n_wafers, workdir / f"n{n_wafers}")
        hls = workdir / "hls"
        shared = _Shared(
            run_step=f"train@{n_wafers}",
            run=base.path("run"),
            configs=[str(c.resolve()) for c in configs],
            hls=str(hls),
            projects=[str(hls / name) for name in _project_names(configs)],
            register=str(workdir / "encoder_registers.hex"),
        )
        base.dir.mkdir()
        groups = _plan(base, reps, shared, base=True)
        steps = _execute(runner, groups, smoke, n_wafers)
        report["rows"] = _rows(runner, steps, n_wafers) + _firmware_rows(runner, groups["firmware"])
        all_rows = list(report["rows"])

        if scaling:
            sizes = SMOKE_SCALING_SIZES if smoke else SCALING_SIZES
            scale_rows = [r for r in report["rows"] if r["info"].get("dataset") == n_wafers and n_wafers in sizes]
            for n in sizes:
                if n == n_wafers:
                    continue
                size = _Size(n, workdir / f"n{n}")
                size.dir.mkdir()
                s_steps = _execute(runner, _plan(size, reps, shared, base=False), smoke, n)
                scale_rows += _rows(runner, s_steps, n)
                shutil.rmtree(size.dir, ignore_errors=True)  # a million wafers' CSV and runs: free the disk early
            scale_rows.sort(key=lambda r: (r["key"], r["info"]["dataset"]))
            all_rows += [r for r in scale_rows if r["info"]["dataset"] != n_wafers]
            report["scaling"] = {
                "sizes": list(sizes),
                "rows": scale_rows,
                "summary": _scaling_summary(scale_rows, sizes),
            }

        if chain:
            report["chain"] = _chain(workdir, log)

        report["targets"] = _targets(report["rows"], all_rows)
        failed = [r for r in all_rows if str(r["status"]).startswith("failed")]
        if chain and report["chain"]["status"] != "ok":
            failed.append({"key": "chain"})
        report["failed"] = sorted({r["key"] for r in failed})
        report["ok"] = not report["failed"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    artifacts.write_json(out, report)
    log(format_report(report))
    log(f"bench: wrote {out} ({report['seconds']:.0f} s)")
    return report


def _chain(workdir: Path, log: Log) -> dict[str, Any]:
    """Wall time of ``make`` (train, ablation, hls, verify, evaluate) on the embedded default."""
    chain = workdir / "chain"
    cmd = [
        "make",
        "-C",
        str(ROOT),
        "all",
        f"RUN={chain / 'run'}",
        f"HLS_OUT={chain / 'hls'}",
        f"EVAL_OUT={chain / 'evaluation'}",
    ]
    log(f"bench: whole chain: {' '.join(cmd)}")
    job = run_child(cmd, log, forward_all=True)
    res = {
        "command": " ".join(cmd),
        "wall_s": round(job.wall_s, 1),
        "peak_mib": round(job.peak_mib, 1),
        "load": round(job.load, 2),
        "status": "ok" if job.error is None else f"failed: {job.error}",
    }
    log(f"bench: make: {res['wall_s']:,.0f} s, {res['status']}")
    return res


# ----------------------------------------------------------------------------- printing


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return ""
    if unit == "wafers/s":
        return f"{v:,.0f}"
    return f"{v:.3g}" if v < 10 else f"{v:,.1f}"


def format_report(report: dict[str, Any]) -> str:
    """The table printed at the end of ``make bench`` (figures, targets, scaling)."""
    m = report["machine"]
    lines = [
        "",
        f"machine: {m['usable_cores']} of {m['cores']} cores, {m['cpu_model']}, {m.get('memory_gib', '?')} GiB; "
        f"Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if k in ("tensorflow", "qkeras", "hls4ml", "numpy")),
        f"load average: start {report['load_average']['start'][0]:.2f}"
        + (f", end {report['load_average']['end'][0]:.2f}" if "end" in report["load_average"] else ""),
        "",
        f"{'stage':10s} {'figure':52s} {'wafers':>9s} {'median':>10s} {'min':>10s} {'max':>10s} {'unit':8s} "
        f"{'peak MiB':>8s}  {'target':32s} status",
    ]
    for r in report["rows"]:
        t = r.get("target")
        target = t["target"] if t else ""
        status = (t["status"] + (f" ({_fmt(t['value'], 's')} s)" if r["key"] == "verify.all" else "")) if t else ""
        if r["status"] != "ok":
            status = r["status"]
        wafers = f"{r['wafers']:,}" if r.get("wafers") else ""
        peak = f"{r['peak_mib']:,.0f}" if r.get("peak_mib") else ""
        lines.append(
            f"{r['stage']:10s} {r['label'][:52]:52s} {wafers:>9s} {_fmt(r['median'], r['unit']):>10s} "
            f"{_fmt(r['min'], r['unit']):>10s} {_fmt(r['max'], r['unit']):>10s} {r['unit']:8s} {peak:>8s}  "
            f"{target:32s} {status}"
        )
    if "chain" in report:
        c = report["chain"]
        lines.append(
            f"{'chain':10s} {'make (embedded default)':52s} {'':>9s} {c['wall_s']:>10,.1f} {'':>10s} {'':>10s} "
            f"{'s':8s} {c['peak_mib']:>8,.0f}  {'':32s} {c['status']}"
        )
    lines += ["", "targets:"]
    for t in report["targets"]:
        value = ""
        if t.get("value") is not None:
            unit = t.get("unit") or ("s" if t["key"] in ("verify.all", "firmware.make_hls") else "wafers/s")
            value = f"{_fmt(t['value'], unit)} {unit}"
        name = t.get("label", t["key"])
        lines.append(
            f"  {name[:48]:48s} {t['target']:34s} {value:>20s}  {t['status']}"
            + (f"  [{t['note']}]" if t.get("note") else "")
        )
    sc = report.get("scaling")
    if sc:
        lines += [
            "",
            "scaling: median s per repetition / peak MiB; growth size to size: time x / memory x (above baseline)",
        ]
        head = (
            "  "
            + f"{'figure':40s}"
            + "".join(f"{n:>22,}" for n in sc["sizes"])
            + "   growth (time x, memory x)   bytes/wafer"
        )
        lines.append(head)
        for s in sc["summary"]:
            cells = {p["wafers"]: f"{p['seconds']:.3g} s / {p['peak_mib']:,.0f}" for p in s["points"]}
            growth = ", ".join(
                f"{g['time_x']:.1f}x/" + (f"{g['memory_x']:.1f}x" if "memory_x" in g else "-") for g in s["growth"]
            )
            bpw = s["bytes_per_wafer_above_baseline"]
            lines.append(
                "  "
                + f"{s['key'][:40]:40s}"
                + "".join(f"{cells.get(n, '-'):>22s}" for n in sc["sizes"])
                + f"   {growth:27s} {'' if bpw is None else f'{bpw:,}'}"
            )
    if report.get("failed"):
        lines += ["", f"FAILED: {', '.join(report['failed'])}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
