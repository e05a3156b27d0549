"""The CUDA check of a lent GPU machine: one command, one table, within a time budget.

    make gpu-check PYTHON=python3 [GPU_CHECK_OUT=DIR]    # = python3 benchmarks/gpu_check.py
    make gpu-wheels                                      # here: fill .whl/ for that machine

Through the device tool, in one run (after `make gpu-wheels` here):

    run(command="make gpu-check PYTHON=python3 GPU_CHECK_OUT=$OUT", carry=[".whl"],
        timeout_s=600)

It runs the given Python as it is (no venv, no pinned torch): it installs the wheels of --wheels
whose distribution that Python lacks into WORK/site, builds the native ops in place against its
torch, then runs, each step with its own timeout and all within --budget (450 s, so that the
whole check fits in 8 minutes of one H100; a step the budget no longer covers is "skipped
(budget)"):

  build ops              setup.py build_ext --inplace, FORCE_CUDA=1, for this GPU's architecture
  demo data              launch/make_shapes.py and launch/build_shards.py, a small shapes set
  ops tests (CUDA)       pytest tests/ops -m cuda
  ops bench (CUDA)       benchmarks/ops.py --device cuda: ours against torchvision's CUDA ops
  train fp32/bf16/fp16   configs/shapes_r18_cpu.yaml for 100 steps on one GPU (train.amp), at
                         the config's global batch of 8 and its schedule scaled to 100 steps
  eval fp32              launch/evaluate.py on the fp32 run
  with 2 or more GPUs:   train DDP (2 processes, NCCL) and train DeepSpeed ZeRO-2, 20 steps
                         each, and eval 2 processes (of the DDP run)

Tracking is off (tracking.enabled=false), so MLflow is never imported. DeepSpeed rows are
skipped, with the reason, when deepspeed cannot be imported. The table (step, result, seconds,
images/s, detail) ends the output and is written to OUT/gpu-check.md, with OUT/gpu-check.json
and every step's log in OUT/gpu-check.log.

Exit codes: 0 every step that ran passed, 1 a step failed, 2 no CUDA device (one line says so).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = "configs/shapes_r18_cpu.yaml"

# What the lent machine's Python 3.12 lacks, at versions pyproject.toml allows. pydantic is
# DeepSpeed's; 2.11 asks only typing-extensions>=4.12 of that machine (later ones want newer).
WHEELS = (
    "webdataset==1.0.2",
    "braceexpand==0.1.7",
    "pycocotools==2.0.11",
    "deepspeed==0.19.8",
    "hjson==3.1.0",
    "pydantic==2.11.7",
    "pydantic-core==2.33.2",
    "annotated-types==0.7.0",
    "typing-inspection==0.4.1",
)
# Published as an sdist only: built here into a pure-Python wheel (its ops compile at run time).
BUILT_HERE = ("deepspeed",)
PLATFORM = ["--python-version", "3.12", "--implementation", "cp"] + [
    arg
    for tag in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1")
    for arg in ("--platform", f"{tag}_x86_64")
]
WHEELS_LIMIT_MIB = 48  # the device tool carries at most 64 MiB, the working tree included


@dataclass
class Settings:
    train_images: int = 400
    val_images: int = 200
    steps: int = 100
    dist_steps: int = 20
    workers: int = 4
    arch: str = ""  # TORCH_CUDA_ARCH_LIST of the build; "" keeps setup.py's default


@dataclass
class Step:
    name: str
    commands: list[list[str]]
    timeout: float
    min_s: float = 20.0  # not started with less budget left than this
    parse: str = ""  # "train", "eval", "pytest", "bench": how to read its output
    env: dict[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # steps that must have passed
    requires: tuple[str, ...] = ()  # modules it imports beyond torch's
    metrics: str = ""  # an evaluation's metrics.json


@dataclass
class Result:
    name: str
    status: str  # passed, failed, timed out, skipped
    seconds: float = 0.0
    images_per_s: float | None = None
    detail: str = ""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_distribution(filename: str) -> tuple[str, str]:
    """('pydantic-core', '2.33.2') of 'pydantic_core-2.33.2-cp312-...whl'."""
    name, version = Path(filename).name.split("-")[:2]
    return normalize(name), version


def is_installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def wheels_to_install(wheel_dir: Path, installed=is_installed) -> list[Path]:
    """The wheels of wheel_dir whose distribution this Python lacks: the machine's own packages
    (numpy, typing-extensions, ...) are left as they are."""
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    return [w for w in wheels if not installed(wheel_distribution(w.name)[0])]


def install_step(python: str, wheels: list[Path], site: Path) -> Step:
    command = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
    return Step("wheels", [command], timeout=120, min_s=5)


def download_wheels(dest: Path, python: str = sys.executable) -> int:
    """Fetch WHEELS for the lent machine into dest (stale versions removed); print the sizes."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {normalize(r.split("==")[0]): r.split("==")[1] for r in WHEELS}
    for old in dest.glob("*.whl"):  # two versions of one package would stop the install
        name, version = wheel_distribution(old.name)
        if wanted.get(name) != version:
            old.unlink()
    failed = []
    for requirement in WHEELS:
        name, version = requirement.split("==")
        if any(wheel_distribution(w.name) == (normalize(name), version) for w in dest.glob("*")):
            continue
        pip = [python, "-m", "pip"]
        if name in BUILT_HERE:
            command = [*pip, "wheel", "-q", "--no-deps", "-w", str(dest), requirement]
        else:
            command = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", *PLATFORM]
            command += ["-d", str(dest), requirement]
        if subprocess.run(command, check=False).returncode != 0:
            failed.append(requirement)
    total = 0
    for wheel in sorted(dest.glob("*.whl")):
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:8.2f} MiB  in {dest}")
    if total > WHEELS_LIMIT_MIB * 2**20:
        print(f"gpu-wheels: over {WHEELS_LIMIT_MIB} MiB: the working tree may not travel")
        return 1
    if failed:
        print(f"gpu-wheels: not fetched: {', '.join(failed)}", file=sys.stderr)
    # Without deepspeed only its rows are skipped; without the others nothing of the demo runs.
    return 1 if any(r.split("==")[0] not in BUILT_HERE for r in failed) else 0


class Schedule(NamedTuple):
    """The demo config's train schedule, meant for `batch` images a step (reference_batch_size)."""

    max_steps: int
    warmup: int
    lr_steps: list[int]
    batch: int


def scaled_schedule(steps: int, processes: int, schedule: Schedule) -> list[str]:
    """The config's schedule shrunk from max_steps to steps, so every phase still happens, on
    the config's global batch: the pipeline would otherwise rescale the steps to the batch."""
    scale = steps / schedule.max_steps
    cuts = [min(steps, max(1, round(s * scale))) for s in schedule.lr_steps]
    return [
        f"train.max_steps={steps}",
        f"train.batch_size={max(1, schedule.batch // processes)}",
        f"train.warmup_iters={max(1, round(schedule.warmup * scale))}",
        f"train.lr_steps=[{','.join(map(str, cuts))}]",
        f"train.log_every={max(1, steps // 10)}",
        f"train.checkpoint_every={steps}",
    ]


def build_plan(
    python: str, gpus: int, work: Path, settings: Settings, schedule: Schedule
) -> list[Step]:
    """The steps, in order, for a machine with `gpus` CUDA devices."""
    data, runs, workers = work / "data", work / "runs", str(settings.workers)
    config = ["--config", DEMO_CONFIG]
    data_keys = [f"data.train_shards={data}/shards/train", f"data.val_shards={data}/shards/val"]
    data_keys += [f"data.num_workers={workers}", "tracking.enabled=false"]
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    demo = {"needs": ("build ops", "demo data"), "requires": ("webdataset", "pycocotools")}

    def shards(split: str) -> list[str]:
        command = [python, "launch/build_shards.py", "--out", f"{data}/shards/{split}"]
        command += ["--annotations", f"{data}/annotations/instances_{split}.json"]
        command += ["--images", f"{data}/images/{split}", "--shard-size", "100"]
        return [*command, "--workers", workers, "--no-progress", "--no-tracking"]

    def train(name: str, launcher: list[str], steps: int, keys: list[str], **extra) -> Step:
        keys = [f"train.output_dir={runs}/{name}", "train.resume=never", *keys, *data_keys]
        processes = 2 if launcher == torchrun else 1
        command = [*launcher, "launch/train.py", *config]
        command += scaled_schedule(steps, processes, schedule)
        return Step(f"train {name}", [command + keys], 150, 30, "train", **{**demo, **extra})

    def evaluate(name: str, launcher: list[str], run: str) -> Step:
        out = f"{runs}/eval-{name}"
        command = [*launcher, "launch/evaluate.py", *config, "--checkpoint", f"{runs}/{run}"]
        needs, metrics = (*demo["needs"], f"train {run}"), f"{out}/metrics.json"
        step = Step(f"eval {name}", [[*command, "--out", out, *data_keys]], 120, 20, "eval")
        step.needs, step.requires, step.metrics = needs, demo["requires"], metrics
        return step

    build_env = {"FORCE_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4)}
    if settings.arch:  # this GPU's only: half the compile time of setup.py's two
        build_env["TORCH_CUDA_ARCH_LIST"] = settings.arch
    build = [python, "setup.py", "-q", "build_ext", "--inplace"]
    loaded = "import ops, sys; sys.exit(0 if ops.HAS_CUDA_KERNELS else 'CUDA kernels not loaded')"
    shapes = [python, "launch/make_shapes.py", "--out", str(data), "--seed", "0"]
    shapes += ["--train", str(settings.train_images), "--val", str(settings.val_images)]
    pytest = [python, "-m", "pytest", "tests/ops", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    bench = [python, "benchmarks/ops.py", "--device", "cuda"]
    pycocotools = ("pycocotools",)  # the shapes' masks; the shards are plain tar files
    plan = [
        Step("build ops", [build, [python, "-c", loaded]], 300, 60, env=build_env),
        Step("demo data", [shapes, shards("train"), shards("val")], 90, 10, requires=pycocotools),
        Step("ops tests (CUDA)", [pytest], 150, 20, "pytest", needs=("build ops",)),
        Step("ops bench (CUDA)", [bench], 120, 20, "bench", needs=("build ops",)),
        # Quoted: YAML reads a bare off as False, which train.amp refuses.
        train("fp32", [python], settings.steps, ["train.amp='off'"]),
        evaluate("fp32", [python], "fp32"),
        train("bf16", [python], settings.steps, ["train.amp=bf16"]),
        train("fp16", [python], settings.steps, ["train.amp=fp16"]),
    ]
    if gpus >= 2:
        zero2 = ["distributed.strategy=deepspeed", "distributed.zero_stage=2"]
        # DS_ACCELERATOR: DeepSpeed's wheel was built here, on a machine without CUDA.
        deepspeed = {
            "env": {"DS_ACCELERATOR": "cuda"},
            "requires": (*demo["requires"], "deepspeed"),
        }
        plan += [
            train("DDP", torchrun, settings.dist_steps, ["distributed.strategy=ddp"]),
            train("DeepSpeed", torchrun, settings.dist_steps, zero2, **deepspeed),
            evaluate("2 processes", torchrun, "DDP"),
        ]
    return plan


def parse_images_per_s(kind: str, text: str) -> float | None:
    """Training: the median of its progress lines' images/s, less the first (warm-up) when
    there are more; evaluation: the summary's images/s."""
    if kind == "train":
        values = [float(v) for v in re.findall(r"images/s=([0-9.]+)", text)]
        values = values[1:] if len(values) > 1 else values
        return statistics.median(values) if values else None
    if kind == "eval":
        values = re.findall(r"([0-9]+(?:\.[0-9]+)?) images/s", text)
        return float(values[-1]) if values else None
    return None


def describe(step: Step, text: str) -> str:
    """One short phrase of what the step's output says."""
    if step.parse == "train":
        last = re.findall(r"step (\d+/\d+) loss=(\S+)", text)
        return f"step {last[-1][0]} loss {last[-1][1]}" if last else ""
    if step.parse == "pytest":
        lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed)", line)]
        return lines[-1].strip(" =") if lines else ""
    if step.parse == "bench":
        rows = re.findall(r"([0-9.]+)x\s+(same|DIFFERS)", text)
        if not rows:
            return ""
        ratios = [float(r) for r, _ in rows]
        differ = sum(v == "DIFFERS" for _, v in rows)
        return f"{len(rows)} ops, ours {min(ratios):.2f}x-{max(ratios):.2f}x, {differ} differ"
    if step.parse == "eval" and step.metrics and Path(step.metrics).is_file():
        metrics = json.loads(Path(step.metrics).read_text())
        aps = [f"{t} AP {metrics[f'{t}/AP']:.3f}" for t in ("bbox", "segm") if f"{t}/AP" in metrics]
        return ", ".join(aps)
    return ""


def child_env(site: Path | None) -> dict[str, str]:
    """The children's environment: the repository and the carried wheels importable first."""
    paths = [str(REPO), *([str(site)] if site else []), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "PYTHONUNBUFFERED": "1",  # a killed step's log still holds what it printed
        "MPLBACKEND": "Agg",
    }


def run_step(step: Step, timeout: float, env: dict[str, str], log: Path) -> Result:
    """Run the step's commands in order in their own process group, output into log."""
    start = time.monotonic()
    status = "passed"
    with open(log, "w") as out:
        for command in step.commands:
            out.write(f"$ {shlex.join(command)}\n")
            out.flush()
            process = subprocess.Popen(
                command,
                cwd=REPO,
                env={**env, **step.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so a timeout ends torchrun's workers and loaders too
            )
            try:
                code = process.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                stop(process)
                status = "timed out"
                break
            if code != 0:
                status = f"failed (exit {code})"
                break
    seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    images = parse_images_per_s(step.parse, text) if status == "passed" else None
    if status == "timed out":
        detail = f"stopped after {timeout:.0f} s"
    else:
        detail = describe(step, text) if status == "passed" else last_error(text)
    return Result(step.name, status, seconds, images, detail)


def stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def last_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("$ ")]  # the commands run
    errors = [line for line in lines if re.search(r"Error|error:|FAILED", line)]
    return (errors or lines or [""])[-1][:160]


def run_plan(
    plan: list[Step], deadline: float, env: dict[str, str], log_dir: Path, missing: dict
) -> list[Result]:
    log_dir.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    passed: set[str] = set()
    for step in plan:
        log = None
        absent = [f"{m}: {missing[m]}" for m in step.requires if m in missing]
        failed = [need for need in step.needs if need not in passed]
        left = deadline - time.monotonic()
        if absent:
            result = Result(step.name, "skipped", detail=f"cannot import {absent[0]}")
        elif failed:
            result = Result(step.name, "skipped", detail=f"needs {failed[0]}")
        elif left < step.min_s:
            result = Result(step.name, "skipped (budget)", detail=f"{max(0, left):.0f} s left")
        else:
            # Numbered on from the logs already there, so that they sort in the order run.
            slug = re.sub(r"[^a-z0-9]+", "-", step.name.lower()).strip("-")
            log = log_dir / f"{len(list(log_dir.glob('*.log'))):02d}-{slug}.log"
            result = run_step(step, min(step.timeout, left), env, log)
        if result.status == "passed":
            passed.add(step.name)
        report(result, log)
        results.append(result)
    return results


def report(result: Result, log: Path | None) -> None:
    images = f", {result.images_per_s:.1f} images/s" if result.images_per_s else ""
    detail = f" ({result.detail})" if result.detail else ""
    print(f"gpu-check: {result.name}: {result.status} {result.seconds:.1f} s{images}{detail}")
    if log is not None and result.status.startswith(("failed", "timed out")):
        for line in log.read_text(errors="replace").splitlines()[-15:]:  # the device tool's tail
            print(f"    {line}")
    sys.stdout.flush()


def format_table(results: list[Result]) -> str:
    lines = ["| step | result | seconds | images/s | detail |", "|---|---|--:|--:|---|"]
    for r in results:
        images = f"{r.images_per_s:.1f}" if r.images_per_s else ""
        seconds = f"{r.seconds:.1f}" if r.seconds else ""
        detail = r.detail.replace("|", "/")
        lines.append(f"| {r.name} | {r.status} | {seconds} | {images} | {detail} |")
    return "\n".join(lines)


def cuda_devices() -> tuple[list[str], str, str]:
    """(names of the visible CUDA devices, their TORCH_CUDA_ARCH_LIST, torch's version)."""
    try:
        import torch
    except ImportError:
        return [], "", "no torch"
    if not torch.cuda.is_available():
        return [], "", torch.__version__
    count = torch.cuda.device_count()
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(count)})
    return names, ";".join(f"{major}.{minor}" for major, minor in caps), torch.__version__


def probe_modules(python: str, env: dict[str, str], modules: list[str]) -> dict[str, str]:
    """{module: why it cannot be imported} in the children's environment."""
    code = (
        "import importlib, json, sys\nwhy = {}\nfor name in sys.argv[1:]:\n    try:\n"
        "        importlib.import_module(name)\n    except Exception as error:\n"
        "        why[name] = f'{type(error).__name__}: {error}'.splitlines()[0][:120]\n"
        "print(json.dumps(why))"
    )
    try:
        done = subprocess.run(
            [python, "-c", code, *modules],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return {m: "the import probe failed" for m in modules}


def demo_schedule() -> Schedule:
    sys.path.insert(0, str(REPO))
    from pipeline.config import load_config

    train = load_config(REPO / DEMO_CONFIG).train
    return Schedule(train.max_steps, train.warmup_iters, train.lr_steps, train.reference_batch_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/gpu-check", help="where the table goes")
    parser.add_argument("--work", default="/tmp/gpu-check", help="data, runs, logs, site/")
    parser.add_argument("--wheels", default=".whl", help="wheels to install when missing")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all steps")
    parser.add_argument("--steps", type=int, default=100, help="steps of the 1-GPU runs")
    parser.add_argument("--dist-steps", type=int, default=20, help="steps of the 2-GPU runs")
    parser.add_argument("--download-wheels", metavar="DIR", help="fetch the wheels and exit")
    args = parser.parse_args(argv)
    if args.download_wheels:
        return download_wheels(Path(args.download_wheels))
    deadline = time.monotonic() + args.budget
    names, arch, torch_version = cuda_devices()
    if not names:
        print(
            f"gpu-check: no CUDA device visible to {sys.executable} (torch {torch_version}); "
            "nothing checked (run it on a GPU machine, see --help)"
        )
        return 2
    python, work, out = sys.executable, Path(args.work).resolve(), Path(args.out).resolve()
    for sub in ("data", "runs", "logs"):  # a rerun on a warm machine starts afresh
        shutil.rmtree(work / sub, ignore_errors=True)
    results, site = [], None
    wheels = wheels_to_install(REPO / args.wheels)
    if wheels:
        site = work / "site"
        step = install_step(python, wheels, site)
        results = run_plan([step], deadline, child_env(None), work / "logs", {})
    env = child_env(site)
    modules = ["webdataset", "pycocotools"] + (["deepspeed"] if len(names) >= 2 else [])
    missing = probe_modules(python, {**env, "DS_ACCELERATOR": "cuda"}, modules)
    for module, why in missing.items():
        if why.startswith("ModuleNotFoundError"):
            missing[module] = f"{why} (make gpu-wheels here, carry .whl)"
    settings = Settings(
        steps=args.steps,
        dist_steps=args.dist_steps,
        arch=os.environ.get("TORCH_CUDA_ARCH_LIST", arch),
    )
    plan = build_plan(python, len(names), work, settings, demo_schedule())
    results += run_plan(plan, deadline, env, work / "logs", missing)
    used = args.budget - max(0.0, deadline - time.monotonic())
    machine = f"{len(names)} x {names[0]}, torch {torch_version}, Python {sys.version.split()[0]}"
    table = write_report(
        out, work / "logs", results, f"{machine}; {used:.0f} s of {args.budget:.0f} s"
    )
    print(f"\n{table}\nwritten to {out}/gpu-check.md (and .json, .log)")
    return 1 if any(r.status.startswith(("failed", "timed out")) for r in results) else 0


def write_report(out: Path, log_dir: Path, results: list[Result], machine: str) -> str:
    """OUT/gpu-check.md (the table), .json (the results), .log (every step's log); the table."""
    failed = sum(r.status.startswith(("failed", "timed out")) for r in results)
    passed = sum(r.status == "passed" for r in results)
    counts = f"{passed} passed, {failed} failed, {len(results) - passed - failed} skipped"
    table = f"gpu-check: {machine}; {counts}\n\n{format_table(results)}\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.md").write_text(table)
    info = {"machine": machine, "results": [asdict(r) for r in results]}
    (out / "gpu-check.json").write_text(json.dumps(info, indent=2) + "\n")
    with open(out / "gpu-check.log", "w") as log:
        for path in sorted(log_dir.glob("*.log")):
            log.write(f"===== {path.name}\n{path.read_text(errors='replace')}\n")
    return table


if __name__ == "__main__":
    sys.exit(main())
