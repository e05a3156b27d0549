"""A real ``mlflow server`` on 127.0.0.1, started, stopped, frozen and restarted by the tests;
and, on a machine with one GPU, the multi-process tests' workers kept off it.

A server keeps its port and its SQLite backend store across ``stop``/``kill`` and a later
``start``, so a test can take it away in the middle of a run and bring the same one back.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def multi_process_tests_fit_the_gpus():
    """The tests start 2-process jobs. On a machine with one GPU both ranks would take
    cuda:0, which NCCL refuses, so there the jobs the tests start see no GPU and run on the
    CPU with gloo, as on a machine without one; this process keeps its GPU for the CUDA
    tests (it reads the device list once, at its CUDA initialisation, done first here).
    With 2 or more GPUs every job gets them."""
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        torch.cuda.init()
        previous = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        yield
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous
    else:
        yield


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0):
        """Start (again) on the same port and backend store; return once it is healthy."""
        mlflow = Path(sys.executable).with_name("mlflow")
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [
                str(mlflow),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'server.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            # The job runner is a second heavy process that these tests do not need.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            start_new_session=True,  # its own process group, so stop() ends the workers too
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited: {(self.root / 'server.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not come up on {self.uri} in {timeout}s")

    def stop(self):
        """Shut the server down gracefully (SIGTERM), or kill it after 20 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self._signal(signal.SIGCONT)  # a frozen server cannot shut down
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self):
        """The server crashes: SIGKILL to all its processes; connections are refused."""
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGKILL)
            self.process.wait()

    def freeze(self):
        """The server hangs: connections are accepted (backlog) but never answered."""
        self._signal(signal.SIGSTOP)

    def thaw(self):
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)  # its own process group: the uvicorn workers too


def _serve(root: Path, start: bool = True):
    root.mkdir()
    server = MlflowServer(root)
    if start:
        server.start()
    return server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One server shared by the module's tests (each makes its own runs)."""
    server = _serve(tmp_path_factory.mktemp("mlflow") / "server")
    yield server
    server.kill()  # a graceful stop can take minutes on a loaded machine


@pytest.fixture
def disposable_mlflow_server(tmp_path):
    """A running server of the test's own, which the test may kill, freeze and restart."""
    server = _serve(tmp_path / "mlflow-server")
    yield server
    server.kill()


@pytest.fixture
def unstarted_mlflow_server(tmp_path):
    """A server of the test's own that is down until the test calls ``start()``."""
    server = _serve(tmp_path / "mlflow-server", start=False)
    yield server
    server.kill()


@pytest.fixture
def unreachable_uri() -> str:
    """An http URI on which nothing listens: every connection is refused."""
    return f"http://127.0.0.1:{free_port()}"
