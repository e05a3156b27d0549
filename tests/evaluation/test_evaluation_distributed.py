"""The evaluation stage under torchrun: 2 ranks (gloo) give the metrics of 1 rank."""

import json
import os
import subprocess
import sys

import pytest
from evaluation_helpers import REPO, eval_config

from pipeline.config import save_config


def torchrun_evaluate(nproc: int, config, checkpoint, out, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels and threads for both runs
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", str(REPO / "launch" / "evaluate.py"), "--config",
        str(config), "--checkpoint", str(checkpoint), "--out", str(out), *overrides,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()), result


@pytest.mark.slow
def test_two_ranks_give_the_metrics_of_one(eval_shards, checkpoint_file, tmp_path):
    # One image per batch: a batch is zero-padded to its largest image, which would make a
    # detection depend on which images share its batch (and so on the number of ranks).
    config = save_config(eval_config(eval_shards, "eval.batch_size=1"), tmp_path / "eval.yaml")
    one, _ = torchrun_evaluate(1, config, checkpoint_file, tmp_path / "one")
    two, result = torchrun_evaluate(2, config, checkpoint_file, tmp_path / "two")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["images_evaluated"] == two["images_evaluated"] == 11
    assert one["bbox/AR100"] > 0  # there is something to compare
    for key in [k for k in one if "/" in k] + ["per_category", "images_failed"]:
        assert one[key] == two[key], key
    for name in ("bbox.json", "segm.json"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()
    assert result.stdout.count("evaluated 11 of 11 images") == 1  # rank 0 reports, once


@pytest.mark.slow  # a Python process that imports torch: seconds
def test_bad_checkpoint_exits_2_with_one_line(eval_shards, tmp_path):
    config = save_config(eval_config(eval_shards), tmp_path / "eval.yaml")
    command = [
        sys.executable,
        str(REPO / "launch" / "evaluate.py"),
        "--config",
        str(config),
        "--checkpoint",
        str(tmp_path / "missing.pt"),
        "--out",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"evaluate: error: checkpoint {tmp_path / 'missing.pt'}: no such file or directory"
    )
