"""The name of a shard set (index.json's "name"), which keys the evaluation's metrics: the rule
that derives it from the annotation file, --name, making it metric-key safe, and the fallback
for a manifest written before names were."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import load_json

from pipeline.data.manifest import dataset_name, read_manifest, safe_name
from pipeline.data.sharding import build_shards

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("data/coco/annotations/instances_val2017.json", "coco_val2017"),
        ("data/shapes/annotations/instances_val.json", "shapes_val"),
        ("/datasets/lvis/lvis_v1_val.json", "lvis_v1_val"),  # the folder starts it already
        ("/datasets/cityscapes/val/instances_val.json", "cityscapes_val"),  # val/ is the stem
        ("/a/my data (v2)/annotations/instances_val.json", "my_data_v2_val"),
    ],
)
def test_the_name_rule(path, name):
    assert dataset_name(path) == name


def test_names_are_made_metric_key_safe():
    assert safe_name("coco val/2017!") == "coco_val_2017"  # no "/": it separates the key
    assert safe_name("../x") == "x"  # no leading dots: MLflow refuses such keys
    assert safe_name("shapes-val.v2") == "shapes-val.v2"
    assert safe_name("///") == ""


def test_build_shards_records_the_name(shapes_root, tmp_path):
    annotations = shapes_root / "annotations" / "instances_val.json"
    images = shapes_root / "images" / "val"
    build_shards(annotations, images, tmp_path / "default", progress=False)
    assert load_json(tmp_path / "default" / "index.json")["name"] == f"{shapes_root.name}_val"
    assert read_manifest(tmp_path / "default").name == f"{shapes_root.name}_val"
    build_shards(annotations, images, tmp_path / "given", progress=False, name="my val")
    assert read_manifest(tmp_path / "given").name == "my_val"


def test_the_command_line_takes_a_name_and_says_how_it_was_made_safe(shapes_root, tmp_path):
    out = tmp_path / "shards"
    command = [sys.executable, "launch/build_shards.py", "--annotations",
               str(shapes_root / "annotations" / "instances_val.json"), "--images",
               str(shapes_root / "images" / "val"), "--out", str(out), "--no-progress",
               "--no-tracking"]  # fmt: skip
    run = dict(cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO)})
    result = subprocess.run([*command, "--name", "val/2017 small"], **run, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "note: --name 'val/2017 small' is used as 'val_2017_small'" in result.stdout
    assert "dataset name: val_2017_small" in result.stdout
    assert load_json(out / "index.json")["name"] == "val_2017_small"
    refused = subprocess.run([*command, "--name", "//"], **run, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].endswith("--name '//': no letter or digit in it")


def write_old_manifest(directory, source_file: str, **extra):
    directory.mkdir(parents=True)
    index = {
        "format": "maskrcnn-shards/1",
        "source": {"file": source_file, "sha256": "0" * 64},
        "shard_size": 5,
        "categories": [{"id": 1, "name": "circle", "index": 1}],
        "shards": [],
        "total_samples": 0,
        **extra,
    }
    (directory / "index.json").write_text(json.dumps(index))


def test_a_manifest_without_a_name_gets_one_from_its_source_and_folders(tmp_path):
    # The demo's layout: data/shapes/shards/val, built from instances_val.json.
    write_old_manifest(tmp_path / "shapes" / "shards" / "val", "instances_val.json")
    manifest = read_manifest(tmp_path / "shapes" / "shards" / "val")
    assert manifest.name == "shapes_val" and manifest.skipped_images == 0
    write_old_manifest(tmp_path / "coco_shards", "instances_val2017.json")
    assert read_manifest(tmp_path / "coco_shards").name == "coco_shards_val2017"
    # A recorded name is used, made safe (a hand-edited index.json).
    write_old_manifest(tmp_path / "edited", "instances_val.json", name="my set/1")
    assert read_manifest(tmp_path / "edited").name == "my_set_1"
