"""A user's own COCO-format dataset, end to end: the README section "Train on your own
COCO-format data" run as written (its commands are read from the README, with the test's
paths and the tiny config put in), on a generated dataset unlike the shapes (5 categories
with ids 3, 7, 11, 42, 90, several image sizes, grayscale and PNG files, RLE and polygons).
And model.num_classes: auto resolves from the training shards, a number that disagrees
stops training before its first step."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from journey_data import CATEGORY_IDS, CATEGORY_NAMES, make_journey_dataset

from pipeline.config import ConfigError, load_config
from pipeline.data import read_manifest
from pipeline.data.shapes import make_shapes_dataset
from pipeline.data.sharding import build_shards
from pipeline.rundir import latest_entry

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SECTION = "## Train on your own COCO-format data"


def env() -> dict[str, str]:
    values = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    values.pop("MLFLOW_TRACKING_URI", None)
    return values


def section_commands() -> list[list[str]]:
    """The commands of the README section's bash block, continuation lines joined, as words."""
    readme = (REPO / "README.md").read_text()
    assert SECTION in readme, f"README.md has no section {SECTION!r}"
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    lines = (line.split("#", 1)[0].strip() for line in block.splitlines())
    return [shlex.split(line) for line in lines if line]


def localize(words: list[str], data: Path, out: Path) -> list[str]:
    """A README command for this test: its paths under tmp, the tiny config on 2 processes
    instead of base.yaml on 8 and without COCO weights, no MLflow."""
    words = [w.replace("data/mine", str(data)).replace("outputs/mine", str(out)) for w in words]
    if words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    elif words[0] == "python":
        words = [sys.executable, *words[1:]]
    words = ["--nproc-per-node=2" if w.startswith("--nproc-per-node=") else w for w in words]
    if "--config" in words:
        words[words.index("--config") + 1] = str(TINY)
    words = [w for w in words if not w.startswith("train.init_from=")]
    script = next(w for w in words if w.startswith("launch/"))
    extra = {
        "launch/build_shards.py": ["--no-tracking", "--no-progress"],
        "launch/train.py": ["tracking.enabled=false"],
        # the model of 6 steps scores nothing at 0.5: the ids and names show in detections
        "launch/predict.py": ["--device", "cpu", "--score-threshold", "0.05"],
    }
    return words + extra.get(script, [])


def run(words: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    result = subprocess.run(words, cwd=REPO, env=env(), capture_output=True, text=True,
                            timeout=timeout)  # fmt: skip
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{shlex.join(words)}\n{output[-4000:]}"
    print(f"{seconds:6.1f} s  {shlex.join(words[1:3])}", flush=True)  # the journey's timings
    return result


def detections_in(value) -> list[dict]:
    """Every object with a "category_id" anywhere in a JSON value."""
    if isinstance(value, dict):
        found = [value] if "category_id" in value else []
        return found + [d for v in value.values() for d in detections_in(v)]
    if isinstance(value, list):
        return [d for v in value for d in detections_in(v)]
    return []


@pytest.mark.slow
def test_readme_own_data_section_end_to_end(tmp_path):
    data, out = tmp_path / "mine", tmp_path / "out"
    make_journey_dataset(data)
    commands = section_commands()
    scripts = [next(w for w in c if w.startswith("launch/")) for c in commands]
    assert scripts == ["launch/build_shards.py", "launch/build_shards.py", "launch/train.py",
                       "launch/evaluate.py", "launch/predict.py"]  # fmt: skip
    # The README's training command, as written, leaves the class count to the shards.
    train_words = commands[2]
    overrides = [w for w in train_words if "=" in w and not w.startswith("-")]
    readme_cfg = load_config(REPO / train_words[train_words.index("--config") + 1], overrides)
    assert readme_cfg.model.num_classes == "auto"

    # 1-2. the shards: the source's category ids, names and contiguous indices
    for words, split, images in zip(commands[:2], ("train", "val"), (48, 12), strict=True):
        run(localize(words, data, out))
        manifest = read_manifest(data / "shards" / split)
        assert [(c["id"], c["name"]) for c in manifest.categories] == list(CATEGORY_NAMES.items())
        assert manifest.num_classes == 6 and manifest.total_samples == images

    # 3. training resolves num_classes=6 from the manifest and keeps "auto" in config.yaml
    result = run(localize(commands[2], data, out))
    assert ", 6 classes:" in result.stdout + result.stderr
    assert (out / "checkpoints" / "FINISHED").exists()
    assert load_config(out / "config.yaml").model.num_classes == "auto"
    state = torch.load(latest_entry(out / "checkpoints"), map_location="cpu", weights_only=False)
    assert state["model_args"]["num_classes"] == 6
    assert state["label_map"] == [  # what each output means, for evaluation and predict.py
        {"index": index, "id": id_, "name": CATEGORY_NAMES[id_]}
        for index, id_ in enumerate(CATEGORY_IDS, start=1)
    ]

    # 4. evaluation: the AP of the 5 categories by name, results in the source's ids
    run(localize(commands[3], data, out))
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["images_evaluated"] == 12 and metrics["images_failed"] == 0
    for iou_type in ("bbox", "segm"):
        assert set(metrics["per_category"][iou_type]) == set(CATEGORY_NAMES.values())
        results = json.loads((out / "eval" / f"{iou_type}.json").read_text())
        assert results, f"{iou_type}.json: no detections"
        ids = {r["category_id"] for r in results}
        assert ids <= set(CATEGORY_IDS) and ids - {1, 2, 3, 4, 5}, ids  # not the indices 1..5

    # 5. prediction on the val images (launch/predict.py: --checkpoint --images --out)
    run(localize(commands[4], data, out))
    predictions_dir = out / "predictions"
    predictions = json.loads((predictions_dir / "predictions.json").read_text())
    text = json.dumps(predictions)
    for image in sorted((data / "images" / "val").iterdir()):
        assert image.name in text, f"predictions.json says nothing of {image.name}"
    categories = {(c["id"], c["name"]) for c in predictions["categories"]}
    assert categories == set(CATEGORY_NAMES.items())  # the source's ids and names, not 1..5
    detections = detections_in(predictions["images"])
    assert detections, "predictions.json: no detections at --score-threshold 0.05"
    assert {d["category_id"] for d in detections} <= set(CATEGORY_IDS)
    assert all(d["category_name"] == CATEGORY_NAMES[d["category_id"]] for d in detections)
    pictures = [p for p in predictions_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg")]
    assert pictures, f"no pictures in {predictions_dir}"


# --- model.num_classes: auto, or a number that must agree with the training shards ----------


@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory) -> Path:
    """Shards of 8 shapes images: 3 categories + background = 4 classes."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, 8, 0, 96, seed=5)
    out = root / "shards" / "train"
    build_shards(root / "annotations" / "instances_train.json", root / "images" / "train", out,
                 progress=False)  # fmt: skip
    return out


def train(shards: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, str(REPO / "launch" / "train.py"), "--config", str(TINY),
        f"data.train_shards={shards}", f"data.val_shards={shards}", f"train.output_dir={out}",
        "tracking.enabled=false", *overrides,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_num_classes_takes_auto_or_a_count_and_refuses_the_rest_in_one_line():
    assert load_config(TINY).model.num_classes == "auto"
    assert load_config(TINY, ["model.num_classes=5"]).model.num_classes == 5
    for value, expected in [
        ("five", "model.num_classes expects an integer or 'auto', got 'five' (str)"),
        ("1.5", "model.num_classes expects an integer or 'auto', got 1.5 (float)"),
        ("1", "model.num_classes must be >= 2 (categories + background) or auto, got 1"),
    ]:
        with pytest.raises(ConfigError) as error:
            load_config(TINY, [f"model.num_classes={value}"])
        assert str(error.value) == f"command line: {expected}"


def test_a_class_count_that_disagrees_with_the_shards_stops_before_the_first_step(
    shapes_shards, tmp_path
):
    out = tmp_path / "run"
    result = train(shapes_shards, out, "model.num_classes=81")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"train: error: ConfigError: model.num_classes=81 but data.train_shards "
        f"({shapes_shards}) has 3 categories + background = 4 classes; set "
        f"model.num_classes=auto or 4"
    )
    assert "step 1/" not in result.stdout + result.stderr
    assert not out.exists()  # nothing made: no run directory, no checkpoint


def test_auto_takes_the_class_count_of_the_training_shards(shapes_shards, tmp_path):
    out = tmp_path / "run"
    result = train(shapes_shards, out, "train.max_steps=1", "train.checkpoint_every=1")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert ", 4 classes:" in result.stderr
    state = torch.load(latest_entry(out / "checkpoints"), map_location="cpu", weights_only=False)
    assert state["model_args"]["num_classes"] == 4
    assert [c["name"] for c in state["label_map"]] == ["circle", "square", "triangle"]
    assert load_config(out / "config.yaml").model.num_classes == "auto"  # as given
