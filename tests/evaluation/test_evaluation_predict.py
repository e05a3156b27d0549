"""launch/predict.py: a checkpoint's detections on any images (files, folders, globs), in
each image's own pixels, with the checkpoint's category ids and names; unreadable images
listed, not fatal."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from evaluation_helpers import REPO, tiny_model, training_checkpoint
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.evaluation.checkpoints import build_eval_model, load_checkpoint
from pipeline.evaluation.image_files import expand_inputs, read_image
from pipeline.evaluation.predict import picture_names, predict_images

LABEL_MAP = [
    {"index": 1, "id": 3, "name": "ring"},
    {"index": 2, "id": 17, "name": "star"},
    {"index": 3, "id": 40, "name": "cube"},
]
THRESHOLD = 0.5
# (height, width) of the readable images; every one resizes (min_size_test 72) and pads to
# 96 x 96, so that batching changes no feature map and every batch size gives the same output.
SIZES = {"photos/wide.jpg": (96, 128), "more/tall.jpg": (120, 90), "other/wide.jpg": (80, 100)}


def biased_checkpoint() -> dict:
    """The tiny model with its classifier leaning to ring and star: detections above 0.5."""
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([-4.0, 3.0, 2.0, -4.0]))
    return {**training_checkpoint(model, 40), "label_map": LABEL_MAP}


def random_image(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (250, 30, 30)  # an object
    return Image.fromarray(pixels).convert(mode)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A checkpoint and images: two RGB JPEGs and a grey PNG in photos/ (with a text file
    named .jpg and a truncated JPEG), a JPEG in more/ (for a glob) and one in other/ that
    has the stem of photos/wide.jpg (given as a file)."""
    root = tmp_path_factory.mktemp("predict")
    torch.save(biased_checkpoint(), root / "model.pt")
    for folder in ("photos", "more", "other"):
        (root / folder).mkdir()
    for seed, (name, (height, width)) in enumerate(SIZES.items()):
        random_image(height, width, seed).save(root / name, quality=95)
    random_image(64, 64, 7, mode="L").save(root / "photos/gray.png")
    (root / "photos/notes.jpg").write_text("a shopping list, not a picture\n")
    whole = io.BytesIO()
    random_image(90, 120, 8).save(whole, format="JPEG", quality=95)
    (root / "photos/cut.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    inputs = ["photos", "more/*.jpg", "other/wide.jpg"]
    return {"root": root, "checkpoint": root / "model.pt", "inputs": inputs}


def run_script(world: dict, out: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "launch/predict.py"), "--checkpoint",
               str(world["checkpoint"]), "--images", *world["inputs"], "--out", str(out),
               *options]  # fmt: skip
    return subprocess.run(command, cwd=world["root"], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def script_run(world) -> dict:
    """launch/predict.py as a user runs it (batch size 4: the four images in one batch)."""
    result = run_script(world, world["root"] / "out", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads((world["root"] / "out/predictions.json").read_text())
    return {"result": result, "predictions": predictions, "out": world["root"] / "out"}


def reference(world: dict, files: list[str], device: str) -> list[dict]:
    """``model(images)`` on the same decoded images, in one batch, scores >= THRESHOLD."""
    model = build_eval_model(load_checkpoint(world["checkpoint"]), inference_args={}).to(device)
    images = [read_image(world["root"] / f).to(device).float() / 255 for f in files]
    with torch.inference_mode():
        outputs = model(images)
    kept = []
    for output in outputs:
        keep = output["scores"] >= THRESHOLD
        kept.append({key: value[keep].cpu() for key, value in output.items()})
    return kept


def test_detections_are_the_models_in_the_original_pixels_with_the_label_map(world, script_run):
    predictions = script_run["predictions"]
    files = [image["file"] for image in predictions["images"]]
    assert files == ["photos/gray.png", "photos/wide.jpg", "more/tall.jpg", "other/wide.jpg"]
    assert predictions["categories"] == [{"id": c["id"], "name": c["name"]} for c in LABEL_MAP]
    assert predictions["score_threshold"] == THRESHOLD
    assert predictions["checkpoint"] == str(world["checkpoint"])
    by_index = {c["index"]: (c["id"], c["name"]) for c in LABEL_MAP}
    total = 0
    for image, expected in zip(predictions["images"], reference(world, files, "cpu"), strict=True):
        height, width = SIZES.get(image["file"], (64, 64))
        assert (image["height"], image["width"]) == (height, width)
        detections = image["detections"]
        assert len(detections) == len(expected["scores"]) > 0
        x1, y1, x2, y2 = expected["boxes"].unbind(1)
        xywh = torch.stack((x1, y1, x2 - x1, y2 - y1), dim=1)
        assert torch.allclose(torch.tensor([d["bbox"] for d in detections]), xywh, atol=1e-4)
        scores = torch.tensor([d["score"] for d in detections])
        assert torch.allclose(scores, expected["scores"], atol=1e-6)
        assert bool((scores >= THRESHOLD).all())
        mapped = [by_index[int(label)] for label in expected["labels"]]
        assert [(d["category_id"], d["category_name"]) for d in detections] == mapped
        for detection, mask in zip(detections, expected["masks"][:, 0], strict=True):
            rle = detection["segmentation"]
            assert rle["size"] == [height, width] and isinstance(rle["counts"], str)
            decoded = mask_utils.decode({**rle, "counts": rle["counts"].encode()})
            assert np.array_equal(decoded.astype(bool), (mask > 0.5).numpy())
        total += len(detections)
    assert {d["category_id"] for i in predictions["images"] for d in i["detections"]} <= {3, 17}
    assert f"4 images, {total} detections" in script_run["result"].stdout


def test_unreadable_images_are_listed_and_warned_and_the_run_goes_on(script_run):
    result, predictions = script_run["result"], script_run["predictions"]
    reasons = {failure["file"]: failure["reason"] for failure in predictions["failed"]}
    assert set(reasons) == {"photos/cut.jpg", "photos/notes.jpg"}
    assert "truncated" in reasons["photos/cut.jpg"]
    assert "not an image" in reasons["photos/notes.jpg"]
    for file, reason in reasons.items():
        warnings = [line for line in result.stderr.splitlines() if file in line]
        assert len(warnings) == 1 and reason in warnings[0] and "WARNING" in warnings[0]
    summary = result.stdout.strip().splitlines()
    assert len(summary) == 1 and "2 failed" in summary[0] and "images/s" in summary[0]
    assert "predictions.json" in summary[0]


def test_a_picture_per_image_at_its_own_size_equal_stems_apart(world, script_run):
    pictures = {image["file"]: image["picture"] for image in script_run["predictions"]["images"]}
    assert pictures["photos/wide.jpg"] == "pictures/wide.jpg"
    assert pictures["other/wide.jpg"] == "pictures/other_wide.jpg"
    for file, picture in pictures.items():
        height, width = SIZES.get(file, (64, 64))
        with Image.open(script_run["out"] / picture) as shown:
            assert (shown.format, shown.size) == ("JPEG", (width, height))
    assert len(list((script_run["out"] / "pictures").iterdir())) == 4


def without_floats(predictions: dict) -> tuple[dict, list[float]]:
    """The predictions with their boxes and scores taken out, and those numbers."""
    numbers: list[float] = []
    images = []
    for image in predictions["images"]:
        detections = []
        for detection in image["detections"]:
            numbers += [detection["score"], *detection["bbox"]]
            detections.append({k: v for k, v in detection.items() if k not in ("score", "bbox")})
        images.append({**image, "detections": detections})
    return {**predictions, "images": images}, numbers


def test_batch_sizes_give_the_same_json(world, script_run, tmp_path, monkeypatch):
    # Equal up to float rounding: a batched convolution sums in another order.
    expected, expected_numbers = without_floats(script_run["predictions"])
    monkeypatch.chdir(world["root"])
    for batch_size in (1, 3):
        out = tmp_path / f"batch{batch_size}"
        summary = predict_images(checkpoint=world["checkpoint"], inputs=world["inputs"],
                                 out_dir=out, device="cpu", batch_size=batch_size)  # fmt: skip
        assert summary.images == 4 and summary.failed == 2
        predictions, numbers = without_floats(json.loads((out / "predictions.json").read_text()))
        assert predictions == expected
        assert np.allclose(numbers, expected_numbers, rtol=0, atol=1e-4)


def load_launcher():
    spec = importlib.util.spec_from_file_location("predict_launcher", REPO / "launch/predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_error(capsys) -> str:
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_and_exit_2(world, tmp_path, capsys):
    code = load_launcher().main(["--checkpoint", str(world["checkpoint"]), "--images",
                                 str(world["root"] / "photos"), "--out", str(tmp_path / "out"),
                                 "--device", "cuda"])  # fmt: skip
    assert code == 2
    assert "--device cuda" in one_error(capsys) and not (tmp_path / "out").exists()


def test_a_bad_checkpoint_is_one_line_and_exit_2(world, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"these bytes are no checkpoint")
    launcher = load_launcher()
    for checkpoint in (bad, tmp_path / "missing.pt"):
        code = launcher.main(["--checkpoint", str(checkpoint), "--images",
                              str(world["root"] / "photos"), "--out", str(tmp_path / "out"),
                              "--device", "cpu"])  # fmt: skip
        assert code == 2 and str(checkpoint) in one_error(capsys)
    assert not (tmp_path / "out").exists()


def test_no_readable_image_is_exit_2_with_the_failures_written(world, tmp_path, capsys):
    out = tmp_path / "out"
    code = load_launcher().main(["--checkpoint", str(world["checkpoint"]), "--images",
                                 str(world["root"] / "photos/notes.jpg"), str(tmp_path / "*.png"),
                                 "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert code == 2 and "none of the images" in one_error(capsys)
    failed = json.loads((out / "predictions.json").read_text())["failed"]
    assert sorted(f["reason"] for f in failed) == [
        "no file matches this pattern",
        "not an image (PIL cannot identify it)",
    ]


def test_without_a_label_map_categories_are_the_output_indices(world, tmp_path, caplog):
    checkpoint = biased_checkpoint()
    del checkpoint["label_map"]
    torch.save(checkpoint, tmp_path / "plain.pt")
    predict_images(checkpoint=tmp_path / "plain.pt", inputs=[str(world["root"] / "more")],
                   out_dir=tmp_path / "out", device="cpu")  # fmt: skip
    predictions = json.loads((tmp_path / "out/predictions.json").read_text())
    assert predictions["categories"] == [{"id": i, "name": f"class_{i}"} for i in (1, 2, 3)]
    detections = predictions["images"][0]["detections"]
    assert detections and all(d["category_name"] == f"class_{d['category_id']}" for d in detections)
    assert len([r for r in caplog.records if "no label map" in r.getMessage()]) == 1


def test_inputs_folders_globs_files_each_once_in_order(world):
    root = world["root"]
    files, failed = expand_inputs([str(root / "photos"), str(root / "photos/*.png"),
                                   str(root / "more"), str(root / "nowhere.jpg"),
                                   str(root / "other"), str(root / "none_*.jpg")])  # fmt: skip
    names = [str(f.relative_to(root)) for f in files]
    assert names == ["photos/cut.jpg", "photos/gray.png", "photos/notes.jpg", "photos/wide.jpg",
                     "more/tall.jpg", "nowhere.jpg", "other/wide.jpg"]  # fmt: skip
    assert failed == [{"file": str(root / "none_*.jpg"), "reason": "no file matches this pattern"}]
    assert list(picture_names([Path("a/x.jpg"), Path("b/x.png"), Path("b/X.jpg")]).values()) == [
        "x.jpg",
        "b_x.jpg",
        "X_2.jpg",
    ]


def test_images_are_read_as_shown_in_8_bit_rgb(tmp_path):
    grey16 = (np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 300).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    expected = np.round(grey16 / 65535 * 255).astype(np.uint8)
    assert torch.equal(
        read_image(tmp_path / "deep.png"), torch.from_numpy(expected).expand(3, -1, -1)
    )

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (10, 200, 30, 255)  # opaque green on top, transparent black below
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    image = read_image(tmp_path / "alpha.png")
    assert image[:, 0, 0].tolist() == [10, 200, 30] and image[:, 7, 0].tolist() == [255] * 3

    Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE).save(
        tmp_path / "palette.png"
    )
    assert read_image(tmp_path / "palette.png")[:, 0, 0].tolist() == [10, 200, 30]

    photo = random_image(20, 30, 1)  # taken sideways: EXIF says turn 90 degrees
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    assert read_image(tmp_path / "sideways.jpg").shape == (3, 30, 20)

    with pytest.raises(OSError, match="no such file"):
        read_image(tmp_path / "absent.png")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_detections_are_the_models_on_cuda(world, tmp_path, monkeypatch):
    monkeypatch.chdir(world["root"])
    predict_images(checkpoint=world["checkpoint"], inputs=world["inputs"], out_dir=tmp_path,
                   device="cuda", batch_size=4)  # fmt: skip
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    files = [image["file"] for image in predictions["images"]]
    for image, expected in zip(predictions["images"], reference(world, files, "cuda"), strict=True):
        scores = torch.tensor([d["score"] for d in image["detections"]])
        assert scores.shape == expected["scores"].shape
        assert torch.allclose(scores, expected["scores"], atol=1e-4)
        for detection, mask in zip(image["detections"], expected["masks"][:, 0], strict=True):
            rle = detection["segmentation"]
            decoded = mask_utils.decode({**rle, "counts": rle["counts"].encode()}).astype(bool)
            assert (decoded != (mask > 0.5).numpy()).mean() < 1e-3
