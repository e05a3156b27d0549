"""A one-node Slurm cluster on this machine, for the Slurm job-script tests.

``LocalSlurm`` installs Debian's Slurm and MUNGE packages when they are missing, writes a
private ``slurm.conf`` (its own ports, state, spool, logs and MUNGE socket, all under one
temporary directory, so it never touches a system Slurm), starts munged, slurmctld and
slurmd in the foreground as child processes, and stops everything it started: the jobs,
the job-step daemons and any process that still carries its ``SLURM_CONF``.

Everything here needs root (the daemons run as root, munged as the ``munge`` user);
``unavailable_reason()`` says why the cluster cannot be had instead of failing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "munge", "slurm-client"]
DAEMONS = ["slurmctld", "slurmd", "munged", "sbatch", "scontrol"]
MUNGE_KEY = Path("/etc/munge/munge.key")


def _missing_binaries() -> list[str]:
    search = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [name for name in DAEMONS if shutil.which(name, path=search) is None]


def unavailable_reason(install: bool = True) -> str | None:
    """None when a local cluster can be started; otherwise why not (installing if allowed)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the Slurm tests start slurmctld, slurmd and munged, which needs root"
    if not _missing_binaries():
        return None
    if not install:
        return f"Slurm is not installed (missing {', '.join(_missing_binaries())})"
    if shutil.which("apt-get") is None:
        return f"Slurm is missing ({', '.join(_missing_binaries())}) and there is no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` did not finish in 15 minutes"
        if result.returncode != 0:
            tail = " ".join((result.stderr or result.stdout).split())[-300:]
            return f"`{' '.join(cmd)}` failed ({result.returncode}): {tail}"
    if _missing_binaries():
        return f"apt-get installed {PACKAGES} but {', '.join(_missing_binaries())} are missing"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class LocalSlurm:
    """munged + slurmctld + slurmd for this host, configured under ``workdir``."""

    def __init__(self, workdir: str | Path, cpus: int | None = None):
        self.workdir = Path(workdir).resolve()
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.workdir / "slurm.conf"
        # munged runs as the munge user, who cannot enter pytest's private (0700) temporary
        # directories: its socket, seed and log live in a directory of their own in /tmp.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="pipeline-test-munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.env["PATH"] = self.env.get("PATH", "") + ":/usr/sbin:/sbin"
        for name in list(self.env):  # a test run inside a Slurm job must not leak its job
            if name.startswith("SLURM_") and name != "SLURM_CONF":
                del self.env[name]
        self._procs: dict[str, subprocess.Popen] = {}

    # --- set-up ------------------------------------------------------------------------

    def write_config(self):
        for sub in ("state", "spool", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = _free_port(), _free_port()
        w = self.workdir
        self.conf.write_text(
            f"""# Written by tests/slurm/slurm_helpers.py: a private one-node cluster.
ClusterName=pipelinetest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd.pid
SlurmctldLogFile={w}/log/slurmctld.log
SlurmdLogFile={w}/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Keep finished jobs visible to `scontrol show job` (no accounting here) for 10 minutes.
MinJobAge=600
# Schedule at once on every event instead of every minute: the tests chain short jobs.
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1,sched_min_interval=100000
KillWait=15
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
"""
        )

    def _prepare_munge(self):
        import pwd

        munge = pwd.getpwnam("munge")
        if not MUNGE_KEY.exists():
            subprocess.run(["mungekey", "-c", "-k", str(MUNGE_KEY)], check=True)
            os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
            MUNGE_KEY.chmod(0o600)
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        self.munge_dir.chmod(0o755)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        return munge

    def _spawn(self, name: str, cmd: list[str], **kwargs):
        log = open(self.workdir / "log" / f"{name}.out", "ab")  # noqa: SIM115 (kept open)
        self._procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            **kwargs,
        )  # fmt: skip
        log.close()

    def start(self, timeout: float = 90.0):
        self.write_config()
        munge = self._prepare_munge()
        m = self.munge_dir
        self._spawn(
            "munged",
            ["munged", "-F", f"--socket={self.munge_socket}", f"--pid-file={m}/munged.pid",
             f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed",
             f"--key-file={MUNGE_KEY}"],
            user=munge.pw_uid, group=munge.pw_gid, cwd=m,
        )  # fmt: skip
        _wait_for(self.munge_socket.exists, 20, f"munged's socket {self.munge_socket}", 0.2)
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        _wait_for(self._node_ready, timeout, f"node {self.host} to become idle ({self.logs()})")

    def _node_ready(self) -> bool:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {self.logs()}")
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout
        return out.strip().rstrip("*") in ("idle", "mixed", "allocated")

    def logs(self, tail: int = 1500) -> str:
        parts = []
        for path in [*sorted((self.workdir / "log").glob("*")), self.munge_dir / "munged.log"]:
            if path.exists():
                parts.append(f"--- {path.name}: {path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # --- use -----------------------------------------------------------------------------

    def run(self, cmd: list[str], check: bool = True, env: dict | None = None, **kwargs):
        result = subprocess.run(
            cmd, capture_output=True, text=True, env={**self.env, **(env or {})}, timeout=60,
            **kwargs,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
        return result

    def job(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty when Slurm no longer knows the job)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False).stdout
        fields = {}
        for line in out.splitlines()[:1]:
            for match in re.finditer(r"(\w[\w:/]*)=(\S*)", line):
                fields.setdefault(match.group(1), match.group(2))
        return fields

    def array_states(self, job_id: str | int) -> list[str]:
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False).stdout
        return re.findall(r"JobState=(\S+)", out)

    def wait_finished(self, job_ids, timeout: float) -> dict[str, list[str]]:
        """Wait until every job (every array task) has left PENDING/RUNNING; their states."""
        final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

        def done():
            states = {str(j): self.array_states(j) for j in job_ids}
            if all(s and all(x in final for x in s) for s in states.values()):
                return states
            return None

        return _wait_for(done, timeout, f"jobs {list(job_ids)} to finish", 1.0)

    # --- tear-down -----------------------------------------------------------------------

    def _our_pids(self) -> list[int]:
        """Processes left by our jobs: job-step daemons holding our spool directory open,
        and any process whose environment carries our SLURM_CONF (the jobs inherit it)."""
        mine, marker = [], f"SLURM_CONF={self.conf}".encode()
        spool = str(self.workdir / "spool")
        daemons = {p.pid for p in self._procs.values()}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in (os.getpid(), *daemons):
                continue
            try:
                environ = (entry / "environ").read_bytes()
                holds_spool = any(
                    os.readlink(fd).startswith(spool) for fd in (entry / "fd").iterdir()
                )
            except OSError:
                continue
            if marker in environ.split(b"\0") or holds_spool:
                mine.append(int(entry.name))
        return mine

    def stop(self):
        """Cancel every job, stop the daemons and kill whatever our jobs left behind."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run(["scancel", "--quiet", "--user=root"], check=False)
            with contextlib.suppress(TimeoutError, RuntimeError):
                _wait_for(
                    lambda: not self.run(["squeue", "-h"], check=False).stdout.strip(),
                    30, "jobs to drain",
                )  # fmt: skip
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        for pid in self._our_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def __enter__(self) -> LocalSlurm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
