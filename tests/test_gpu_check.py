"""benchmarks/gpu_check.py without a GPU: everything but the CUDA work, so that the check is ready
when a GPU machine is lent. The plan for 1, 2 and 8 GPUs, its config overrides against the schema,
the runner (budget, timeouts, failures, skips), the table, the wheel logic, the exit 2 without CUDA,
and the demo steps of the plan run on the CPU with MLflow and DeepSpeed unimportable."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up
_spec.loader.exec_module(gc)

SCHEDULE = gc.Schedule(1200, 50, [975, 1125], 8)  # configs/shapes_r18_cpu.yaml's
ONE_GPU = ["build ops", "demo data", "ops tests (CUDA)", "ops bench (CUDA)", "train fp32"]
ONE_GPU += ["eval fp32", "train bf16", "train fp16"]


def plan(gpus: int, tmp_path: Path, **settings) -> dict:
    steps = gc.build_plan("python", gpus, tmp_path, gc.Settings(**settings), SCHEDULE)
    return {step.name: step for step in steps}


def overrides(command: list[str]) -> list[str]:
    after_config = command[command.index("--config") + 2 :]
    return [arg for arg in after_config if "=" in arg and not arg.startswith("-")]


def test_no_cuda_says_so_in_one_line_and_exits_2():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("gpu-check: no CUDA device visible to")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_without_cuda_exits_2():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    command = ["make", "-s", "--no-print-directory", "gpu-check", f"PYTHON={sys.executable}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [done.stdout.strip()]  # make's own line: stderr
    assert "no CUDA device" in done.stdout


def test_help_says_how_to_run_it_through_the_device_tool():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert 'run(command="make gpu-check PYTHON=python3 GPU_CHECK_OUT=$OUT"' in done.stdout
    assert 'carry=[".whl"]' in done.stdout


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_plan_by_gpu_count(tmp_path, gpus):
    steps = plan(gpus, tmp_path)
    multi = ["train DDP", "train DeepSpeed", "eval 2 processes"]
    assert list(steps) == ONE_GPU + (multi if gpus >= 2 else [])
    for name, step in steps.items():
        torchrun = "--nproc-per-node=2" in step.commands[0]
        assert torchrun == (name in multi), name  # 2 processes, however many GPUs
    assert steps["eval fp32"].needs[-1] == "train fp32"
    if gpus >= 2:
        assert "deepspeed" in steps["train DeepSpeed"].requires
        assert steps["eval 2 processes"].needs[-1] == "train DDP"


def test_plan_overrides_are_valid_config(tmp_path):
    """Every training and evaluation command's overrides load against the schema: tracking off,
    the schedule scaled into the shortened run, the precision and engine named."""
    steps = plan(2, tmp_path)
    expected = {"fp32": "off", "bf16": "bf16", "fp16": "fp16", "DDP": "off", "DeepSpeed": "off"}
    for name, step in steps.items():
        if not name.startswith(("train", "eval")):
            continue
        command = step.commands[0]
        cfg = load_config(REPO / command[command.index("--config") + 1], overrides(command))
        assert cfg.tracking.enabled is False, name
        assert cfg.data.train_shards == f"{tmp_path}/data/shards/train", name
        if name.startswith("train"):
            steps_run = 20 if name in ("train DDP", "train DeepSpeed") else 100
            assert cfg.train.max_steps == steps_run, name
            assert cfg.train.warmup_iters < cfg.train.lr_steps[0] < cfg.train.lr_steps[1], name
            assert cfg.train.lr_steps[1] <= steps_run, name
            assert cfg.train.amp == expected[name.removeprefix("train ")], name
            assert cfg.train.output_dir == f"{tmp_path}/runs/{name.removeprefix('train ')}"
            # The config's global batch: the pipeline keeps the steps asked for.
            processes = 2 if "--nproc-per-node=2" in command else 1
            assert cfg.train.batch_size * processes == cfg.train.reference_batch_size, name
    zero = load_config(None, overrides(steps["train DeepSpeed"].commands[0])).distributed
    assert (zero.strategy, zero.zero_stage) == ("deepspeed", 2)
    assert steps["train DeepSpeed"].env == {"DS_ACCELERATOR": "cuda"}


def test_build_step_targets_this_gpu(tmp_path):
    build = plan(1, tmp_path, arch="9.0")["build ops"]
    assert build.env["TORCH_CUDA_ARCH_LIST"] == "9.0" and build.env["FORCE_CUDA"] == "1"
    assert build.commands[0][1:] == ["setup.py", "-q", "build_ext", "--inplace"]
    assert "TORCH_CUDA_ARCH_LIST" not in plan(1, tmp_path)["build ops"].env


def test_scaled_schedule():
    keys = gc.scaled_schedule(100, 1, SCHEDULE)
    assert keys[:4] == [
        "train.max_steps=100",
        "train.batch_size=8",
        "train.warmup_iters=4",
        "train.lr_steps=[81,94]",
    ]
    keys = gc.scaled_schedule(20, 2, SCHEDULE)
    assert keys[1:4] == ["train.batch_size=4", "train.warmup_iters=1", "train.lr_steps=[16,19]"]


def test_demo_schedule_is_the_configs():
    assert gc.demo_schedule() == SCHEDULE


def test_parse_images_per_s():
    lines = [
        f"step {s}/30 loss=1.0 lr=0.01 images/s={v} data_wait=3%"
        for s, v in ((10, 50.0), (20, 300.0), (30, 320.5))
    ]
    assert gc.parse_images_per_s("train", "\n".join(lines)) == pytest.approx(310.25)
    assert gc.parse_images_per_s("train", lines[0]) == 50.0  # one line: nothing to drop
    assert gc.parse_images_per_s("train", "no progress") is None
    summary = "evaluated 200 of 200 images (0 failed) from x (step 100), 412.5 images/s"
    assert gc.parse_images_per_s("eval", f"{lines[1]}\n{summary}") == 412.5
    assert gc.parse_images_per_s("pytest", summary) is None


def test_describe(tmp_path):
    train = gc.Step("t", [], 1, parse="train")
    assert gc.describe(train, "step 90/100 loss=1.2 x\nstep 100/100 loss=0.9876 x") == (
        "step 100/100 loss 0.9876"
    )
    pytest_step = gc.Step("p", [], 1, parse="pytest")
    assert gc.describe(pytest_step, "...\n===== 41 passed, 2 skipped in 3.2s =====") == (
        "41 passed, 2 skipped in 3.2s"
    )
    bench = gc.Step("b", [], 1, parse="bench")
    text = "op a    1.00   2.00    2.00x  same\nop b    1.00   0.50    0.50x  DIFFERS"
    assert gc.describe(bench, text) == "2 ops, ours 0.50x-2.00x, 1 differ"
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"bbox/AP": 0.5, "segm/AP": 0.25}))
    evaluation = gc.Step("e", [], 1, parse="eval", metrics=str(metrics))
    assert gc.describe(evaluation, "") == "bbox AP 0.500, segm AP 0.250"


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def alive(pid: int) -> bool:
    """Running, not merely a zombie that no init process has reaped yet."""
    for _ in range(20):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


def test_run_plan_budget_timeouts_failures_and_skips(tmp_path):
    # The timed-out step's child starts a grandchild: both must be gone after the timeout.
    pid_file = tmp_path / "grandchild.pid"
    spawn = f"""
        import pathlib, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        pathlib.Path({str(pid_file)!r}).write_text(str(child.pid))
        time.sleep(60)
    """
    progress = "print('step 1/2 loss=2.0 images/s=10.0'); print('step 2/2 loss=1.5 images/s=12.0')"
    steps = [
        gc.Step("ok", [py("print('first')"), py(progress)], 30, 1, parse="train"),
        gc.Step("fails", [py("import sys; print('RuntimeError: boom'); sys.exit(3)")], 30, 1),
        gc.Step("after fails", [py("pass")], 30, 1, needs=("fails",)),
        gc.Step("after ok", [py("pass")], 30, 1, needs=("ok",)),
        gc.Step("no module", [py("pass")], 30, 1, requires=("nomod",)),
        gc.Step("slow", [py(spawn)], 2, 1),
        gc.Step("too long for what is left", [py("pass")], 30, 10_000),
    ]
    deadline = time.monotonic() + 120
    results = gc.run_plan(steps, deadline, gc.child_env(None), tmp_path / "logs", {"nomod": "gone"})
    status = {r.name: r.status for r in results}
    assert status == {
        "ok": "passed",
        "fails": "failed (exit 3)",
        "after fails": "skipped",
        "after ok": "passed",
        "no module": "skipped",
        "slow": "timed out",
        "too long for what is left": "skipped (budget)",
    }
    by_name = {r.name: r for r in results}
    assert by_name["ok"].images_per_s == 12.0 and by_name["ok"].detail == "step 2/2 loss 1.5"
    assert by_name["fails"].detail == "RuntimeError: boom"
    assert by_name["no module"].detail == "cannot import nomod: gone"
    assert 2 <= by_name["slow"].seconds < 30
    assert by_name["slow"].detail == "stopped after 2 s"
    assert not alive(int(pid_file.read_text()))
    logs = sorted(p.name for p in (tmp_path / "logs").glob("*.log"))
    assert logs == ["00-ok.log", "01-fails.log", "02-after-ok.log", "03-slow.log"]
    assert "first" in (tmp_path / "logs" / "00-ok.log").read_text()


def test_report_files(tmp_path):
    results = [
        gc.Result("train fp32", "passed", 41.26, 812.34, "step 100/100 loss 0.9"),
        gc.Result("train DDP", "failed (exit 1)", 3.0, None, "a | b"),
        gc.Result("eval fp32", "skipped (budget)", 0.0, None, "3 s left"),
    ]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "00-train-fp32.log").write_text("hello\n")
    table = gc.write_report(tmp_path / "out", tmp_path / "logs", results, "1 x GPU")
    lines = table.strip().splitlines()
    assert lines[0] == "gpu-check: 1 x GPU; 1 passed, 1 failed, 1 skipped"
    assert lines[4] == "| train fp32 | passed | 41.3 | 812.3 | step 100/100 loss 0.9 |"
    assert lines[5] == "| train DDP | failed (exit 1) | 3.0 |  | a / b |"
    assert lines[6] == "| eval fp32 | skipped (budget) |  |  | 3 s left |"
    assert (tmp_path / "out" / "gpu-check.md").read_text() == table
    saved = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert saved["results"][0]["images_per_s"] == 812.34
    assert "hello" in (tmp_path / "out" / "gpu-check.log").read_text()


def test_wheels_to_install_leaves_the_machines_own(tmp_path):
    names = ["numpy-2.0.0-cp312-cp312-manylinux_2_17_x86_64.whl", "pydantic_core-2.33.2-cp312.whl"]
    for name in names:
        (tmp_path / name).touch()
    assert gc.wheel_distribution(names[1]) == ("pydantic-core", "2.33.2")
    wanted = gc.wheels_to_install(tmp_path, installed=lambda name: name == "numpy")
    assert [w.name for w in wanted] == [names[1]]
    assert gc.wheels_to_install(tmp_path / "absent") == []
    assert gc.is_installed("pytest") and not gc.is_installed("surely-not-installed-here")


def make_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel of a module `gpucheckdemo` holding VALUE = 42."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel, dist = folder / "gpucheckdemo-0.1-py3-none-any.whl", "gpucheckdemo-0.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("gpucheckdemo/__init__.py", "VALUE = 42\n")
        metadata = "Metadata-Version: 2.1\nName: gpucheckdemo\nVersion: 0.1\n"
        archive.writestr(f"{dist}/METADATA", metadata)
        tags = "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        archive.writestr(f"{dist}/WHEEL", tags)
        archive.writestr(f"{dist}/RECORD", "")
    return wheel


def demo_value(env: dict[str, str]) -> str:
    code = "import gpucheckdemo; print(gpucheckdemo.VALUE)"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    return done.stdout.strip() or done.stderr


def test_install_step_makes_a_wheel_importable(tmp_path):
    wheel = make_wheel(tmp_path / "wheels")
    wheels = gc.wheels_to_install(wheel.parent)
    assert wheels == [wheel]
    site, log = tmp_path / "site", tmp_path / "install.log"
    result = gc.run_step(gc.install_step(sys.executable, wheels, site), 120, os.environ, log)
    assert result.status == "passed", log.read_text()
    assert demo_value(gc.child_env(site)) == "42"


@pytest.mark.parametrize("fails", [False, True])
def test_main_with_a_gpu_installs_runs_and_reports(tmp_path, monkeypatch, capsys, fails):
    """main()'s glue on a pretend GPU: the wheels installed first, the plan run in their
    environment, the table printed last and written; exit 1 when a step failed."""
    make_wheel(tmp_path / "wheels")
    monkeypatch.setattr(gc, "cuda_devices", lambda: (["Pretend GPU"], "9.0", "2.11.0"))
    check = "import gpucheckdemo, sys; print('images/s=3.0'); sys.exit(gpucheckdemo.VALUE - 42)"
    steps = [gc.Step("uses the wheel", [py(check)], 60, 1, parse="train")]
    steps += [gc.Step("second", [py(f"import sys; sys.exit({int(fails)})")], 60, 1)]
    seen = {}

    def fake_plan(python, gpus, work, settings, schedule):
        seen.update(gpus=gpus, arch=settings.arch, schedule=schedule)
        return steps

    monkeypatch.setattr(gc, "build_plan", fake_plan)
    out = tmp_path / "out"
    argv = [
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
        "--wheels",
        str(tmp_path / "wheels"),
    ]
    code = gc.main(argv)
    assert code == (1 if fails else 0)
    assert seen == {
        "gpus": 1,
        "arch": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
        "schedule": SCHEDULE,
    }
    table = (out / "gpu-check.md").read_text()
    assert table.startswith("gpu-check: 1 x Pretend GPU, torch 2.11.0")
    assert "| wheels | passed |" in table and "| uses the wheel | passed |" in table
    assert ("| second | failed (exit 1) |" in table) == fails
    assert (
        capsys.readouterr()
        .out.rstrip()
        .endswith("written to " + f"{out}/gpu-check.md (and .json, .log)")
    )
    assert {p.name for p in out.iterdir()} == {"gpu-check.md", "gpu-check.json", "gpu-check.log"}


def test_wheel_pins_are_what_pyproject_allows():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    allowed = {gc.normalize(Requirement(d).name): Requirement(d).specifier for d in dependencies}
    pins = dict(pin.split("==") for pin in gc.WHEELS)
    for name in ("webdataset", "pycocotools", "deepspeed"):
        assert allowed[name].contains(pins[name]), name
    assert len({gc.normalize(name) for name in pins}) == len(pins)  # one version of each


@pytest.mark.slow
def test_demo_steps_run_on_the_cpu_without_mlflow(tmp_path, monkeypatch):
    """The plan's own data, training and evaluation commands, shrunk, on the CPU; mlflow and
    deepspeed cannot be imported (as on the lent machine), so tracking off must not need them."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "for name in ('mlflow', 'deepspeed', 'faster_coco_eval'):\n"
        "    sys.modules[name] = None  # import fails, find_spec says absent\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(blocker))
    settings = {"train_images": 8, "val_images": 4, "steps": 2, "workers": 1}
    steps = plan(1, tmp_path, **settings)
    chosen = [steps[name] for name in ("demo data", "train fp32", "eval fp32")]
    for step in chosen:
        step.commands = [[sys.executable, *command[1:]] for command in step.commands]
        step.needs = tuple(need for need in step.needs if need != "build ops")  # CPU kernels
    deadline = time.monotonic() + 600
    results = gc.run_plan(chosen, deadline, gc.child_env(None), tmp_path / "logs", {})
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert [r.status for r in results] == ["passed"] * 3, logs[-3000:]
    assert results[1].images_per_s > 0 and results[1].detail.startswith("step 2/2 loss")
    assert results[2].images_per_s > 0 and "segm AP" in results[2].detail
    assert "mlflow" not in logs.lower()


def test_ops_benchmark_synced_timing_on_the_cpu():
    """benchmarks/ops.py --device cuda's timing and verdict, with a CPU device and a counting
    synchronize: the cases build under a device context and every call is fenced."""
    import torch

    spec = importlib.util.spec_from_file_location("ops_benchmark", REPO / "benchmarks" / "ops.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fences = []
    with torch.device("cpu"):
        cases = bench.build_cases(quick=True)
    ours, theirs, agree = bench.measure_synced(cases[0], 2, lambda: fences.append(1))
    assert ours > 0 and theirs > 0 and agree
    assert len(fences) == 2 * 2 * 2  # before and after each of ours and theirs, per repeat
    wrong = bench.Case("x", 1.0, lambda: 1, lambda: 2, lambda a, b: a == b)
    assert bench.measure_synced(wrong, 1, lambda: None)[2] is False  # reported, not raised
