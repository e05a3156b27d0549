"""The DeepSpeed strategy trains as DDP does: its config, fp16 loss scaling and clipping,
fp32 gradient reduction under autocast, and a resume at another world size (ZeRO-1/2
optimizer states are partitioned by it).

DeepSpeed keeps process-wide state (its accelerator, autocast settings, communication
backend), so every engine here is built in a subprocess of its own test: one process for the
CPU arithmetic, torchrun then one process for the resumes.
"""

import json
import subprocess
import sys

import pytest
import torch
from engine_helpers import REPO, free_port, run_train, tiny_overrides, train_env
from test_engine_schedule import SCALED as DDP_SCALED

from pipeline.engine.checkpoint import CheckpointError
from pipeline.engine.strategy_deepspeed import deepspeed_config, zero_partition_files


def config(amp: str) -> dict:
    return deepspeed_config(
        micro_batch=2,
        accumulation=3,
        world_size=4,
        zero_stage=2,
        clip_grad_norm=5.0,
        amp=amp,
        bucket_mb=1,
    )


def test_config_without_amp_has_no_autocast():
    cfg = config("off")
    assert "torch_autocast" not in cfg and "fp16" not in cfg and "bf16" not in cfg
    assert cfg["train_batch_size"] == 2 * 3 * 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 5.0 and cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 2**20 // 4


@pytest.mark.parametrize(("amp", "dtype"), [("bf16", "bfloat16"), ("fp16", "float16")])
def test_config_autocasts_and_reduces_every_gradient_in_fp32(amp, dtype):
    cfg = config(amp)
    # torch_autocast (fp32 weights), not DeepSpeed's fp16/bf16 sections (half weights); an
    # empty list of "lower precision safe" modules: no gradient is all-reduced in half.
    assert cfg["torch_autocast"] == {
        "enabled": True,
        "dtype": dtype,
        "lower_precision_safe_modules": [],
    }
    assert "fp16" not in cfg and "bf16" not in cfg


# --- the arithmetic, on the CPU, in one process --------------------------------------------

# fp16 needs CUDA in a real run (check_amp); here check_amp is lifted, and DeepSpeed's CPU
# accelerator runs the same ZeRO code with torch's CPU fp16 autocast.
ARITHMETIC_SCRIPT = r"""
import copy, json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from torch import nn
import deepspeed.runtime.torch_autocast as ds_autocast
from pipeline.engine import strategy_deepspeed as sd
from pipeline.modeling.conv import Conv2d

sd.check_amp = lambda amp, device: None
LR, CLIP = 0.1, 0.01
# A process group of one, as a launcher would make (DeepSpeed needs one, and LOCAL_RANK).
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class Tiny(nn.Module):
    # An nn.Linear (the class DeepSpeed reduces in half by default) and our Conv2d.
    def __init__(self, gain):
        super().__init__()
        self.conv = Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        self.gain = gain

    def forward(self, images, targets):
        out = self.fc(self.conv(images).mean(dim=(2, 3)))
        return {"loss": self.gain * (out.float() - targets).pow(2).mean()}


def build(amp, stage, gain=1.0):
    # DeepSpeed keeps the last engine's autocast settings in module globals.
    ds_autocast.TORCH_AUTOCAST_INITIALIZED = False
    ds_autocast.TORCH_AUTOCAST_DTYPE = None
    torch.manual_seed(0)
    model = Tiny(gain)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    strategy = sd.DeepSpeedStrategy(
        model, optimizer, scheduler, device=torch.device("cpu"), world_size=1, amp=amp,
        clip_grad_norm=CLIP, bucket_mb=1, micro_batch=2, accumulation=1, zero_stage=stage,
    )
    return strategy, model, reference


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 2, generator=generator)


def flat(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def expected_step(reference, dtype):
    # The unscaled loss under the same autocast, fp32 gradients clipped as DDP clips them.
    images, targets = batch()
    with torch.autocast("cpu", dtype=dtype):
        loss = reference(images, targets)["loss"]
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in reference.parameters()])
    norm = float(grads.norm())
    return norm, LR * grads * min(1.0, CLIP / (norm + 1e-6))


def step(strategy):
    images, targets = batch()
    strategy.backward(strategy.forward(images, targets)["loss"], 1)
    return strategy.optimizer_step()


def reduce_dtypes(strategy):
    buckets = getattr(strategy.engine.optimizer, "ipg_buckets", {})
    return sorted(str(dtype) for dtype in buckets)


results = {}
for stage in (0, 1, 2):
    strategy, model, reference = build("fp16", stage)
    true_norm, update = expected_step(reference, torch.float16)
    before = flat(model)
    norm = step(strategy)
    results[f"fp16_zero{stage}"] = {
        "norm": norm,
        "true_norm": true_norm,
        "update_error": float(((before - flat(model)) - update).abs().max()),
        "update_size": float(update.abs().max()),
        "reduce_dtypes": reduce_dtypes(strategy),
    }

strategy, _, _ = build("bf16", 2)
results["bf16_zero2"] = {"reduce_dtypes": reduce_dtypes(strategy)}

# A loss whose half-precision gradients overflow at the initial scale of 2**16: the steps
# are skipped until the scale is low enough, then the step is the unscaled, clipped one.
strategy, model, reference = build("fp16", 2, gain=3000.0)
true_norm, update = expected_step(reference, torch.float16)
start, steps = flat(model), []
for _ in range(20):
    norm = step(strategy)
    moved = float((start - flat(model)).abs().max())
    steps.append({"norm": norm, "moved": moved, "lr_steps": strategy.scheduler.last_epoch})
    if moved > 0:
        break
results["overflow"] = {
    "steps": steps,
    "true_norm": true_norm,
    "update_error": float(((start - flat(model)) - update).abs().max()),
    "update_size": float(update.abs().max()),
    "scale": strategy.loss_scale.scale if getattr(strategy, "loss_scale", None) else None,
}
ckpt = sys.argv[2]
strategy.save(Path(ckpt), 7, {"step": 7}, is_main=True, keep=0)
resumed, _, _ = build("fp16", 2, gain=3000.0)
resumed.load(Path(ckpt) / "step_0000007", None)
results["overflow"]["resumed_scale"] = (
    resumed.loss_scale.scale if getattr(resumed, "loss_scale", None) else None
)
results["overflow"]["resumed_norm"] = step(resumed)
with open(sys.argv[1], "w") as handle:
    json.dump(results, handle)
"""


def deepspeed_env() -> dict[str, str]:
    # The CPU accelerator and CPU tensors, also on a machine with a GPU.
    return train_env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory) -> dict:
    """The results of ARITHMETIC_SCRIPT (DeepSpeed engines in one fresh process)."""
    directory = tmp_path_factory.mktemp("deepspeed_arithmetic")
    out = directory / "results.json"
    result = subprocess.run(
        [sys.executable, "-c", ARITHMETIC_SCRIPT, str(out), str(directory / "ckpt")],
        capture_output=True, text=True, timeout=300, env=deepspeed_env(), cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_fp16_clips_unscaled_gradients_like_ddp(arithmetic, stage):
    case = arithmetic[f"fp16_zero{stage}"]
    # The step is the DDP one: the clipped update of the unscaled gradients (the clip is
    # active: the norm is far above 0.01), not one 65,536 times smaller.
    assert case["true_norm"] > 10 * 0.01
    assert case["update_error"] <= 1e-4 * case["update_size"]
    if stage:  # ZeRO-1/2 report the norm before clipping; ZeRO-0 keeps none (nan)
        assert case["norm"] == pytest.approx(case["true_norm"], rel=1e-4)


@pytest.mark.parametrize("case", ["fp16_zero1", "fp16_zero2", "bf16_zero2"])
def test_autocast_reduces_every_gradient_in_fp32(arithmetic, case):
    # ZeRO-1/2 keep one reduction bucket per communication dtype.
    assert arithmetic[case]["reduce_dtypes"] == ["torch.float32"]


def test_fp16_overflow_lowers_the_scale_and_training_goes_on(arithmetic):
    case = arithmetic["overflow"]
    steps = case["steps"]
    skipped, applied = steps[:-1], steps[-1]
    assert skipped, "the first step did not overflow: raise the test's gain"
    assert applied["moved"] > 0, f"no step applied in {len(steps)}: the scale never dropped"
    for number, record in enumerate(skipped, start=1):
        assert record["moved"] == 0 and record["norm"] == float("inf")
        assert record["lr_steps"] == number  # the schedule moves on, as under DDP
    # Halved once per skipped step, from GradScaler's 2**16.
    assert case["scale"] == 2.0 ** (16 - len(skipped))
    assert applied["norm"] == pytest.approx(case["true_norm"], rel=1e-4)
    assert case["update_error"] <= 1e-4 * case["update_size"]
    # The scale is checkpointed: a resumed run does not start over at 2**16.
    assert case["resumed_scale"] == case["scale"]
    assert case["resumed_norm"] < float("inf")


# --- a resume at another world size (ZeRO-1/2 partitions), real processes ------------------

# A model whose steps are exact across world sizes (no batch statistics, a mean loss over
# equal per-rank batches). Parameter sizes put a ZeRO partition boundary inside a weight and
# alignment padding at the end of the bias group.
RESHARD_SCRIPT = r"""
import os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from torch import nn
from pipeline.engine.optim import build_optimizer
from pipeline.engine.strategy_deepspeed import DeepSpeedStrategy

mode, out, stage = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")
else:  # as a launcher would: DeepSpeed needs a process group and LOCAL_RANK
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
optimizer = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-2)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class Loss(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images, targets):
        return {"loss": (self.net(images) - targets).pow(2).mean()}


strategy = DeepSpeedStrategy(
    Loss(model), optimizer, scheduler, device=torch.device("cpu"), world_size=world,
    amp="off", clip_grad_norm=0.0, bucket_mb=1, micro_batch=4 // world, accumulation=1,
    zero_stage=stage,
)


def train_step(number):
    generator = torch.Generator().manual_seed(number)
    images, targets = torch.randn(4, 5, generator=generator), torch.randn(4, 3, generator=generator)
    part = slice(rank * 4 // world, (rank + 1) * 4 // world)
    strategy.backward(strategy.forward(images[part], targets[part])["loss"], 1)
    strategy.optimizer_step()


if mode == "save":
    train_step(0)
    train_step(1)
    strategy.save(out / "checkpoints", 2, {"step": 2}, is_main=rank == 0, keep=0)
    train_step(2)
    if rank == 0:
        torch.save(model.state_dict(), out / f"step3_{world}.pt")
else:
    strategy.load(out / "checkpoints" / "step_0000002", None)
    train_step(2)
    if rank == 0:
        torch.save(model.state_dict(), out / f"step3_{world}.pt")
dist.destroy_process_group()
"""


def run_reshard(nproc: int, mode: str, out, stage: int) -> None:
    script = out / "reshard.py"
    script.write_text(RESHARD_SCRIPT)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        ]
    result = subprocess.run(
        [*launcher, str(script), mode, str(out), str(stage)],
        capture_output=True, text=True, timeout=300, env=deepspeed_env(), cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, f"{nproc} process(es), {mode}:\n{result.stderr[-4000:]}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("saved_on", "resumed_on", "stage"), [(2, 1, 1), (1, 2, 2)], ids=["zero1_2to1", "zero2_1to2"]
)
def test_momentum_resharded_to_another_world_size_continues_exactly(
    tmp_path, saved_on, resumed_on, stage
):
    run_reshard(saved_on, "save", tmp_path, stage=stage)
    assert len(zero_partition_files(tmp_path / "checkpoints" / "step_0000002")) == saved_on
    run_reshard(resumed_on, "load", tmp_path, stage=stage)
    straight = torch.load(tmp_path / f"step3_{saved_on}.pt", weights_only=True)
    resumed = torch.load(tmp_path / f"step3_{resumed_on}.pt", weights_only=True)
    # Step 3 from the resharded momentum is the step the saving run made (a lost or
    # misplaced momentum moves the weights by about lr x 0.9 x |momentum|, ~1e-2).
    for name in straight:
        assert torch.allclose(resumed[name], straight[name], rtol=0, atol=1e-6), name


# The DDP schedule test's settings (test_engine_schedule.py), under DeepSpeed ZeRO-2.
SCALED = {**DDP_SCALED, "distributed.strategy": "deepspeed", "distributed.zero_stage": 2}


def client_state(out) -> dict:
    entry = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    return torch.load(entry / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_zero2_run_on_two_processes_resumes_on_one(engine_shards, tmp_path):
    out = tmp_path / "run"
    env = deepspeed_env()
    first = run_train(
        2, tiny_overrides(engine_shards, out, **{**SCALED, "train.max_steps": 4}), env=env
    )
    assert first.returncode == 0, first.stderr[-3000:]
    saved = client_state(out)
    assert (saved["step"], saved["world_size"], saved["images_seen"]) == (2, 2, 8)
    assert len(zero_partition_files(out / "checkpoints" / "step_0000002")) == 2
    resumed = run_train(0, tiny_overrides(engine_shards, out, **SCALED), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continues at step 4 (8 images seen)" in resumed.stderr
    final = client_state(out)
    # One process, 2 images a step: 8 images seen are step 4 of its 8, and it makes 4 more.
    assert (final["step"], final["world_size"], final["images_seen"]) == (8, 1, 16)
    assert final["loader"]["samples_consumed"] == 16
    assert final["lr_scheduler"]["base_lrs"] == [pytest.approx(0.01)] * 2
    assert len(zero_partition_files(out / "checkpoints" / "step_0000008")) == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 5, 6, 7, 8]
    # After the resume, the lr of the 1-process schedule: 0.01, cut tenfold at step 4.
    assert [r["lr"] for r in records[2:]] == [pytest.approx(0.001)] * 4
    assert torch.isfinite(torch.tensor([r["loss/total"] for r in records])).all()


def test_missing_zero_partitions_are_named(tmp_path):
    entry = tmp_path / "step_0000002"
    entry.mkdir()
    (entry / "zero_pp_rank_1_mp_rank_00_optim_states.pt").touch()
    with pytest.raises(CheckpointError, match=r"step_0000002: ZeRO partitions of ranks \[1\] only"):
        zero_partition_files(entry)
