"""The training loop of the train stage, top to bottom.

``train(cfg)`` joins the process group, builds the model, optimizer, loader and strategy,
restores a checkpoint or initial weights, and runs the optimizer steps of the schedule that
``train`` gives on this run's global batch (``optim.build_schedule``). It returns 0 when
done and ``PREEMPTED_EXIT_CODE`` after a SIGTERM/SIGUSR1 checkpoint.

Randomness: every draw the run makes comes from state the checkpoint holds. The loader's
order and augmentations are functions of (seed, epoch, sample position) and its position is
saved; the model's anchor and RoI sampling draw from a generator reseeded at every micro-batch
from (seed, step, micro-batch, rank), so the step alone restores it; the process-global
generators are saved too. Hence N steps, a stop, and N more end where 2N straight do:
bitwise on the CPU. On a GPU the draws are the same too, but the arithmetic is not bitwise
repeatable: RoIAlign's backward adds into the feature gradient with atomics, and cuDNN may
pick non-deterministic algorithms, so two runs from the same state (resumed or not) differ
in the last bits, and a resumed run ends as close to the straight one as two straight runs
end to each other (the tests allow 1e-3 relative there).
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import torch

from pipeline.collectives import all_gather_objects, any_rank, any_rank_tensor, barrier
from pipeline.config import ConfigError, config_to_dict, dump_config, save_config
from pipeline.data import build_train_loader, read_manifest
from pipeline.distributed import DistInfo, device_for, init_distributed, shutdown_distributed
from pipeline.modeling import build_model
from pipeline.modeling.label_map import LABEL_MAP_KEY, LabelMap
from pipeline.modeling.weights import load_init_weights, load_strict_state
from pipeline.rundir import DEEPSPEED_MODEL_FILE
from pipeline.tracking import build_tracker

from .checkpoint import (
    FINISHED,
    CheckpointError,
    checkpoint_dir,
    latest_entry,
    remove_leftovers,
    rng_state,
    set_rng_state,
)
from .checkpoint import resolve_resume as find_resume
from .nonfinite import BatchNormStatistics, NonFiniteCount, check_finite_state
from .optim import build_optimization, build_schedule, place_schedule
from .preemption import PREEMPTED_EXIT_CODE, PreemptionFlag
from .progress import ProgressMeter, append_metrics, plot_loss_curve, truncate_metrics
from .strategy import build_strategy
from .sync_bn import convert_sync_batchnorm

log = logging.getLogger("pipeline.train")


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of the model's sampling generator for one micro-batch (a 63-bit mix)."""
    value = (seed * 1_000_003 + step) * 1_000_033 + micro
    return (value * 8191 + rank) % (2**63 - 1)


def to_device(images, targets, device: torch.device):
    if device.type == "cpu":
        return images, targets
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [
        {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
        for t in targets
    ]
    return images, targets


def resolve_classes(cfg) -> tuple[int, list[dict]]:
    """The model's class count (the training shards' categories + background) and what each
    output means (the label map its checkpoints carry), from the shards' manifest.
    ``model.num_classes`` must be ``auto`` or that count (a ConfigError naming both
    otherwise: a run on the wrong shards stops here, not at its evaluation)."""
    manifest = read_manifest(cfg.data.train_shards)
    found = manifest.num_classes
    given = cfg.model.num_classes
    if given != "auto" and given != found:
        raise ConfigError(
            f"model.num_classes={given} but data.train_shards ({cfg.data.train_shards}) has "
            f"{found - 1} categories + background = {found} classes; set "
            f"model.num_classes=auto or {found}"
        )
    return found, LabelMap.from_categories(manifest.categories, found).to_json()


def run_tags(cfg, info: DistInfo, schedule, num_classes: int) -> dict[str, str]:
    hosts = sorted(set(all_gather_objects(socket.gethostname())))
    return {
        "num_classes": str(num_classes),  # model.num_classes resolved (config.yaml may say auto)
        "world_size": str(info.world_size),
        # From the launcher's layout, not the host names: containers and network
        # namespaces can give several nodes one name.
        "num_nodes": str(info.num_nodes),
        "strategy": cfg.distributed.strategy,
        "hosts": ",".join(hosts),
        "amp": cfg.train.amp,
        # The schedule this run follows on its global batch (config.yaml keeps the config's).
        "global_batch": str(schedule.global_batch),
        "lr_scaled": f"{schedule.lr:.6g}",
        "max_steps_effective": str(schedule.max_steps),
        "lr_steps_effective": ",".join(map(str, schedule.milestones)),
        "warmup_iters_effective": str(schedule.warmup_iters),
    }


def resume_position(state: dict, global_batch: int, *, scaled: bool) -> tuple[int, int]:
    """(step, images seen) at which a run of ``global_batch`` images a step continues from a
    checkpoint: the saved step on the same global batch, or when the schedule is given in
    steps (``scaled`` false); on another batch with a scaled schedule, the step of this
    run's schedule that the same number of images reaches (rounded down; the loader resumes
    at the exact sample either way). A checkpoint from before these keys were saved took
    the same batch."""
    step = int(state["step"])
    saved_batch = int(state.get("global_batch", global_batch))
    images_seen = int(state.get("images_seen", step * saved_batch))
    if saved_batch == global_batch or not scaled:
        return step, images_seen
    return images_seen // global_batch, images_seen


def train(cfg) -> int:
    info = init_distributed(cfg.distributed.backend, cfg.distributed.timeout_s)
    try:
        # Before anything is made (run directory, MLflow run): shards that do not fit the
        # config stop the run with one line.
        num_classes, label_map = resolve_classes(cfg)
        # Rank 0's MLflow run ends FAILED if _train raises (it ends it FINISHED, or KILLED
        # when preempted); the tracker sends what it spooled as soon as a server answers.
        # A resumed or requeued job continues the run; train.resume=never starts a new one.
        tracker = build_tracker(cfg, stage="train", run_dir=cfg.train.output_dir,
                                rank=info.rank, resume=cfg.train.resume != "never")  # fmt: skip
        with tracker:
            return _train(cfg, info, tracker, num_classes, label_map)
    finally:
        shutdown_distributed()


def _train(cfg, info: DistInfo, tracker, num_classes: int, label_map: list[dict]) -> int:
    device = device_for(info)
    t = cfg.train
    out = Path(t.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        # What killed saves left under temporary names. No save runs now: the other ranks
        # write nothing before a collective that waits for this rank.
        remove_leftovers(checkpoint_dir(out))
    preemption = PreemptionFlag().install()

    # --- the model, its initial weights, the optimizer, the data, the strategy ----------------
    torch.manual_seed(t.seed)
    model = build_model(cfg, num_classes=num_classes).to(device)
    if cfg.model.backbone.norm == "sync_bn" and info.world_size > 1:
        model = convert_sync_batchnorm(model, device)
    resume_from = find_resume(t.resume, out)
    if resume_from is None and t.init_from:
        try:
            # The predictor rows of the categories the file shares with the shards are kept.
            categories = LabelMap.from_json(label_map, num_classes, str(cfg.data.train_shards))
            report = load_init_weights(model, t.init_from, label_map=categories)
        except (ValueError, OSError) as error:
            raise CheckpointError(f"train.init_from={t.init_from}: {error}") from error
        if info.is_main:
            for line in report.summary_lines():
                log.info("init_from %s: %s", t.init_from, line)
    generator = torch.Generator(device=device)
    model.set_generator(generator)
    schedule = build_schedule(cfg, info.world_size)
    optimizer, scheduler = build_optimization(cfg, model, schedule)
    loader = build_train_loader(cfg, info.rank, info.world_size, pin_memory=device.type == "cuda")
    strategy = build_strategy(
        cfg, model, optimizer, scheduler, device=device, world_size=info.world_size
    )
    ckpt_dir = checkpoint_dir(out)

    step, images_seen, tracking_state = 0, 0, None
    if resume_from is not None:
        state = strategy.load(resume_from, load_strict_state)
        saved_step = int(state["step"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        tracking_state = state.get("tracking")
        step, images_seen = resume_position(state, schedule.global_batch, scaled=t.scale_schedule)
        # The saved optimizer and scheduler hold the saving run's rates; this run follows
        # the schedule of its own global batch from the same image position.
        place_schedule(scheduler, lr=schedule.lr, step=step)
        if info.is_main:
            log.info("resumed from %s at step %d (epoch %s)", resume_from, step, loader.epoch)
            if step != saved_step:
                log.warning(
                    "the checkpoint was saved at step %d with %s images a step; this run "
                    "takes %d a step, so it continues at step %d (%d images seen)",
                    saved_step,
                    state.get("global_batch", "?"),
                    schedule.global_batch,
                    step,
                    images_seen,
                )
            truncate_metrics(out, saved_step)

    # --- tracking (rank 0 only; never blocks the loop) -----------------------------------------
    tags = run_tags(cfg, info, schedule, num_classes)
    saved_run = (tracking_state or {}).get("run_id")
    if saved_run and tracker.run_id and tracker.run_id != saved_run:
        log.warning(
            "the checkpoint was made by MLflow run %s; logging to %s",
            saved_run,
            tracker.run_id,
        )
    if step == 0:  # a resumed job's params are in the spool already, delivered or not
        tracker.log_params(config_to_dict(cfg))
    tracker.set_tags(tags)
    if info.is_main:
        log.info(
            "training %s on %d process(es) (%s nodes, %s) from step %d, %d classes: %s",
            cfg.distributed.strategy,
            info.world_size,
            tags["num_nodes"],
            device,
            step,
            num_classes,
            schedule.describe(),
        )

    def save(at_step: int) -> None:
        check_finite_state(strategy.module, at_step)
        client_state = {
            "step": at_step,
            "epoch": loader.epoch,
            "loader": loader.state_dict(),
            "rng": rng_state(),
            "config": dump_config(cfg),
            "model_args": dict(strategy.module.model_args),
            LABEL_MAP_KEY: label_map,  # output index -> the train shards' category id, name
            "world_size": info.world_size,
            "global_batch": schedule.global_batch,
            "images_seen": images_seen,
            # run_dir: where an evaluation finds the run id (run.json) when the run was
            # created only after this checkpoint (the server was away).
            "tracking": {
                "run_id": tracker.run_id,
                "uri": tracker.uri,
                "run_dir": str(out.resolve()),
            },
        }
        strategy.save(
            ckpt_dir, at_step, client_state, is_main=info.is_main, keep=t.keep_checkpoints
        )
        if info.is_main:
            log.info("checkpoint: %s", latest_entry(ckpt_dir))

    # --- the loop ----------------------------------------------------------------------------
    accumulation = t.grad_accum_steps
    meter = ProgressMeter(max_steps=schedule.max_steps, global_batch=schedule.global_batch)
    batches = loader.forever()
    strategy.model.train()
    # Batches with a non-finite loss and optimizer steps with a non-finite gradient norm since
    # the last step applied: each is skipped, and max_nonfinite_steps of them stop the run.
    nonfinite = NonFiniteCount(t.max_nonfinite_steps)
    batchnorm = BatchNormStatistics(strategy.module)
    preempted = False
    while step < schedule.max_steps:
        good = drawn = 0
        while good < accumulation:
            waited = time.perf_counter()
            images, targets = next(batches)
            meter.add_data_wait(time.perf_counter() - waited)
            images, targets = to_device(images, targets, device)
            # A batch drawn after a skipped one samples afresh: the seed counts the draws.
            generator.manual_seed(step_seed(t.seed, step, drawn, info.rank))
            drawn += 1
            with strategy.sync_context(last_micro_batch=good == accumulation - 1):
                batchnorm.keep()
                losses = strategy.forward(images, targets)
                loss = sum(losses.values())
                # The flag is made and reduced on the device; reading it is the micro-batch's
                # one host read (the losses are read only on logging steps, by the meter).
                if bool(any_rank_tensor(~torch.isfinite(loss.detach()))):
                    batchnorm.restore()  # on every rank: the batch is skipped everywhere
                    values = {k: round(float(v.detach()), 4) for k, v in losses.items()}
                    nonfinite.add_loss(step + 1, values, log_it=info.is_main)
                    continue
                strategy.backward(loss, accumulation)
            meter.add_losses(losses)
            good += 1
        # A non-finite norm: the strategy skipped the step, on every rank alike (the norm is
        # that of the all-reduced gradients); the schedule and the data move on.
        grad_norm = strategy.optimizer_step()
        nonfinite.add_step(step + 1, grad_norm, log_it=info.is_main)
        step += 1
        images_seen += schedule.global_batch
        meter.step_done()
        (preempted,) = any_rank([preemption.requested])

        if step % t.log_every == 0 or step == schedule.max_steps or preempted:
            line, metrics = meter.report(step, strategy.lr(), grad_norm)
            if info.is_main:
                log.info(line)
                append_metrics(out, step, metrics)
                tracker.log_metrics(metrics, step=step, once=True)  # steps rerun after a kill
        if step % schedule.checkpoint_every == 0 or step == schedule.max_steps or preempted:
            save(step)
        if preempted:
            break

    # --- the end -----------------------------------------------------------------------------
    preemption.restore()
    if info.is_main:
        curve = plot_loss_curve(out)
        if curve is not None:
            tracker.log_artifact(curve)
        tracker.log_artifact(out / "config.yaml")
    if preempted:
        if info.is_main:
            log.warning(
                "preempted at step %d: checkpoint written; exiting with %d to be requeued",
                step,
                PREEMPTED_EXIT_CODE,
            )
        tracker.close("KILLED")
        # Every rank leaves together: srun --kill-on-bad-exit and torchrun's agent kill the
        # others as soon as one rank exits, which would cut rank 0's close short.
        barrier()
        return PREEMPTED_EXIT_CODE
    if info.is_main:
        final = latest_entry(ckpt_dir)
        if final is not None:
            model_file = final / DEEPSPEED_MODEL_FILE if final.is_dir() else final
            tracker.log_artifact(model_file, "checkpoints")
        (ckpt_dir / FINISHED).touch()
        log.info("done: %d steps; checkpoints in %s", step, ckpt_dir)
    tracker.close("FINISHED")
    return 0
