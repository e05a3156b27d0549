"""What a crashed writer leaves in the run directory, and the exit code of a config error found
at run time: a training start removes the temporary files and directories of a killed save, a
DeepSpeed save never builds on a stale temporary directory (or an entry left by a save that
died before it was published), and ``train.amp=fp16`` on a CPU exits 2."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from engine_helpers import REPO, TINY, tiny_config, tiny_overrides, train_env
from torch.serialization import get_unsafe_globals_in_checkpoint

from pipeline.engine import train
from pipeline.engine.strategy_deepspeed import zero_partition_files
from pipeline.evaluation import load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


@pytest.mark.slow
def test_a_start_removes_the_leftovers_of_a_killed_save(engine_shards, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True)
    # A DDP save, its `latest` and a DeepSpeed save, each killed half way.
    torch.save({"model": {"w": torch.zeros(1000)}}, ckpt / "whole.pt")
    data = (ckpt / "whole.pt").read_bytes()
    (ckpt / "whole.pt").unlink()
    (ckpt / ".step_0000002.pt.tmp4242").write_bytes(data[: len(data) // 2])
    (ckpt / ".latest.tmp4242").write_text("step_00")
    (ckpt / ".step_0000002.tmp").mkdir()
    (ckpt / ".step_0000002.tmp" / "mp_rank_00_model_states.pt").write_bytes(data[:100])
    (ckpt / "notes.txt").write_text("not ours to remove")
    assert train(tiny_config(engine_shards, out, **{"train.max_steps": 1})) == 0
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "FINISHED",
        "latest",
        "notes.txt",
        "step_0000001.pt",
    ]


def test_a_config_error_found_at_run_time_exits_2(engine_shards, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("fp16 is a valid choice with CUDA")
    spec = importlib.util.spec_from_file_location("train_main", REPO / "launch" / "train.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    overrides = tiny_overrides(engine_shards, tmp_path / "run", **{"train.amp": "fp16"})
    capsys.readouterr()
    assert launcher.main(["--config", str(TINY), *overrides]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "train.amp=fp16" in errors[0]


def test_training_without_shards_says_how_to_build_them_and_exits_2(engine_shards, tmp_path,
                                                                    capsys):  # fmt: skip
    spec = importlib.util.spec_from_file_location("train_main", REPO / "launch" / "train.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    missing = tmp_path / "no_shards"
    overrides = tiny_overrides(
        {**engine_shards, "train": missing}, tmp_path / "run", **{"train.max_steps": 1}
    )
    capsys.readouterr()
    assert launcher.main(["--config", str(TINY), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert str(missing) in err and "build_shards.py" in err


# One DeepSpeed process saves twice through the strategy, into a checkpoints directory where
# a crashed 2-process save left its temporary directory (step 2) and a save that died before
# its publish left a complete entry (step 3); every fsync and rename is recorded.
DEEPSPEED_SAVE_SCRIPT = r"""
import json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from torch import nn
from pipeline.engine.checkpoint import rng_state
from pipeline.engine.optim import build_optimizer
from pipeline.engine.strategy_deepspeed import DeepSpeedStrategy

ckpt = Path(sys.argv[1])
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
torch.manual_seed(0)
model = nn.Linear(5, 3)
optimizer = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-2)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class Loss(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images, targets):
        return {"loss": (self.net(images) - targets).pow(2).mean()}


strategy = DeepSpeedStrategy(
    Loss(model), optimizer, scheduler, device=torch.device("cpu"), world_size=1, amp="off",
    clip_grad_norm=0.0, bucket_mb=1, micro_batch=4, accumulation=1, zero_stage=1,
)
strategy.backward(strategy.forward(torch.randn(4, 5), torch.randn(4, 3))["loss"], 1)
strategy.optimizer_step()

events, errors = [], {}
real_fsync, real_replace = os.fsync, os.replace


def fsync(fd):
    events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
    real_fsync(fd)


def replace(src, dst, **kwargs):
    real_replace(src, dst, **kwargs)
    events.append(f"rename {os.fspath(dst)}")


os.fsync, os.replace = fsync, replace
client = {"rng": rng_state(), "config": "train:\n  amp: 'off'\n", "world_size": 1,
          "tracking": {"run_id": None, "uri": None}}
for step in (2, 3):
    try:
        strategy.save(ckpt, step, {**client, "step": step}, is_main=True, keep=0)
    except Exception as error:
        errors[step] = f"{type(error).__name__}: {error}"
os.fsync, os.replace = real_fsync, real_replace
print(json.dumps({"events": events, "errors": errors}))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_deepspeed_save_starts_from_an_empty_directory_and_syncs_it(tmp_path):
    ckpt = tmp_path / "checkpoints"
    stale = ckpt / ".step_0000002.tmp"
    stale.mkdir(parents=True)
    (stale / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 half")
    (stale / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"PK\x03\x04 half")
    unpublished = ckpt / "step_0000003"
    unpublished.mkdir()
    for rank in (0, 1):
        (unpublished / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"old")
    (ckpt / "latest").write_text("step_0000001\n")
    script = tmp_path / "save.py"
    script.write_text(DEEPSPEED_SAVE_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(ckpt)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env=train_env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES=""),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for step in (2, 3):
        assert str(step) not in report["errors"], report["errors"][str(step)]
        entry = ckpt / f"step_{step:07d}"
        # Only this process's partition: a stale rank 1 would make a resume reshard garbage.
        assert zero_partition_files(entry) == [entry / "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
        model_states = entry / "mp_rank_00_model_states.pt"
        assert get_unsafe_globals_in_checkpoint(model_states) == []
        assert load_checkpoint(entry).step == step  # the evaluation reads it, weights only
        events = report["events"]
        renamed = events.index(f"rename {entry}")
        assert any(e.endswith("/mp_rank_00_model_states.pt") for e in events[:renamed])
        assert events[renamed + 1] == f"fsync {ckpt}"
    assert (ckpt / "latest").read_text().strip() == "step_0000003"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".")) == []
