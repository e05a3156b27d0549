"""The typed configuration schema shared by every stage.

Each field carries a docstring (the string literal right below it); ``python -m
pipeline.config --keys`` prints them and the tests check that none is missing.
The classes are plain dataclasses with defaults, so ``Config()`` is a complete,
valid configuration (the embedded shapes dataset on a ResNet-50 FPN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class BackboneConfig:
    depth: Literal[18, 34, 50, 101] = 50
    """ResNet depth."""
    frozen_stages: int = 1
    """Number of leading stages whose weights are frozen: 0 trains everything, 1 freezes the
    stem, k freezes the stem and res2..res(k)."""
    norm: Literal["frozen_bn", "bn", "sync_bn", "gn"] = "frozen_bn"
    """Normalization of the ResNet body. frozen_bn: BatchNorm frozen and folded into the
    convolutions (for fine-tuning pretrained weights; exact torchvision compatibility).
    bn: trainable BatchNorm with batch statistics. sync_bn: bn whose statistics are
    averaged over all ranks (converted under DDP). gn: GroupNorm with 32 groups. From
    scratch, pick bn, sync_bn or gn: frozen_bn leaves the network unnormalized."""
    fpn_channels: int = 256
    """Channel width of every FPN level (P2-P6)."""


@dataclass
class AnchorConfig:
    sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    """Anchor size in pixels for each FPN level P2..P6 (one size per level)."""
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    """Anchor aspect ratios (height / width), the same on every level."""


@dataclass
class FocalLossConfig:
    alpha: float = 0.25
    """Weight of the positive class in the sigmoid focal loss (negative: no weighting)."""
    gamma: float = 2.0
    """Focusing exponent of the sigmoid focal loss."""


@dataclass
class RPNConfig:
    pre_nms_top_n_train: int = 2000
    """Proposals kept per level and image before NMS, in training."""
    pre_nms_top_n_test: int = 1000
    """Proposals kept per level and image before NMS, in inference."""
    post_nms_top_n_train: int = 2000
    """Proposals kept per image after NMS, in training."""
    post_nms_top_n_test: int = 1000
    """Proposals kept per image after NMS, in inference."""
    nms_thresh: float = 0.7
    """IoU threshold of the proposal NMS."""
    fg_iou_thresh: float = 0.7
    """Anchors with IoU at least this with a ground-truth box are positives."""
    bg_iou_thresh: float = 0.3
    """Anchors with IoU below this with every ground-truth box are negatives."""
    batch_size_per_image: int = 256
    """Anchors sampled per image for the RPN losses."""
    positive_fraction: float = 0.5
    """Largest fraction of positives among the sampled anchors."""
    score_thresh: float = 0.0
    """Proposals with an objectness probability below this are dropped."""
    min_size: float = 1e-3
    """Proposals with a side shorter than this (pixels) are dropped."""
    objectness_loss: Literal["bce", "focal"] = "bce"
    """Loss of the objectness classifier: binary cross-entropy or sigmoid focal loss."""
    box_loss: Literal["smooth_l1", "l1"] = "smooth_l1"
    """Loss of the anchor box regression."""
    smooth_l1_beta: float = 1.0 / 9.0
    """Beta of the smooth-L1 box loss (ignored for l1)."""


@dataclass
class RoIHeadsConfig:
    fg_iou_thresh: float = 0.5
    """Proposals with IoU at least this with a ground-truth box are foreground."""
    bg_iou_thresh: float = 0.5
    """Proposals with IoU below this are background."""
    batch_size_per_image: int = 512
    """Proposals sampled per image for the box head losses."""
    positive_fraction: float = 0.25
    """Largest fraction of foreground among the sampled proposals."""
    score_thresh: float = 0.05
    """Detections with a class score below this are dropped at inference."""
    nms_thresh: float = 0.5
    """IoU threshold of the per-class NMS at inference."""
    detections_per_image: int = 100
    """Most detections kept per image at inference."""
    classifier_loss: Literal["ce", "focal"] = "ce"
    """Loss of the box classifier: softmax cross-entropy or sigmoid focal loss."""
    box_loss: Literal["smooth_l1", "l1"] = "smooth_l1"
    """Loss of the box regression."""
    smooth_l1_beta: float = 1.0 / 9.0
    """Beta of the smooth-L1 box loss (ignored for l1)."""
    box_head_dim: int = 1024
    """Width of the two fully connected layers of the box head."""
    mask_head_channels: int = 256
    """Channels of the four convolutions of the mask head."""
    pooler_sampling_ratio: int = 2
    """Sampling points per bin of the RoIAlign poolers (<=0: adaptive)."""
    pooler_aligned: bool = True
    """Half-pixel aligned RoIAlign. Models converted from torchvision use False."""
    pooler_mode: Literal["bilinear", "bicubic"] = "bilinear"
    """Interpolation of the RoIAlign poolers."""


@dataclass
class InputConfig:
    min_size_train: list[int] = field(default_factory=lambda: [800])
    """Shortest-edge sizes for training; one is drawn per image (multi-scale when several)."""
    max_size_train: int = 1333
    """Longest-edge bound in training."""
    min_size_test: int = 800
    """Shortest-edge size at inference."""
    max_size_test: int = 1333
    """Longest-edge bound at inference."""
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel mean of 0-1 RGB images, subtracted before the backbone."""
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel standard deviation of 0-1 RGB images."""
    size_divisibility: int = 32
    """Batched images are zero-padded to a multiple of this."""


@dataclass
class ModelConfig:
    num_classes: int | Literal["auto"] = "auto"
    """Number of classes including the background (class 0). auto: the training shards'
    categories + 1, read from their manifest (data.train_shards/index.json) when training
    starts; a number must equal that count (else the run stops before its first step)."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The ResNet + FPN backbone."""
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    """The RPN anchor generator."""
    rpn: RPNConfig = field(default_factory=RPNConfig)
    """The region proposal network."""
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    """The box and mask heads."""
    focal: FocalLossConfig = field(default_factory=FocalLossConfig)
    """Focal-loss parameters, used wherever a focal loss is selected."""
    fpn_norm: Literal["none", "gn"] = "none"
    """Normalization of the FPN convolutions: none, or GroupNorm (32 groups)."""
    head_norm: Literal["none", "gn"] = "none"
    """Normalization of the box head (then 4 convolutions + 1 FC, detectron2's 4conv1fc) and
    of the mask head convolutions: none, or GroupNorm (32 groups)."""
    channels_last: bool = True
    """Run the convolutions in channels_last (NHWC) memory format: faster on CPUs (oneDNN;
    on the CPU the weight gradients of 3x3 convolutions still come from NCHW, see
    pipeline/modeling/conv.py). Numerics-neutral; set false if a device runs NCHW faster."""


@dataclass
class DataConfig:
    root: str = "data/shapes"
    """Dataset root used by the demo: images/ and annotations/ as make_shapes writes them."""
    train_shards: str = "data/shapes/shards/train"
    """Directory of the training shards (with index.json)."""
    val_shards: str = "data/shapes/shards/val"
    """Directory of the validation shards (with index.json)."""
    num_workers: int = 2
    """Data-loading worker processes per rank."""
    shuffle_buffer: int = 256
    """Window of consecutive samples (in the epoch's shard order) shuffled together; costs no
    memory."""
    epoch_samples: int = 0
    """Global samples per epoch (all ranks together); 0: the dataset size. Each rank gets
    ceil(epoch_samples / (world_size x batch_size)) batches."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip in training."""
    max_decode_failures: int = 50
    """Consecutive samples a loader worker may fail to read or decode before it stops the job
    with an error naming the shard."""
    seed: int = 0
    """Seed of the shard and sample order."""


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    """Run directory: config.yaml (resolved), checkpoints/ (one entry per saved step and a
    `latest` pointer), run.json (the MLflow run), metrics.jsonl and the loss curve."""
    batch_size: int = 2
    """Images per step on each process; the global batch is this times the world size
    (times grad_accum_steps)."""
    grad_accum_steps: int = 1
    """Micro-batches whose gradients are accumulated into one optimizer step."""
    max_steps: int = 1000
    """Optimizer steps in the whole run (a resumed run continues up to this)."""
    lr: float = 0.02
    """Learning rate at the reference batch size; scaled linearly to the global batch."""
    reference_batch_size: int = 16
    """Global batch that the schedule is meant for: lr * global_batch / reference_batch_size
    is used, and with scale_schedule the step counts are scaled the other way."""
    scale_schedule: bool = True
    """Scale max_steps, lr_steps, warmup_iters and checkpoint_every by reference_batch_size /
    global_batch (rounded), so the run sees the same images at the same lr on any number of
    GPUs (detectron2's REFERENCE_WORLD_SIZE); false takes them as steps, as given."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """L2 weight decay (not applied to norm weights and biases)."""
    warmup_iters: int = 100
    """Steps of linear learning-rate warm-up."""
    warmup_factor: float = 0.001
    """Learning-rate factor at the first warm-up step."""
    lr_schedule: Literal["multistep", "cosine"] = "multistep"
    """Decay after the warm-up: multiply by lr_gamma at each of lr_steps, or cosine to 0."""
    lr_steps: list[int] = field(default_factory=lambda: [700, 900])
    """Steps at which the multistep schedule multiplies the learning rate by lr_gamma."""
    lr_gamma: float = 0.1
    """Learning-rate factor at each of lr_steps."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    amp: Literal["off", "bf16", "fp16"] = "off"
    """Mixed precision: autocast in bf16 or fp16 (fp16 with a grad scaler, CUDA only). On a
    CPU, bf16 pays off only with AVX512-BF16 or AMX; elsewhere it is slower than off (a
    warning says so)."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 3
    """Checkpoints kept in output_dir/checkpoints (the oldest are deleted); 0 keeps all."""
    resume: str = "auto"
    """auto: continue from the latest checkpoint in output_dir if there is one; never: start
    fresh; or a checkpoint path. Resuming restores everything and is strict."""
    init_from: str = ""
    """Weights to start from, with a fresh schedule at step 0: our checkpoint, a converted
    torchvision Mask R-CNN (mismatched predictors re-initialised) or a torchvision ImageNet
    ResNet state dict (backbone only)."""
    max_nonfinite_steps: int = 5
    """A batch whose loss is NaN or Inf is skipped, and so is an optimizer step whose gradient
    norm is (on every rank alike); this many of them in a row stop the run."""
    log_every: int = 20
    """Print and log losses, lr, images/s and the data-wait share every this many steps."""
    seed: int = 42
    """Seed of the model initialisation and of every random draw in training."""


@dataclass
class EvalConfig:
    batch_size: int = 2
    """Images per inference batch on each rank."""
    iou_types: list[str] = field(default_factory=lambda: ["bbox", "segm"])
    """COCO metrics to compute: bbox, segm or both."""
    mask_threshold: float = 0.5
    """Probability above which a pasted mask pixel is foreground."""
    backend: Literal["auto", "pycocotools", "faster"] = "auto"
    """COCOeval implementation: pycocotools (the reference), faster (faster-coco-eval, same
    numbers, several times faster), or auto (faster when installed)."""
    num_pictures: int = 8
    """Validation images drawn with their predictions beside the ground truth (PNG, logged
    to MLflow); 0 draws none."""
    picture_score_thresh: float = 0.5
    """Detections with a score below this are left out of the pictures (not the metrics)."""
    watch_poll_s: float = 10.0
    """With --watch: seconds between two looks at the training run's checkpoints/latest."""
    watch_idle_timeout_s: float = 0.0
    """With --watch: stop when no new checkpoint appeared for this long (a training job that
    died without finishing); 0 waits until training writes checkpoints/FINISHED."""


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """Data-parallel engine."""
    backend: Literal["auto", "cuda:nccl,cpu:gloo", "nccl", "gloo"] = "auto"
    """Process-group backend; auto picks cuda:nccl,cpu:gloo with GPUs (CUDA tensors on NCCL,
    the loop's small CPU tensors and objects on gloo) and gloo without."""
    zero_stage: Literal[0, 1, 2] = 1
    """DeepSpeed ZeRO stage (deepspeed strategy only)."""
    bucket_mb: int = 25
    """Gradient all-reduce bucket size in MB (DDP's bucket_cap_mb, DeepSpeed's
    reduce_bucket_size and allgather_bucket_size)."""
    timeout_s: int = 1800
    """Collective timeout in seconds; a dead rank fails the job after at most this."""


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log params, metrics and artifacts to MLflow (rank 0 only)."""
    uri: str = ""
    """MLflow tracking URI; empty: MLFLOW_TRACKING_URI, else a SQLite store in output_dir."""
    experiment: str = "maskrcnn"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name; empty: derived from the stage and the time."""
    system_metrics: bool = True
    """Also log CPU, memory, disk, network (and GPU) utilisation as system/* metrics."""
    close_timeout: float = 60.0
    """Seconds a finishing stage waits for MLflow to take what is still queued (metrics logged
    while the server was away); after that it warns and exits, the data stays in the run dir."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Mask R-CNN model."""
    input: InputConfig = field(default_factory=InputConfig)
    """Image resizing and normalisation, shared by the loader and the model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and loaders."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training schedule."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Multi-process settings."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking."""
