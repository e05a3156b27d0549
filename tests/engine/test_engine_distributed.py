"""The train stage under real torchrun processes (gloo on the CPU): DDP against one process,
a world-size change on resume, DeepSpeed ZeRO-2, two nodes, a killed worker, SIGTERM."""

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time

import pytest
import torch
from engine_helpers import (
    checkpoint_state,
    free_port,
    run_train,
    start_train,
    tiny_overrides,
    train_command,
    train_env,
)

pytestmark = pytest.mark.slow

# Sampling that takes every anchor and proposal leaves nothing random in a step, and GroupNorm
# has no batch statistics: what is left to differ between 1 and 2 processes is how the loss
# means are split over the ranks.
DETERMINISTIC = {
    "model.backbone.norm": "gn",
    "model.rpn.batch_size_per_image": 1000000,
    "model.rpn.positive_fraction": 1.0,
    "model.roi_heads.batch_size_per_image": 1000000,
    "model.roi_heads.positive_fraction": 1.0,
    "data.flip_prob": 0.0,
    "input.min_size_train": [128],
}


def assert_ok(result, what):
    assert result.returncode == 0, (
        f"{what} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


def metric_steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_process_ddp_matches_one_process_on_the_same_global_batch(engine_shards, tmp_path):
    common = {
        **DETERMINISTIC,
        "train.max_steps": 3,
        "train.checkpoint_every": 3,
        "train.lr": 0.01,
        "train.warmup_iters": 0,
        "data.num_workers": 0,
    }
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(
        run_train(0, tiny_overrides(engine_shards, one, **common, **{"train.batch_size": 2})),
        "1 process",
    )
    assert_ok(
        run_train(2, tiny_overrides(engine_shards, two, **common, **{"train.batch_size": 1})),
        "2 processes",
    )
    # Both start from the same seeded initialisation.
    a, b = checkpoint_state(one, 3)["model"], checkpoint_state(two, 3)["model"]
    # Relative difference of the final weights: the per-rank loss means make it nonzero, a
    # missing gradient all-reduce or a different batch makes it orders of magnitude larger.
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a if a[k].is_floating_point())
    den = sum(float(a[k].norm() ** 2) for k in a if a[k].is_floating_point())
    assert (num / den) ** 0.5 < 2e-3


def test_resume_on_fewer_processes_continues_the_epoch(engine_shards, tmp_path):
    out = tmp_path / "run"
    common = {"train.checkpoint_every": 2, "train.keep_checkpoints": 0, "data.epoch_samples": 1000}
    assert_ok(
        run_train(2, tiny_overrides(engine_shards, out, **common, **{"train.max_steps": 2})),
        "2-process part",
    )
    before = checkpoint_state(out, 2)["loader"]
    assert_ok(
        run_train(0, tiny_overrides(engine_shards, out, **common, **{"train.max_steps": 4})),
        "1-process resume",
    )
    after = checkpoint_state(out, 4)["loader"]
    assert before["epoch"] == after["epoch"] == 0
    # 2 steps x 2 ranks x 2 images, then 2 steps x 1 rank x 2 images
    assert before["samples_consumed"] == 8 and after["samples_consumed"] == 12
    assert metric_steps(out) == [1, 2, 3, 4]


def test_deepspeed_zero2_trains_checkpoints_and_resumes(engine_shards, tmp_path):
    out = tmp_path / "ds"
    common = {
        "distributed.strategy": "deepspeed",
        "distributed.zero_stage": 2,
        "train.checkpoint_every": 2,
        "train.clip_grad_norm": 5.0,
    }
    assert_ok(
        run_train(2, tiny_overrides(engine_shards, out, **common, **{"train.max_steps": 2})),
        "DeepSpeed",
    )
    entry = out / "checkpoints" / "step_0000002"
    assert (entry / "mp_rank_00_model_states.pt").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    result = run_train(2, tiny_overrides(engine_shards, out, **common, **{"train.max_steps": 4}))
    assert_ok(result, "DeepSpeed resume")
    assert "resumed from" in result.stderr and "at step 2" in result.stderr
    states = torch.load(
        out / "checkpoints" / "step_0000004" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )
    assert states["step"] == 4 and "module" in states
    assert metric_steps(out) == [1, 2, 3, 4]


def netns_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["ip", "netns", "add", "mrcnn_probe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "mrcnn_probe"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair (VERIFIED.md), or None where impossible."""
    if not netns_available():
        yield None
        return
    tag = f"{os.getpid() % 10000}"
    h1, h2, v1, v2 = f"mh1_{tag}", f"mh2_{tag}", f"mv1_{tag}", f"mv2_{tag}"
    commands = [
        ["ip", "netns", "add", h1],
        ["ip", "netns", "add", h2],
        ["ip", "link", "add", v1, "type", "veth", "peer", "name", v2],
        ["ip", "link", "set", v1, "netns", h1],
        ["ip", "link", "set", v2, "netns", h2],
        ["ip", "-n", h1, "addr", "add", "10.251.0.1/24", "dev", v1],
        ["ip", "-n", h2, "addr", "add", "10.251.0.2/24", "dev", v2],
        ["ip", "-n", h1, "link", "set", "lo", "up"],
        ["ip", "-n", h2, "link", "set", "lo", "up"],
        ["ip", "-n", h1, "link", "set", v1, "up"],
        ["ip", "-n", h2, "link", "set", v2, "up"],
    ]
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)
        yield [(h1, v1, "10.251.0.1"), (h2, v2, "10.251.0.2")]
    finally:
        for name in (h1, h2):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_two_nodes_with_c10d_rendezvous(engine_shards, tmp_path, two_hosts):
    out = tmp_path / "multinode"
    overrides = tiny_overrides(engine_shards, out, **{"train.max_steps": 2})
    port = free_port()
    agents = []
    for node in range(2):
        if two_hosts is None:  # no namespaces here: both "nodes" on the loopback
            prefix, host_env, endpoint = [], {}, f"127.0.0.1:{port}"
            extra = ["--rdzv-conf", "is_host=1"] if node == 0 else []
        else:
            namespace, veth, address = two_hosts[node]
            prefix, host_env = ["ip", "netns", "exec", namespace], {"GLOO_SOCKET_IFNAME": veth}
            endpoint = f"{two_hosts[0][2]}:{port}"
            extra = ["--local-addr", address] + (["--rdzv-conf", "is_host=1"] if node == 0 else [])
        command = train_command(1, overrides)
        start = command.index("--nproc-per-node=1")
        command[start + 1 : start + 3] = [
            "--nnodes=2",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=multinode-test",
            *extra,
        ]
        agents.append(start_train(prefix + command, env=train_env(**host_env)))
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert checkpoint_state(out)["world_size"] == 2
    assert "2 process(es) (2 nodes" in outputs[0]


def test_a_killed_worker_is_restarted_and_the_run_finishes(engine_shards, tmp_path):
    out = tmp_path / "elastic"
    overrides = tiny_overrides(
        engine_shards,
        out,
        **{
            "train.max_steps": 8,
            "train.checkpoint_every": 2,
            "train.keep_checkpoints": 0,
        },
    )
    agent = start_train(train_command(2, overrides, "--max-restarts=1"), start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "step_0000004.pt").exists():
            assert time.monotonic() < deadline and agent.poll() is None, "no checkpoint appeared"
            time.sleep(0.2)
        workers = subprocess.run(
            ["pgrep", "-f", "-P", str(agent.pid), "launch/train.py"], capture_output=True, text=True
        ).stdout.split()
        assert workers, "no worker process found"
        os.kill(int(workers[-1]), signal.SIGKILL)
        output = agent.communicate(timeout=300)[0]
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode == 0, output[-4000:]
    assert "resumed from" in output
    assert checkpoint_state(out)["step"] == 8 and (out / "checkpoints" / "FINISHED").exists()
    steps = metric_steps(out)
    assert steps == sorted(set(steps)) and steps[-1] == 8  # the curve continues, no repeats


def test_sigterm_checkpoints_exits_75_and_resumes(engine_shards, tmp_path):
    out = tmp_path / "preempted"
    overrides = tiny_overrides(
        engine_shards, out, **{"train.max_steps": 200, "train.checkpoint_every": 1000}
    )
    process = start_train(train_command(0, overrides))
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or len(metric_steps(out)) < 2:
        assert time.monotonic() < deadline and process.poll() is None, "training did not start"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 75, output[-3000:]
    stopped_at = checkpoint_state(out)["step"]
    assert 2 <= stopped_at < 200 and not (out / "checkpoints" / "FINISHED").exists()
    resumed = run_train(
        0,
        tiny_overrides(
            engine_shards,
            out,
            **{"train.max_steps": stopped_at + 2, "train.checkpoint_every": 1000},
        ),
    )
    assert_ok(resumed, "resume after SIGTERM")
    assert checkpoint_state(out)["step"] == stopped_at + 2


def corrupt_every_image(source, target):
    """A copy of the shards whose every image member is garbage (the tars stay valid)."""
    target.mkdir()
    for path in source.iterdir():
        if path.suffix != ".tar":
            shutil.copy(path, target / path.name)
            continue
        with tarfile.open(path) as tar_in, tarfile.open(target / path.name, "w") as tar_out:
            for member in tar_in.getmembers():
                data = tar_in.extractfile(member).read()
                if not member.name.endswith(".json"):
                    data = b"not an image" * 10
                    member.size = len(data)
                tar_out.addfile(member, io.BytesIO(data))


def test_a_rank_that_cannot_get_a_sample_stops_the_job(engine_shards, tmp_path):
    broken = tmp_path / "broken"
    corrupt_every_image(engine_shards["train"], broken)
    shards = {**engine_shards, "train": broken}
    out = tmp_path / "run"
    overrides = tiny_overrides(shards, out, **{"data.max_decode_failures": 5})
    started = time.monotonic()
    result = run_train(2, overrides, timeout=240)
    assert result.returncode != 0
    assert time.monotonic() - started < 200  # stopped, did not wait on the all-reduce
    line = next(x for x in result.stderr.splitlines() if "train: error: SampleDecodeError" in x)
    assert ".tar" in line


def test_sync_bn_learns_under_two_process_ddp(engine_shards, tmp_path):
    from test_engine_train import LEARNING, assert_learns

    out = tmp_path / "sync_bn"
    overrides = {"model.backbone.norm": "sync_bn", **LEARNING, "train.batch_size": 1}
    assert_ok(run_train(2, tiny_overrides(engine_shards, out, **overrides)), "sync_bn")
    assert_learns(out, "sync_bn")
