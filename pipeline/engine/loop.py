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

from pipeline.collectives import all_gather_objects, any_rank, barrier
from pipeline.config import config_to_dict, dump_config, save_config
from pipeline.data import build_train_loader
from pipeline.distributed import DistInfo, device_for, init_distributed, shutdown_distributed
from pipeline.modeling import build_model
from pipeline.modeling.weights import load_init_weights, load_strict_state
from pipeline.tracking import build_tracker

from .checkpoint import (
    FINISHED,
    CheckpointError,
    checkpoint_dir,
    latest_entry,
    rng_state,
    set_rng_state,
)
from .checkpoint import resolve_resume as find_resume
from .optim import build_optimization, build_schedule, place_schedule
from .preemption import PREEMPTED_EXIT_CODE, PreemptionFlag
from .progress import ProgressMeter, append_metrics, plot_loss_curve, truncate_metrics
from .strategy import build_strategy
from .sync_bn import convert_sync_batchnorm

log = logging.getLogger("pipeline.train")


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a NaN or Inf loss."""


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


def run_tags(cfg, info: DistInfo, schedule) -> dict[str, str]:
    hosts = sorted(set(all_gather_objects(socket.gethostname())))
    return {
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
        return _train(cfg, info)
    finally:
        shutdown_distributed()


def _train(cfg, info: DistInfo) -> int:
    device = device_for(info)
    t = cfg.train
    out = Path(t.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    preemption = PreemptionFlag().install()

    # --- the model, its initial weights, the optimizer, the data, the strategy ----------------
    torch.manual_seed(t.seed)
    model = build_model(cfg).to(device)
    if cfg.model.backbone.norm == "sync_bn" and info.world_size > 1:
        model = convert_sync_batchnorm(model, device)
    resume_from = find_resume(t.resume, out)
    if resume_from is None and t.init_from:
        try:
            report = load_init_weights(model, t.init_from)
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
    tags = run_tags(cfg, info, schedule)
    tracker = build_tracker(cfg, stage="train", run_dir=out, rank=info.rank)
    if tracking_state and tracker.run_id and tracker.run_id != tracking_state.get("run_id"):
        log.warning(
            "the checkpoint was made by MLflow run %s; logging to %s",
            tracking_state.get("run_id"),
            tracker.run_id,
        )
    if step == 0:
        tracker.log_params(config_to_dict(cfg))
    tracker.set_tags(tags)
    if info.is_main:
        log.info(
            "training %s on %d process(es) (%s nodes, %s) from step %d: %s",
            cfg.distributed.strategy,
            info.world_size,
            tags["num_nodes"],
            device,
            step,
            schedule.describe(),
        )

    def save(at_step: int) -> None:
        client_state = {
            "step": at_step,
            "epoch": loader.epoch,
            "loader": loader.state_dict(),
            "rng": rng_state(),
            "config": dump_config(cfg),
            "model_args": dict(strategy.module.model_args),
            "world_size": info.world_size,
            "global_batch": schedule.global_batch,
            "images_seen": images_seen,
            "tracking": {"run_id": tracker.run_id, "uri": getattr(tracker, "uri", None)},
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
    nonfinite_in_row = 0
    preempted = False
    while step < schedule.max_steps:
        good = 0
        while good < accumulation:
            waited = time.perf_counter()
            images, targets = next(batches)
            meter.add_data_wait(time.perf_counter() - waited)
            images, targets = to_device(images, targets, device)
            generator.manual_seed(step_seed(t.seed, step, good + nonfinite_in_row, info.rank))
            with strategy.sync_context(last_micro_batch=good == accumulation - 1):
                losses = strategy.forward(images, targets)
                loss = sum(losses.values())
                (nonfinite,) = any_rank([not bool(torch.isfinite(loss))])
                if nonfinite:
                    nonfinite_in_row += 1
                    if info.is_main:
                        values = {k: round(float(v.detach()), 4) for k, v in losses.items()}
                        log.warning(
                            "step %d: non-finite loss on some rank %s; batch skipped (%d in a row)",
                            step + 1,
                            values,
                            nonfinite_in_row,
                        )
                    if nonfinite_in_row >= t.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{nonfinite_in_row} batches in a row had a NaN or Inf loss at step "
                            f"{step + 1}; lower train.lr, set train.clip_grad_norm, or check the "
                            f"data (last losses {values if info.is_main else ''})"
                        )
                    continue
                strategy.backward(loss, accumulation)
            nonfinite_in_row = 0
            meter.add_losses(losses)
            good += 1
        grad_norm = strategy.optimizer_step()
        step += 1
        images_seen += schedule.global_batch
        meter.step_done()
        (preempted,) = any_rank([preemption.requested])

        if step % t.log_every == 0 or step == schedule.max_steps or preempted:
            line, metrics = meter.report(step, strategy.lr(), grad_norm)
            if info.is_main:
                log.info(line)
                append_metrics(out, step, metrics)
                tracker.log_metrics(metrics, step=step)
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
            model_file = final / "mp_rank_00_model_states.pt" if final.is_dir() else final
            tracker.log_artifact(model_file, "checkpoints")
        (ckpt_dir / FINISHED).touch()
        log.info("done: %d steps; checkpoints in %s", step, ckpt_dir)
    tracker.close("FINISHED")
    return 0
