import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_helpers import SHARD_SIZE, TRAIN_IMAGES, load_json
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.data.ground_truth import coco_ground_truth
from pipeline.data.sharding import BadImage, build_shards, merge_only, verify_image

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
REPO = Path(__file__).resolve().parents[2]


def shard_members(shard_dir: Path) -> dict[str, bytes]:
    """Every member of every shard listed in the manifest, by name."""
    members = {}
    for shard in load_json(shard_dir / "index.json")["shards"]:
        with tarfile.open(shard_dir / shard["file"]) as tar:
            for info in tar.getmembers():
                members[info.name] = tar.extractfile(info).read()
    return members


def output_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths in column-major order, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def test_every_segmentation_form_round_trips_to_the_pycocotools_mask(shapes_root, tmp_path):
    coco = load_json(shapes_root / "annotations" / "instances_train.json")
    image = coco["images"][0]
    h, w = image["height"], image["width"]
    square = [10.0, 10.0, 40.0, 10.0, 40.0, 40.0, 10.0, 40.0]
    triangle = [50.0, 5.0, 70.0, 30.0, 45.0, 30.0]
    blob = np.zeros((h, w), dtype=np.uint8)
    blob[5:30, 20:33] = 1
    blob[40:44, 2:60] = 1
    compressed = mask_utils.encode(np.asfortranarray(blob))
    forms = {
        1: [square],  # polygon
        2: [square, triangle],  # several polygons
        3: uncompressed_rle(blob),  # uncompressed RLE, as COCO uses for crowds
        4: {"size": [h, w], "counts": compressed["counts"].decode()},  # compressed RLE
    }
    annotations = [
        {
            "id": i,
            "image_id": image["id"],
            "category_id": 1,
            "segmentation": seg,
            "bbox": [1.0, 1.0, 5.0, 5.0],
            "area": 25,
            "iscrowd": int(i == 3),
        }
        for i, seg in forms.items()
    ]
    source = tmp_path / "forms.json"
    source.write_text(json.dumps({**coco, "images": [image], "annotations": annotations}))
    out = tmp_path / "shards"
    build_shards(source, shapes_root / "images" / "train", out, progress=False)

    record = json.loads(next(v for k, v in shard_members(out).items() if k.endswith(".json")))
    stored = {a["id"]: a for a in record["annotations"]}
    reference = COCO(str(source))
    assert sorted(stored) == [1, 2, 3, 4]
    for annotation_id in forms:
        rle = stored[annotation_id]["segmentation"]
        assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
        expected = reference.annToMask(reference.anns[annotation_id])
        assert expected.sum() > 0
        np.testing.assert_array_equal(mask_utils.decode(rle), expected)
    assert stored[3]["iscrowd"] == 1  # crowds stay in the shard


def test_shards_are_byte_identical_for_one_and_two_workers(shapes_root, tmp_path):
    args = (shapes_root / "annotations" / "instances_train.json", shapes_root / "images" / "train")
    build_shards(*args, tmp_path / "one", shard_size=SHARD_SIZE, workers=1, progress=False)
    build_shards(*args, tmp_path / "two", shard_size=SHARD_SIZE, workers=2, progress=False)
    one, two = output_files(tmp_path / "one"), output_files(tmp_path / "two")
    assert len([n for n in one if n.endswith(".tar")]) == 5
    assert one == two


def test_tar_layout_keys_without_dots_sample_files_together_fixed_headers(train_shards):
    index = load_json(train_shards / "index.json")
    assert index["total_samples"] == TRAIN_IMAGES
    assert [c["name"] for c in index["categories"]] == ["circle", "square", "triangle"]
    assert [c["index"] for c in index["categories"]] == [1, 2, 3]
    with tarfile.open(train_shards / index["shards"][0]["file"]) as tar:
        infos = tar.getmembers()
    names = [info.name for info in infos]
    stems = [name.split(".")[0] for name in names]
    assert [n.split(".", 1)[1] for n in names] == ["jpg", "json"] * (len(names) // 2)
    assert stems[::2] == stems[1::2] == sorted(stems[::2])
    assert {(i.mtime, i.uid, i.gid, i.uname, i.mode) for i in infos} == {(0, 0, 0, "", 0o644)}


def test_resume_rewrites_only_the_missing_or_damaged_shards(shapes_root, tmp_path):
    args = (shapes_root / "annotations" / "instances_train.json", shapes_root / "images" / "train")
    out = tmp_path / "out"
    first = build_shards(*args, out, shard_size=SHARD_SIZE, progress=False)
    assert first.shards_built == [0, 1, 2, 3, 4]
    original = output_files(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    (out / "shard-000001.tar").unlink()
    damaged = out / "shard-000003.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1024])

    second = build_shards(*args, out, shard_size=SHARD_SIZE, progress=False)
    assert second.shards_built == [1, 3]
    assert second.shards_kept == [0, 2, 4]
    for name in ("shard-000000.tar", "shard-000002.tar", "shard-000004.json"):
        assert (out / name).stat().st_mtime_ns == mtimes[name]
    assert output_files(out) == original


def test_bad_images_and_annotations_are_reported_not_lost(shapes_root, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(shapes_root / "images" / "train", images)
    coco = load_json(shapes_root / "annotations" / "instances_train.json")
    truncated, missing, not_image = (coco["images"][i]["file_name"] for i in (1, 6, 12))
    data = (images / truncated).read_bytes()
    (images / truncated).write_bytes(data[: len(data) // 2])
    (images / missing).unlink()
    (images / not_image).write_text("this is not a picture")
    coco["annotations"].append(
        {"id": 9001, "image_id": 424242, "category_id": 1, "segmentation": [], "bbox": [0, 0, 1, 1]}
    )
    coco["annotations"].append(
        {"id": 9002, "image_id": 1, "category_id": 77, "segmentation": [], "bbox": [0, 0, 1, 1]}
    )
    source = tmp_path / "broken.json"
    source.write_text(json.dumps(coco))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "launch/build_shards.py", "--annotations", str(source),
         "--images", str(images), "--out", str(out), "--shard-size", "5", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO)}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "skipped 3 images, dropped 2 annotations" in result.stdout
    skipped = load_json(out / "skipped.json")
    reasons = {item["file_name"]: item["reason"] for item in skipped["images"]}
    assert set(reasons) == {truncated, missing, not_image}
    assert "truncated" in reasons[truncated]
    assert "No such file" in reasons[missing]
    assert "not a decodable image" in reasons[not_image]
    dropped = {item["annotation_id"]: item["reason"] for item in skipped["annotations"]}
    assert dropped == {9001: "unknown image id 424242", 9002: "unknown category id 77"}
    index = load_json(out / "index.json")
    assert index["total_samples"] == TRAIN_IMAGES - 3
    kept_files = {json.loads(v)["file_name"] for k, v in shard_members(out).items()
                  if k.endswith(".json")}  # fmt: skip
    assert len(kept_files) == TRAIN_IMAGES - 3 and not kept_files & set(reasons)


@pytest.mark.parametrize(
    ("content", "expected"),
    [("{not json", "not valid JSON"), ('{"images": [], "categories": []}', "'annotations'")],
)
def test_invalid_coco_is_one_line_error_with_exit_code_2(tmp_path, content, expected):
    source = tmp_path / "bad.json"
    source.write_text(content)
    result = subprocess.run(
        [sys.executable, "launch/build_shards.py", "--annotations", str(source),
         "--images", str(tmp_path), "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO)}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {source}: ") and expected in lines[0]


def test_slurm_array_split_and_merge_equals_a_single_run(shapes_root, tmp_path):
    args = (shapes_root / "annotations" / "instances_train.json", shapes_root / "images" / "train")
    build_shards(*args, tmp_path / "single", shard_size=SHARD_SIZE, progress=False)
    array = tmp_path / "array"
    built = []
    for task in range(3):
        summary = build_shards(
            *args, array, shard_size=SHARD_SIZE, shard_index=task, num_shard_jobs=3,
            merge=False, progress=False,
        )  # fmt: skip
        built.append(summary.shards_built)
        assert not (array / "index.json").exists()
    assert built == [[0, 3], [1, 4], [2]]
    merge_only(args[0], array, shard_size=SHARD_SIZE)
    assert output_files(array) == output_files(tmp_path / "single")


def test_merge_refuses_when_a_shard_is_missing(shapes_root, tmp_path):
    args = (shapes_root / "annotations" / "instances_train.json", shapes_root / "images" / "train")
    build_shards(*args, tmp_path, shard_size=SHARD_SIZE, shard_index=0, num_shard_jobs=2,
                 merge=False, progress=False)  # fmt: skip
    result = subprocess.run(
        [sys.executable, "launch/build_shards.py", "--annotations", str(args[0]), "--images",
         str(args[1]), "--out", str(tmp_path), "--shard-size", str(SHARD_SIZE), "--merge-only"],
        cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO)}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "2 of 5 shards missing" in result.stderr and "shard-000001.tar" in result.stderr


def test_ground_truth_from_shards_matches_the_source(val_shards, shapes_root):
    source = COCO(str(shapes_root / "annotations" / "instances_val.json"))
    truth = coco_ground_truth(val_shards)
    assert sorted(i["id"] for i in truth["images"]) == sorted(source.imgs)
    assert truth["categories"] == [
        {"id": c["id"], "name": c["name"]} for c in source.dataset["categories"]
    ]
    by_id = {a["id"]: a for a in truth["annotations"]}
    assert sorted(by_id) == sorted(source.anns)
    for annotation_id, expected in source.anns.items():
        got = by_id[annotation_id]
        assert (got["image_id"], got["category_id"], got["bbox"], got["iscrowd"]) == (
            expected["image_id"], expected["category_id"], expected["bbox"], expected["iscrowd"]
        )  # fmt: skip
        np.testing.assert_array_equal(
            mask_utils.decode(got["segmentation"]), source.annToMask(expected)
        )
    coco = COCO()  # what the evaluation does with it
    coco.dataset = truth
    coco.createIndex()
    assert coco.annToMask(coco.anns[1]).sum() == source.annToMask(source.anns[1]).sum()


def test_the_reason_for_an_unknown_format_names_no_python_object():
    # skipped.json said "cannot identify image file <_io.BytesIO object at 0x7f...>".
    with pytest.raises(BadImage) as error:
        verify_image(b"this is not a picture", 10, 10)
    assert str(error.value) == "not a decodable image: not a known image format"
