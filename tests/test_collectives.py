"""pipeline.collectives: the cross-rank helpers, in two real processes, and the rule that no
other module of the pipeline makes a collective call of its own."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Where collectives may be called: the helpers, the strategies (they own the gradient
# reduction and the checkpoint hand-shake), the synchronized BatchNorm (a collective inside
# the model's autograd graph) and the process-group set-up.
ALLOWED = {
    "pipeline/collectives.py",
    "pipeline/distributed.py",
    "pipeline/engine/strategy.py",
    "pipeline/engine/strategy_deepspeed.py",
    "pipeline/engine/sync_bn.py",
}
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "all_to_all",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "new_group",
    "reduce",
    "reduce_scatter",
    "scatter",
    "scatter_object_list",
    "monitored_barrier",
}


def collective_calls(path: Path) -> list[str]:
    """``name (line N)`` of each call of a torch.distributed collective in ``path``: through
    any alias of ``torch.distributed`` (``dist.barrier()``) or a name imported from it."""
    tree = ast.parse(path.read_text())
    aliases, imported = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("torch.distributed"):
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "torch.distributed"
        ):
            for alias in node.names:
                if alias.name in COLLECTIVES:
                    imported.add(alias.asname or alias.name)
                else:  # a submodule: torch.distributed.nn.functional as dist_fn
                    aliases.add(alias.asname or alias.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in COLLECTIVES:
            owner = ast.unparse(func.value)
            if owner in aliases or owner.startswith("torch.distributed"):
                found.append(f"{owner}.{func.attr} (line {node.lineno})")
        elif isinstance(func, ast.Name) and func.id in imported:
            found.append(f"{func.id} (line {node.lineno})")
    return found


def test_the_scan_sees_each_way_of_calling_a_collective(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch.distributed as dist\nimport torch\n"
        "from torch.distributed import all_reduce as ar\n"
        "dist.all_reduce(x)\ntorch.distributed.barrier()\nar(x)\nother.all_reduce(x)\n"
    )
    assert collective_calls(sample) == [
        "dist.all_reduce (line 4)",
        "torch.distributed.barrier (line 5)",
        "ar (line 6)",
    ]


def test_no_collective_outside_the_helpers_and_the_strategies():
    offenders = {}
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative not in ALLOWED and (calls := collective_calls(path)):
            offenders[relative] = calls
    assert not offenders, f"collectives outside pipeline/collectives.py: {offenders}"


WORKER = textwrap.dedent(
    """
    import sys
    import torch
    from pipeline import collectives as c
    from pipeline.distributed import init_distributed, shutdown_distributed
    info = init_distributed(timeout_s=60)
    r = info.rank
    results = [
        c.world_size(),
        c.sum_across_ranks([r + 1.0, 10.0 * r]),
        c.mean_across_ranks(r + 1.0),
        c.any_rank([r == 1, False]),
        c.all_gather_objects({"rank": r}),
        c.gather_objects(f"r{r}"),
        c.broadcast_object("from rank 0" if r == 0 else None),
        c.broadcast_object("patient" if r == 0 else None, group=c.patient_cpu_group()),
        c.any_rank_tensor(torch.tensor([r == 1, False])).tolist(),
        c.mean_tensor_across_ranks(torch.tensor(r + 1.0)).item(),
    ]
    c.barrier()
    with open(f"{sys.argv[1]}/rank{r}.txt", "w") as handle:  # one file each: no interleaving
        handle.write(repr(results))
    shutdown_distributed()
    """
)


@pytest.mark.slow
def test_helpers_under_two_real_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    common = [2, [3.0, 10.0], 1.5, [True, False], [{"rank": 0}, {"rank": 1}]]
    assert results == [
        repr([*common, ["r0", "r1"], "from rank 0", "patient", [True, False], 1.5]),
        repr([*common, None, "from rank 0", "patient", [True, False], 1.5]),
    ]


def test_helpers_without_a_group_return_their_input():
    from pipeline import collectives as c

    assert c.world_size() == 1
    assert c.sum_across_ranks([1, 2.5]) == [1.0, 2.5] and c.mean_across_ranks(3) == 3.0
    assert c.any_rank([True, False]) == [True, False]
    assert c.all_gather_objects("x") == ["x"] and c.gather_objects("x") == ["x"]
    assert c.broadcast_object("x") == "x" and c.patient_cpu_group() is None
    c.barrier()


class RecordedTensor:
    """Stands in for a CUDA tensor (none here): records where and how it is copied."""

    def __init__(self, device: str, copies: list):
        import torch

        self.device = torch.device(device)
        self.copies = copies

    def to(self, device, dtype=None, non_blocking=False, copy=False):
        self.copies.append((str(device), non_blocking))
        return RecordedTensor(str(device), self.copies)

    def __gt__(self, other):
        return self


@pytest.mark.parametrize(
    ("backend", "place", "non_blocking"),
    [
        # NCCL serves CUDA tensors: the flag stays on its GPU and the copy is queued, no wait.
        ("cpu:gloo,cuda:nccl", "cuda:3", True),
        ("nccl", "cuda:3", True),
        # gloo alone on a CUDA run: the flag must have reached the CPU before gloo reads it.
        ("gloo", "cpu", False),
    ],
)
def test_device_flags_go_where_the_backend_serves_them(monkeypatch, backend, place, non_blocking):
    from pipeline import collectives as c

    reduced = []
    monkeypatch.setattr(c, "world_size", lambda: 2)
    monkeypatch.setattr(c.dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(c.dist, "all_reduce", lambda t, op=None: reduced.append(str(t.device)))
    monkeypatch.setattr(c.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(c.torch.cuda, "current_device", lambda: 3)
    copies = []
    c.any_rank_tensor(RecordedTensor("cuda:3", copies))
    # There, reduced, and back to the flag's GPU (queued: a copy from the CPU waits anyway).
    assert copies == [(place, non_blocking), ("cuda:3", True)]
    assert reduced == [place]
