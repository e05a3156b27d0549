"""Non-finite gradients under 2-process DDP (torchrun, gloo): a finite loss whose gradient is
NaN on one rank only skips the optimizer step on every rank alike, counts towards
``train.max_nonfinite_steps``, and no checkpoint ever holds a non-finite tensor."""

import json
import math

import pytest
import torch
from engine_helpers import REPO, checkpoint_state, tiny_overrides, train_command, train_env

pytestmark = pytest.mark.slow

# Written into the test's directory and run by torchrun as the script, before launch/train.py
# (production code keeps no test hooks). It counts DDPStrategy.backward calls (micro-batches)
# and, on the rank and calls that NAN_GRAD names, makes one parameter's local gradient NaN
# while the loss stays finite; NAN_IMAGE makes one forward's images NaN on one rank. After
# every optimizer step it records a digest of the rank's parameters and whether they and its
# buffers are all finite, and can overwrite a parameter with NaN after a given step
# (POISON_AFTER_STEP), as a finite but overflowing update would.
_HOOK = """
import hashlib
import json
import os
import runpy
import sys
from pathlib import Path

import torch

import pipeline.engine.strategy as strategy

rank = int(os.environ["RANK"])
nan_rank, nan_calls = os.environ.get("NAN_GRAD", "-1:").split(":")
first_call, _, last_call = nan_calls.partition("-")
poison_after = int(os.environ.get("POISON_AFTER_STEP", "0"))
record = Path(os.environ["STEP_RECORD"]) / f"rank{rank}.jsonl"
nan_image_rank, nan_image_call = map(int, os.environ.get("NAN_IMAGE", "-1:0").split(":"))
backward, optimizer_step = strategy.DDPStrategy.backward, strategy.DDPStrategy.optimizer_step
forward = strategy.DDPStrategy.forward
calls = steps = forwards = 0


def nan_forward(self, images, targets):
    global forwards
    forwards += 1
    if rank == nan_image_rank and forwards == nan_image_call:
        print(f"rank {rank}: NaN images in forward {forwards}", file=sys.stderr, flush=True)
        images = [torch.full_like(image, float("nan")) for image in images]
    return forward(self, images, targets)


def nan_backward(self, loss, accumulation):
    global calls
    calls += 1
    poisoned = rank == int(nan_rank) and int(first_call) <= calls <= int(last_call or first_call)
    if not poisoned:
        return backward(self, loss, accumulation)
    print(f"rank {rank}: NaN gradient in micro-batch {calls}", file=sys.stderr, flush=True)
    handle = self.params[0].register_hook(lambda grad: torch.full_like(grad, float("nan")))
    try:
        return backward(self, loss, accumulation)
    finally:
        handle.remove()


def recorded_step(self):
    global steps
    norm = optimizer_step(self)
    steps += 1
    if steps == poison_after:
        with torch.no_grad():
            self.params[0].fill_(float("nan"))
    digest = hashlib.sha256()
    for param in self.module.parameters():
        digest.update(param.detach().cpu().numpy().tobytes())
    state = [*self.module.parameters(), *self.module.buffers()]  # with BatchNorm statistics
    finite = all(bool(torch.isfinite(t).all()) for t in state if t.is_floating_point())
    with record.open("a") as handle:
        handle.write(json.dumps({"step": steps, "digest": digest.hexdigest(), "finite": finite}))
        handle.write("\\n")
    return norm


strategy.DDPStrategy.forward = nan_forward
strategy.DDPStrategy.backward = nan_backward
strategy.DDPStrategy.optimizer_step = recorded_step
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, str(Path(script).resolve().parent))
sys.exit(runpy.run_path(script, run_name="train_under_test")["main"](sys.argv[1:]))
"""


def run_with_hook(tmp_path, engine_shards, extra, **env):
    import subprocess

    hook = tmp_path / "nan_grad_hook.py"
    hook.write_text(_HOOK)
    record = tmp_path / "record"
    record.mkdir()
    out = tmp_path / "run"
    common = {"train.checkpoint_every": 1, "train.keep_checkpoints": 0, "data.num_workers": 0}
    command = train_command(2, tiny_overrides(engine_shards, out, **common, **extra))
    command.insert(command.index(str(REPO / "launch" / "train.py")), str(hook))
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env=train_env(STEP_RECORD=str(record), **env),
    )
    steps = [
        [json.loads(line) for line in (record / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in range(2)
    ]
    return result, out, steps


def checkpoints(out):
    return sorted((out / "checkpoints").glob("step_*.pt"))


def assert_all_finite(state, where):
    for key, value in state["model"].items():
        if value.is_floating_point():
            assert bool(torch.isfinite(value).all()), f"{where}: {key} is not finite"
    for number, entry in state["optimizer"]["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert bool(torch.isfinite(value).all()), f"{where}: optimizer {number}.{key}"


def test_a_nan_gradient_on_one_rank_skips_the_step_on_every_rank(engine_shards, tmp_path):
    result, out, (rank0, rank1) = run_with_hook(
        tmp_path, engine_shards, {"train.max_steps": 4}, NAN_GRAD="1:2"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rank 1: NaN gradient in micro-batch 2" in result.stderr
    # Both ranks hold the same weights after every step, all finite; step 2 changed nothing.
    assert [s["digest"] for s in rank0] == [s["digest"] for s in rank1]
    assert all(s["finite"] for s in rank0 + rank1)
    digests = [s["digest"] for s in rank0]
    assert digests[1] == digests[0] and len(set(digests)) == 3
    # The checkpoints: all finite; step 2's weights and momentum are step 1's, its schedule moved.
    assert [p.name for p in checkpoints(out)] == [f"step_000000{n}.pt" for n in (1, 2, 3, 4)]
    states = {n: checkpoint_state(out, n) for n in (1, 2, 3, 4)}
    for number, state in states.items():
        assert_all_finite(state, f"checkpoint {number}")
    for key, value in states[1]["model"].items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(states[2]["model"][key], value), key  # (step 2's forward ran)
    before, after = states[1]["optimizer"]["state"], states[2]["optimizer"]["state"]
    for number, entry in before.items():
        assert torch.equal(after[number]["momentum_buffer"], entry["momentum_buffer"])
    assert states[2]["scheduler"]["last_epoch"] == 2  # as GradScaler's skipped steps do
    assert "step 2: non-finite gradient norm" in result.stderr
    assert "optimizer step skipped (1 in a row)" in result.stderr
    # Steps 1, 3 and 4 report their (finite) norm, step 2 none.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [("grad_norm" in r) for r in records] == [True, False, True, True]
    assert all(math.isfinite(r["grad_norm"]) for r in records if "grad_norm" in r)


def test_non_finite_gradients_in_a_row_stop_the_run(engine_shards, tmp_path):
    result, out, (rank0, rank1) = run_with_hook(
        tmp_path,
        engine_shards,
        {"train.max_steps": 6, "train.max_nonfinite_steps": 2},
        NAN_GRAD="1:2-99",
    )
    assert result.returncode == 1, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("train: error:")]
    # One line from each rank that got to print it before the agent stopped the other.
    assert errors and all("NonFiniteLossError: 2 optimizer steps in a row" in x for x in errors)
    # Step 1 applied, 2 and 3 skipped; the run stops before writing step 3's checkpoint.
    assert len(rank0) == len(rank1) == 3
    assert rank0[2]["digest"] == rank0[1]["digest"] == rank0[0]["digest"]
    assert [p.name for p in checkpoints(out)] == ["step_0000001.pt", "step_0000002.pt"]
    for path in checkpoints(out):
        assert_all_finite(torch.load(path, map_location="cpu", weights_only=True), path.name)


def test_a_skipped_batch_leaves_no_nan_in_the_batchnorm_statistics(engine_shards, tmp_path):
    # NaN activations reach BatchNorm, whose forward updates its running statistics before the
    # loss is seen to be NaN: the skipped batch must not leave them there.
    result, out, (rank0, rank1) = run_with_hook(
        tmp_path, engine_shards, {"train.max_steps": 3}, NAN_IMAGE="1:2"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rank 1: NaN images in forward 2" in result.stderr
    assert "step 2: non-finite loss on some rank" in result.stderr
    assert [s["digest"] for s in rank0] == [s["digest"] for s in rank1]
    assert all(s["finite"] for s in rank0 + rank1)  # rank 1's own statistics too
    for number in (1, 2, 3):
        assert_all_finite(checkpoint_state(out, number), f"checkpoint {number}")


def test_a_checkpoint_is_never_written_with_non_finite_weights(engine_shards, tmp_path):
    # A finite gradient can still overflow a weight (a huge learning rate): simulated here.
    result, out, _ = run_with_hook(
        tmp_path, engine_shards, {"train.max_steps": 4}, POISON_AFTER_STEP="2"
    )
    assert result.returncode == 1, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("train: error:")]
    assert errors and all("not finite" in line and "step 2" in line for line in errors), errors
    assert [p.name for p in checkpoints(out)] == ["step_0000001.pt"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000001.pt"


# --- DeepSpeed: the norm that optimizer_step returns is non-finite exactly when it skipped -----

# One process for the three engines (DeepSpeed's import is slow); a finite loss, a NaN
# gradient on one parameter at the second of three steps.
_DEEPSPEED_SCRIPT = r"""
import json, os, sys
import torch
import torch.distributed as dist
from torch import nn
from pipeline.engine.strategy_deepspeed import DeepSpeedStrategy

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, images, targets):
        return {"loss": (self.fc(images) - targets).pow(2).mean()}


def three_steps(stage, clip):
    torch.manual_seed(0)
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    strategy = DeepSpeedStrategy(
        model, optimizer, scheduler, device=torch.device("cpu"), world_size=1, amp="off",
        clip_grad_norm=clip, bucket_mb=1, micro_batch=2, accumulation=1, zero_stage=stage,
    )
    records = []
    for number in range(3):
        images, targets = torch.randn(2, 4), torch.randn(2, 2)
        loss = strategy.forward(images, targets)["loss"]
        handle = None
        if number == 1:
            nan = float("nan")
            handle = model.fc.weight.register_hook(lambda grad: torch.full_like(grad, nan))
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        strategy.backward(loss, 1)
        norm = strategy.optimizer_step()
        if handle is not None:
            handle.remove()
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        records.append({
            "loss": float(loss), "norm": norm, "moved": float((after - before).abs().max()),
            "finite": bool(torch.isfinite(after).all()), "lr_steps": scheduler.last_epoch,
        })
    return records


results = {f"{stage}-{clip}": three_steps(stage, clip) for stage, clip in json.loads(sys.argv[2])}
with open(sys.argv[1], "w") as handle:
    json.dump(results, handle)
"""
CASES = [(0, 0.0), (0, 5.0), (2, 0.0)]


@pytest.fixture(scope="module")
def deepspeed_steps(tmp_path_factory) -> dict:
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("deepspeed_nonfinite") / "records.json"
    result = subprocess.run(
        [sys.executable, "-c", _DEEPSPEED_SCRIPT, str(out), json.dumps(CASES)],
        capture_output=True,
        text=True,
        timeout=300,
        env=train_env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES=""),
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(("stage", "clip"), CASES)
def test_deepspeed_skips_a_non_finite_step_and_says_so(deepspeed_steps, stage, clip):
    first, nan, last = deepspeed_steps[f"{stage}-{clip}"]
    for record in (first, nan, last):
        assert math.isfinite(record["loss"]) and record["finite"]
    # Applied steps report their norm (ZeRO-0 kept none without clipping: the loop could not
    # tell an applied step from a skipped one), the skipped one a non-finite norm.
    assert math.isfinite(first["norm"]) and first["moved"] > 0
    assert not math.isfinite(nan["norm"]) and nan["moved"] == 0
    assert math.isfinite(last["norm"]) and last["moved"] > 0
    assert [r["lr_steps"] for r in (first, nan, last)] == [1, 2, 3]  # the schedule moves on


# --- DDPStrategy in one process: clipping, and fp16's GradScaler skips once --------------------


def one_process_strategy(clip: float):
    from torch import nn

    from pipeline.engine.strategy import DDPStrategy

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    strategy = DDPStrategy(
        model, optimizer, scheduler, device=torch.device("cpu"), world_size=1, amp="off",
        clip_grad_norm=clip, bucket_mb=1,
    )  # fmt: skip
    return strategy, model, scheduler


def flat(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_clipping_uses_the_norm_it_checked():
    strategy, model, _ = one_process_strategy(clip=0.01)
    reference = torch.nn.Linear(4, 2)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    strategy.backward((model(x) - y).pow(2).mean(), 1)
    (reference(x) - y).pow(2).mean().backward()
    expected_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01))
    before = flat(model)
    assert strategy.optimizer_step() == pytest.approx(expected_norm, rel=1e-6)
    expected = torch.cat([p.grad.flatten() for p in reference.parameters()])
    torch.testing.assert_close(before - flat(model), 0.1 * expected)


def test_fp16_scaler_skips_a_non_finite_step_once():
    # GradScaler("cuda") needs a GPU; the CPU one follows the same rules.
    strategy, model, scheduler = one_process_strategy(clip=0.0)
    strategy.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    handle = model.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    strategy.backward((model(x) - y).pow(2).mean(), 1)
    handle.remove()
    before = flat(model)
    assert strategy.optimizer_step() == float("inf")
    assert torch.equal(flat(model), before) and scheduler.last_epoch == 1
    assert strategy.scaler.get_scale() == 2.0**15  # halved once, not twice
    strategy.backward((model(x) - y).pow(2).mean(), 1)
    assert math.isfinite(strategy.optimizer_step()) and not torch.equal(flat(model), before)
    assert strategy.scaler.get_scale() == 2.0**15 and scheduler.last_epoch == 2
