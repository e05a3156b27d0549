"""launch/compare.py on two real runs of an MLflow server: the table and the PNG."""

import importlib.util
import subprocess

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
                if step % 2 == 0:  # two datasets' evaluations of one checkpoint
                    tracker.log_metrics({"shapes_val/segm/AP": step * lr}, step=step)
                    tracker.log_metrics({"other_val/segm/AP": step * lr / 2}, step=step)
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
    # By default every dataset's AP: a row per dataset, the runs side by side.
    ap_row = next(line for line in lines if line.startswith("shapes_val/segm/AP"))
    assert ap_row.split()[1:] == ["0.0800", "0.0400"]
    other_row = next(line for line in lines if line.startswith("other_val/segm/AP"))
    assert other_row.split()[1:] == ["0.0400", "0.0200"]
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
    # An unquoted value (params are strings) gave a 40-line MLflow traceback.
    unquoted = ["--experiment", "compare-tests", "--filter", "params.train.lr == 0.5"]
    assert compare.main([*unquoted, "--uri", mlflow_server.uri]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(
        "compare: error: --filter 'params.train.lr == 0.5': Expected a quoted string value"
    )


@pytest.mark.slow
def test_an_unknown_metric_is_refused_naming_the_known_ones(two_runs, mlflow_server, capsys):
    compare = load_script("compare")
    code = compare.main([*two_runs, "--uri", mlflow_server.uri, "--metrics", "loss/totl"])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert error[0].startswith("compare: error: --metrics: loss/totl: logged by none of the runs")
    assert "loss/total, other_val/segm/AP, shapes_val/segm/AP" in error[0]
    # A pattern that matches nothing is refused the same way.
    assert compare.main([*two_runs, "--uri", mlflow_server.uri, "--metrics", "*/segm/AR"]) == 2
    assert "--metrics: */segm/AR: logged by none of the runs" in capsys.readouterr().err


@pytest.mark.slow
def test_patterns_pick_every_datasets_metric(two_runs, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.evaluation.compare import compare_runs

    out = tmp_path / "ap.png"
    text, _ = compare_runs(MlflowClient(tracking_uri=mlflow_server.uri), run_ids=two_runs,
                           metrics=["other_*/segm/AP"], out=out)  # fmt: skip
    rows = [line.split()[0] for line in text.splitlines()[text.splitlines().index("") + 1 :]]
    assert rows[2] == "other_val/segm/AP"  # the pattern's matches first, then the summary
    assert "shapes_val/segm/AP" in rows and "loss/total" in rows
    assert out.stat().st_size > 0


class FakeClient:
    """The MlflowClient calls of select_runs, on no runs; search parses the filter as MLflow's
    stores do."""

    def get_experiment_by_name(self, name):
        from types import SimpleNamespace

        return SimpleNamespace(experiment_id="1")

    def search_runs(self, experiment_ids, filter_string="", **kwargs):
        from mlflow.utils.search_utils import SearchUtils

        SearchUtils.parse_search_filter(filter_string)
        return []


def test_a_filter_mlflow_cannot_parse_is_one_line():
    from pipeline.evaluation.compare import CompareError, select_runs

    with pytest.raises(CompareError) as error:
        select_runs(FakeClient(), experiment="e", filter_string="params.train.lr == 0.5")
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("--filter 'params.train.lr == 0.5': Expected a quoted")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give run ids, or --experiment (and --filter)"),
        (["abc", "--experiment", "e"], "give run ids or --experiment, not both"),
        (["abc", "--filter", "tags.stage = 'train'"], "--filter goes with --experiment"),
    ],
)
def test_the_command_line_says_what_is_missing(argv, message, capsys, tmp_path):
    # Without arguments it said "give run ids or --experiment, not both".
    compare = load_script("compare")
    with pytest.raises(SystemExit) as exit_info:
        compare.main([*argv, "--uri", f"sqlite:///{tmp_path}/unused.db"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")


def test_the_default_picture_and_downloaded_weights_stay_out_of_git():
    # compare.png landed in the current folder, and neither it nor pretrained/ was ignored.
    compare = load_script("compare")
    out = compare.build_parser().parse_args(["abc"]).out
    assert out.startswith("outputs/")
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", out, "pretrained/maskrcnn_r50_fpn_coco.pt"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert ignored.stdout.split() == [out, "pretrained/maskrcnn_r50_fpn_coco.pt"]
