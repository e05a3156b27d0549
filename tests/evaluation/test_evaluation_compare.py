"""launch/compare.py on two real runs of an MLflow server: the table and the PNG."""

import importlib.util

import pytest
from evaluation_helpers import REPO
from PIL import Image

from pipeline.tracking import Tracker


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_runs(mlflow_server, tmp_path_factory):
    ids = []
    for lr, name in ((0.02, "fast"), (0.01, "slow")):
        run_dir = tmp_path_factory.mktemp(name)
        with Tracker(run_dir=run_dir, stage="train", uri=mlflow_server.uri,
                     experiment="compare-tests", run_name=name) as tracker:  # fmt: skip
            tracker.log_params({"train": {"lr": lr, "max_steps": 4}, "model": {"depth": 18}})
            for step in range(1, 5):
                tracker.log_metrics({"loss/total": lr * 100 / step}, step=step)
                if step % 2 == 0:
                    tracker.log_metrics({"eval/segm/AP": step * lr}, step=step)
            ids.append(tracker.run_id)
    return ids


@pytest.mark.slow  # the MLflow server takes seconds to start
def test_compare_two_runs(two_runs, mlflow_server, tmp_path, capsys):
    compare = load_script("compare")
    out = tmp_path / "curves.png"
    code = compare.main([*two_runs, "--uri", mlflow_server.uri, "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    lr_row = next(line for line in lines if line.startswith("train.lr"))
    assert lr_row.split()[1:] == ["0.02", "0.01"]
    assert not any(line.startswith(("model.depth", "train.max_steps")) for line in lines)
    loss_row = next(line for line in lines if line.startswith("loss/total"))
    assert loss_row.split()[1:] == ["0.5000", "0.2500"]  # the final values, side by side
    ap_row = next(line for line in lines if line.startswith("eval/segm/AP"))
    assert ap_row.split()[1:] == ["0.0800", "0.0400"]
    assert "fast (" in printed and "slow (" in printed
    with Image.open(out) as picture:
        picture.verify()
        assert picture.format == "PNG" and picture.size[0] > 300


@pytest.mark.slow
def test_compare_an_experiment_with_a_filter(two_runs, mlflow_server, tmp_path, capsys):
    compare = load_script("compare")
    search = ["--experiment", "compare-tests", "--filter", "params.train.lr = '0.01'"]
    code = compare.main([*search, "--uri", mlflow_server.uri, "--out", str(tmp_path / "a.png")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "slow (" in printed and "fast (" not in printed
    assert printed.startswith("param: none")  # one run: nothing differs
    assert compare.main(["--experiment", "nope", "--uri", mlflow_server.uri]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err
