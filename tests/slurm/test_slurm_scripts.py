"""The Slurm scripts without a cluster: syntax, the config helper, the pipeline's job chain."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh")) + sorted((REPO / "slurm").glob("*.sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sbatch_headers():
    train = (REPO / "slurm" / "train.sbatch").read_text()
    for option in ("--requeue", "--signal=B:USR1@", "--open-mode=append"):
        assert f"#SBATCH {option}" in train
    assert "NCCL_DEBUG" in train.split("source ")[0]  # NCCL settings grouped at the top
    node = (REPO / "slurm" / "torchrun_node.sh").read_text()
    assert re.search(r"--signals-to-handle=\S*SIGUSR1", node)  # else USR1 kills the agent
    # no GPU request in the scripts themselves: CPU-only clusters run them unchanged
    for script in SCRIPTS:
        assert not re.search(r"#SBATCH\s+--(gres|gpus)", script.read_text()), script.name


def test_config_value():
    out = subprocess.run(
        [sys.executable, "slurm/config_value.py", "train.output_dir,train.max_steps",
         "--config", "configs/tiny.yaml", "train.max_steps=9"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.split() == ["outputs/tiny", "9"]


def dry_run(tmp_path, **env) -> list[list[str]]:
    """pipeline.sh --dry-run: its sbatch command lines, split into words."""
    full_env = {**os.environ, "PYTHON": sys.executable, "MLFLOW_TRACKING_URI": "", **env}
    result = subprocess.run(
        [str(REPO / "slurm" / "pipeline.sh"), "--dry-run", "--config", "configs/tiny.yaml",
         f"train.output_dir={tmp_path}/out", f"data.root={tmp_path}/data"],
        cwd=tmp_path, capture_output=True, text=True, env=full_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("sbatch")]


def option(command: list[str], name: str) -> str | None:
    return next((w.split("=", 1)[1] for w in command if w.startswith(f"--{name}=")), None)


def test_pipeline_chains_the_stages(tmp_path):
    commands = dry_run(tmp_path, GPUS_PER_NODE="4", NODES="2", SHARD_JOBS="3", PARTITION="gpu")
    names = [option(c, "job-name") for c in commands]
    assert names == ["shards-train", "merge-train", "shards-val", "merge-val", "train", "eval"]
    ids = {name: str(1000 + i) for i, name in enumerate(names)}
    by_name = dict(zip(names, commands, strict=True))
    assert option(by_name["shards-train"], "array") == "0-2"
    assert option(by_name["merge-train"], "dependency") == f"afterok:{ids['shards-train']}"
    assert "--merge-only" in by_name["merge-val"]
    train_after = option(by_name["train"], "dependency")
    assert train_after == f"afterok:{ids['merge-train']}:{ids['merge-val']}"
    assert option(by_name["eval"], "dependency") == f"afterok:{ids['train']}"
    train = by_name["train"]
    assert option(train, "nodes") == "2" and option(train, "gpus-per-node") == "4"
    assert option(train, "ntasks-per-node") == "1"  # torchrun: one task per node
    assert all(option(c, "partition") == "gpu" for c in commands)
    assert train[-1].startswith("tracking.run_name=")
    assert f"train.output_dir={tmp_path}/out" in train
    assert by_name["eval"][by_name["eval"].index("--checkpoint") + 1] == f"{tmp_path}/out"


def test_pipeline_on_cpu_with_srun_tasks(tmp_path):
    env = dict(GPUS_PER_NODE="0", NPROC_PER_NODE="2", LAUNCHER="srun", SHARD_JOBS="1",
               SKIP_SHARDS="1", WATCH_EVAL="1")  # fmt: skip
    commands = dry_run(tmp_path, **env)
    train, evaluate = commands  # shards skipped
    assert option(train, "dependency") is None
    assert option(train, "ntasks-per-node") == "2" and option(train, "gpus-per-node") is None
    assert option(evaluate, "dependency") == "after:1000"  # beside training
    assert evaluate[evaluate.index("--watch") + 1] == f"{tmp_path}/out"


def test_pipeline_without_sbatch_says_so_in_one_line_and_creates_nothing(tmp_path):
    # It used to create its log folder, then fail with "sbatch: command not found".
    bin_dir = tmp_path / "bin"  # a PATH with the shell's own tools and no Slurm
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "basename", "date", "mkdir", "sed", "cat"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "PYTHON": sys.executable, "HOME": str(tmp_path)}
    result = subprocess.run(
        [str(REPO / "slurm" / "pipeline.sh"), "--config", "configs/tiny.yaml",
         f"train.output_dir={tmp_path}/out"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "slurm/pipeline.sh: error: sbatch is not on the PATH: run it where Slurm is "
        "(a login node), or add --dry-run to print the sbatch commands"
    ]
    assert result.stdout == "" and not (tmp_path / "out").exists()


def test_the_tests_that_need_slurms_commands_live_here():
    # tests/slurm installs Slurm (conftest.py); a test elsewhere that needs its commands ran
    # before that on a fresh machine and skipped ("scontrol is not installed"), also in CI.
    here = Path(__file__).resolve().parent
    pattern = re.compile(r"""which\(\s*["'](scontrol|sbatch|srun|sinfo|squeue)["']""")
    elsewhere = [
        str(path.relative_to(REPO))
        for path in (REPO / "tests").rglob("*.py")
        if here not in path.parents and pattern.search(path.read_text())
    ]
    assert elsewhere == []
