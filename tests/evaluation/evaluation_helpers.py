"""Shared helpers of the evaluation tests (a uniquely named module: other test folders have
their own helpers): the tiny model, checkpoints in the training contract's layouts, configs,
a predictor that turns the ground truth into perfect detections, and shard surgery."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from pipeline.config import load_config
from pipeline.evaluation.inference import to_original
from pipeline.modeling import MaskRCNN
from pipeline.modeling.transform import resize_boxes

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
VAL_IMAGES = 11
IMAGE_SIZE = 96
NARROW_WIDTH = 72  # odd image ids are cropped to 96 x 72: both aspect ratios are covered
MIN_SIZE_TEST, MAX_SIZE_TEST = 72, 160  # the eval resize changes every image's size

TINY_MODEL = dict(
    num_classes=4, depth=18, fpn_channels=32, anchor_sizes=[16, 32, 64, 128, 256],
    rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=30, detections_per_image=10,
    box_head_dim=64, mask_head_channels=16, min_size_test=MIN_SIZE_TEST,
    max_size_test=MAX_SIZE_TEST,
)  # fmt: skip


def one_line(error) -> str:
    """The message of a caught error (``pytest.raises``), checked to be one line."""
    message = str(error.value)
    assert "\n" not in message, message
    return message


def tiny_model(seed: int = 0) -> MaskRCNN:
    torch.manual_seed(seed)
    return MaskRCNN(**TINY_MODEL).eval()


def training_checkpoint(model: MaskRCNN, step: int, run_id=None, uri=None) -> dict:
    """The contract's checkpoint dict: MaskRCNN.checkpoint() plus the training keys."""
    return {
        **model.checkpoint(),
        "step": step,
        "config": "model:\n  num_classes: 4\n",
        "tracking": {"run_id": run_id, "uri": uri},
        "optimizer": {},
        "rng": {},
    }


def write_atomically(path: Path, data: dict):
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(data, tmp)
    tmp.replace(path)


def publish_checkpoint(out: Path, step: int, checkpoint: dict, *, finished: bool = False):
    """A DDP-layout entry in OUT/checkpoints (temp name, rename), then ``latest``."""
    directory = out / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}.pt"
    write_atomically(directory / name, checkpoint)
    (directory / ".latest.tmp").write_text(name)
    (directory / ".latest.tmp").replace(directory / "latest")
    if finished:
        (directory / "FINISHED").touch()
    return directory / name


def deepspeed_layout_by_hand(directory: Path, tag: str, checkpoint: dict) -> Path:
    """The part of DeepSpeed's save_checkpoint layout evaluation reads, written directly:
    DIR/TAG/mp_rank_00_model_states.pt with "module" and our client-state keys, DIR/latest."""
    entry = directory / tag
    entry.mkdir(parents=True)
    state = {key: value for key, value in checkpoint.items() if key != "model"}
    state.update(module=checkpoint["model"], ds_version="0.19.8", global_steps=state["step"])
    torch.save(state, entry / "mp_rank_00_model_states.pt")
    (directory / "latest").write_text(tag)
    return entry


REAL_DEEPSPEED_SCRIPT = """
import os, sys, torch
import torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
from pipeline.modeling import MaskRCNN
checkpoint = torch.load(sys.argv[1], weights_only=True)
# DeepSpeed broadcasts parameters as bytes, which needs NCHW-contiguous convolution weights.
model = MaskRCNN(**{**checkpoint["model_args"], "channels_last": False})
model.load_state_dict(checkpoint["model"])
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
    "train_batch_size": 1, "zero_optimization": {"stage": 1},
    "zero_allow_untested_optimizer": True})
client = {k: v for k, v in checkpoint.items() if k != "model"}
engine.save_checkpoint(sys.argv[2], tag=f"step_{checkpoint['step']:07d}", client_state=client)
dist.destroy_process_group()
"""


def real_deepspeed_checkpoint(checkpoint_file: Path, directory: Path, port: int) -> Path:
    """A checkpoint saved by DeepSpeed itself (ZeRO-1, one gloo process, in a subprocess)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REAL_DEEPSPEED_SCRIPT, str(checkpoint_file), str(directory),
         str(port)],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return directory / (directory / "latest").read_text().strip()


def eval_config(shards: Path, *overrides: str):
    return load_config(
        None,
        [
            f"data.val_shards={shards}",
            f"input.min_size_test={MIN_SIZE_TEST}",
            f"input.max_size_test={MAX_SIZE_TEST}",
            "data.num_workers=0",
            "eval.batch_size=2",
            "eval.num_pictures=2",
            "tracking.enabled=false",
            *overrides,
        ],
    )


# --- perfect detections from the ground truth ------------------------------------------------

ECHO_MASK_SIZE = 400  # much finer than any box, so bilinear pasting reproduces pixels exactly


def perfect_mask(gt_mask: np.ndarray, box: torch.Tensor, size: int = ECHO_MASK_SIZE):
    """The [size, size] box-relative mask that ``paste_masks_in_image`` (torchvision's
    geometry: box grown by one padding pixel per side, truncated to integers) turns back
    into ``gt_mask`` [H, W] for ``box`` (xyxy, original image): each mask sample takes the
    ground-truth pixel it lands on once pasted."""
    scale = (size + 2) / size
    b = box.to(torch.float32)
    half_w, half_h = (b[2] - b[0]) * 0.5 * scale, (b[3] - b[1]) * 0.5 * scale
    ctr_x, ctr_y = (b[2] + b[0]) * 0.5, (b[3] + b[1]) * 0.5
    x0, y0, x1, y1 = torch.stack(
        (ctr_x - half_w, ctr_y - half_h, ctr_x + half_w, ctr_y + half_h)
    ).to(torch.int64).tolist()  # fmt: skip
    width, height = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
    u = np.arange(1, size + 1) + 0.5  # sample centres in the padded mask
    xs = np.floor(x0 + u * width / (size + 2)).astype(int)
    ys = np.floor(y0 + u * height / (size + 2)).astype(int)
    inside_x, inside_y = (xs >= 0) & (xs < gt_mask.shape[1]), (ys >= 0) & (ys < gt_mask.shape[0])
    out = np.zeros((size, size), np.float32)
    out[np.ix_(inside_y, inside_x)] = gt_mask[np.ix_(ys[inside_y], xs[inside_x])]
    return torch.from_numpy(out)


class GroundTruthEcho:
    """Both the loader (it passes the val loader's batches through and keeps their targets)
    and the predictor: each ground-truth object becomes a detection of score 1 at the MODEL'S
    input size (the loader's resized boxes) with a mask that pastes into the ground truth,
    then mapped back by the evaluation's own ``to_original``. ``sizes_for_mapping`` lets a
    test hand ``to_original`` wrong sizes, to see the check fail."""

    def __init__(self, loader, gt: dict, sizes_for_mapping=None):
        self.loader, self.gt = loader, gt
        self.sizes_for_mapping = sizes_for_mapping
        self.targets: list[dict] = []

    def __len__(self):
        return len(self.loader)

    @property
    def failures(self):
        return self.loader.failures

    def __iter__(self):
        for images, targets in self.loader:
            self.targets = targets
            yield images, targets

    def __call__(self, images, original_sizes):
        raw = []
        input_sizes = [tuple(image.shape[-2:]) for image in images]
        for target, size, original in zip(self.targets, input_sizes, original_sizes, strict=True):
            annotations = [
                a for a in self.gt["annotations"]
                if a["image_id"] == target["image_id"] and not a.get("iscrowd")
            ]  # fmt: skip
            boxes = target["boxes"].clone()
            masks = torch.zeros((0, 1, ECHO_MASK_SIZE, ECHO_MASK_SIZE))
            if annotations:
                in_original = resize_boxes(boxes, size, original)
                masks = torch.stack([
                    perfect_mask(mask_utils.decode(a["segmentation"]).astype(bool), box)
                    for a, box in zip(annotations, in_original, strict=True)
                ])[:, None]  # fmt: skip
            raw.append({"boxes": boxes, "labels": target["labels"].clone(),
                        "scores": torch.ones(len(boxes)), "masks": masks})  # fmt: skip
        sizes = self.sizes_for_mapping(input_sizes) if self.sizes_for_mapping else original_sizes
        return to_original(raw, input_sizes, sizes)


# --- shard surgery ----------------------------------------------------------------------------


def rewrite_member(shard: Path, suffix: str, index: int, data: bytes) -> str:
    """Replace the bytes of the ``index``-th member ending in ``suffix`` of a tar shard (the
    archive stays well-formed); returns the member's name."""
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    name = [info.name for info, _ in members if info.name.endswith(suffix)][index]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, content in members:
            content = data if info.name == name else content
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    shard.write_bytes(buffer.getvalue())
    return name


def member_record(shard: Path, index: int) -> dict:
    """The JSON record of the ``index``-th sample of a shard."""
    with tarfile.open(shard) as tar:
        names = [m for m in tar.getmembers() if m.name.endswith(".json")]
        return json.loads(tar.extractfile(names[index]).read())


def first_shard_only(shards: Path, out: Path) -> Path:
    """A copy of a shard set whose manifest lists only its first shard (3 images)."""
    index = json.loads((shards / "index.json").read_text())
    first = index["shards"][0]
    out.mkdir(parents=True)
    (out / first["file"]).write_bytes((shards / first["file"]).read_bytes())
    index.update(shards=[first], total_samples=first["samples"])
    (out / "index.json").write_text(json.dumps(index))
    return out


def crop_to_width(root: Path, split: str, width: int, which) -> None:
    """Crop the images ``which(image_id)`` selects (and their annotations) to ``width``."""
    from PIL import Image

    path = root / "annotations" / f"instances_{split}.json"
    coco = json.loads(path.read_text())
    cropped = {image["id"] for image in coco["images"] if which(image["id"])}
    for image in coco["images"]:
        if image["id"] in cropped:
            file = root / "images" / split / image["file_name"]
            with Image.open(file) as picture:
                picture.crop((0, 0, width, image["height"])).save(file, quality=95)
            image["width"] = width
    kept = []
    for annotation in coco["annotations"]:
        if annotation["image_id"] in cropped:
            mask = mask_utils.decode(annotation["segmentation"])[:, :width]
            rle = mask_utils.encode(np.asfortranarray(mask))
            if int(mask_utils.area(rle)) < 10:
                continue
            annotation["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
            annotation["area"] = int(mask_utils.area(rle))
            annotation["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        kept.append(annotation)
    coco["annotations"] = kept
    path.write_text(json.dumps(coco))


def truncate_inside_sample(shard: Path, sample: int) -> None:
    """Cut a shard in the middle of its ``sample``-th sample's first member: the samples
    before it stay complete, it and the ones after are lost."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    first = next(m for m in members if m.name.split(".", 1)[0] == keys[sample])
    shard.write_bytes(shard.read_bytes()[: first.offset_data + first.size // 2])


def damaged_copy(shards: Path, out: Path) -> dict:
    """A copy of the eval shards with a corrupt image (shard 0, sample 1), an unparsable record
    (shard 2, sample 0) and a shard cut inside its second sample (shard 3); returns what was
    damaged."""
    import shutil

    shutil.copytree(shards, out)
    corrupt = member_record(out / "shard-000000.tar", 1)
    rewrite_member(out / "shard-000000.tar", ".jpg", 1, b"\xff\xd8\xff garbage, not a JPEG")
    bad_record = member_record(out / "shard-000002.tar", 0)
    member = rewrite_member(out / "shard-000002.tar", ".json", 0, b'{"image_id": 7, "file_')
    lost = member_record(out / "shard-000003.tar", 1)
    truncate_inside_sample(out / "shard-000003.tar", 1)
    return {"corrupt": corrupt, "bad_record": bad_record, "bad_member": member, "lost": lost}
