"""pipeline.distributed's expansion of Slurm host lists agrees with Slurm's own."""

import os
import subprocess

import pytest

from pipeline.distributed import expand_hostlist

HOSTLISTS = [
    "node[01-03,07],gpu5",
    "a[8-10]",
    "n[001-3]",
    "r[1-2]n[1-2]",
    "n[1-2],m[3]",
    "x[1],y",
    "single",
]


@pytest.mark.parametrize("hostlist", HOSTLISTS)
def test_expand_hostlist_agrees_with_scontrol(slurm_commands, tmp_path, hostlist):
    conf = tmp_path / "slurm.conf"  # `show hostnames` needs a config, not a controller
    conf.write_text("ClusterName=hostlist\nSlurmctldHost=localhost\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    out = subprocess.run(
        ["scontrol", "show", "hostnames", hostlist],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == expand_hostlist(hostlist)
