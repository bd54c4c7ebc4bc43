"""Train and test URA-Net end to end: the functions behind the CLI, the benchmarks and the bundle."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint
from ignite.handlers.tqdm_logger import ProgressBar
from monai.utils import set_determinism

from ura_monai.engines.calibration import fusion_weight_from_items
from ura_monai.engines.evaluation import normal_scores_and_maps
from ura_monai.engines.features import (
    FeatureBankDataset,
    FeatureCacheDataset,
    bank_view_images,
    fit_normal_statistics,
)
from ura_monai.engines.perception import train_perception_from_items
from ura_monai.engines.schedule import CosineDecay
from ura_monai.engines.trainer import URANetTrainer
from ura_monai.losses.ura_loss import URANetLoss
from ura_monai.networks.blocks.restoration import RestorationTransformer
from ura_monai.networks.checkpoint import save_checkpoint
from ura_monai.networks.nets.ura_net import URANet
from ura_monai.transforms.thresholds import DEFAULT_FALSE_ALARM_RATE, normal_postprocessing_stats, stored_normal_scores
from ura_monai.utils.fileio import atomic_torch_save
from ura_monai.utils.paths import mark_output_dir

__all__ = [
    "FeatureBankDataset",
    "default_schedule",
    "fit",
    "split_normal_validation",
    "training_channels",
]

logger = logging.getLogger("ura_monai")


class _GeneratorState:
    """Lets ignite's ``Checkpoint`` save and restore a ``torch.Generator``."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["state"])


TRAIN_STATE_NAME = "train_state.pt"
# the default schedule (``epochs=None``): 3 epochs; with the restoration transformer each of at least 100 optimizer
# steps (a small set is cycled), so that it trains on 25 images (3 steps a pass) as on a large set
DEFAULT_EPOCHS = 3
DEFAULT_MIN_STEPS = 300
# the settings a resumed run must share with the saved one (the epoch count may grow)
_RESUME_KEYS = ("image_size", "augment", "seed", "batch_size", "channels", "model")


def _train_states(state_dir: Path) -> list[Path]:
    """Training states written by earlier versions through ignite's ``Checkpoint``, oldest first."""

    def iteration(path: Path) -> int:
        digits = path.stem.rsplit("_", 1)[-1]
        return int(digits) if digits.isdigit() else -1

    return sorted(state_dir.glob("train_checkpoint_*.pt"), key=iteration)


def _image_channels(path: str) -> int | None:
    """1 or 3: the channels ``read_image_array`` gives the file (from its header); None when unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode = img.mode
    except Exception:  # noqa: BLE001 - the loader reports unreadable files itself
        return None
    return 1 if mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;16") else 3


def training_channels(items: Sequence[dict]) -> int:
    """The channel count a model is trained with: 3 when any training image is colour, else 1.

    Every image is then converted to it, so one grey image among RGB ones (or the reverse) batches; the count is
    stored in the checkpoint, and test / predict convert images to it with a warning.
    """
    return 3 if any(_image_channels(str(item["image"])) == 3 for item in items) else 1


def _check_resumable(saved: dict[str, Any], run_config: dict[str, Any], path: Path) -> None:
    stored = saved.get("run_config")
    if stored is None:
        logger.warning("%s records no settings (an older version wrote it): resuming without checking them", path)
        return
    different = [k for k in _RESUME_KEYS if stored.get(k) != run_config.get(k)]
    if different:
        changes = "; ".join(f"{k}: saved {stored.get(k)!r}, now {run_config.get(k)!r}" for k in different)
        raise ValueError(
            f"cannot resume the run in {path.parent.parent}: its settings differ ({changes}); resume with the saved "
            "settings, or start a fresh run (ura-monai fit --overwrite)"
        )


def split_normal_validation(items: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out ``fraction`` of the normal training images (at least one, when there are 5 or more) for thresholds."""
    items = list(items)
    n_val = max(1, round(fraction * len(items))) if fraction > 0 and len(items) >= 5 else 0
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    val = [items[i] for i in sorted(order[:n_val])]
    train = [items[i] for i in sorted(order[n_val:])]
    return train, val


def fit(
    train_items: Sequence[dict],
    output_dir: str | Path,
    image_size: int = 256,
    epochs: int | None = None,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    augment: str = "none",
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    amp: bool = False,
    tensorboard: bool = False,
    resume: bool = False,
    progress: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    loss_kwargs: dict[str, Any] | None = None,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
) -> dict[str, Any]:
    """Train URA-Net on normal images and write ``<output_dir>/model.pt`` with thresholds.

    The backbone is frozen, so its features are computed once per training view (``augment`` gives the
    views) and cached; training then runs on the cache, which makes CPU training practical.

    Args:
        train_items: datalist of normal images (``label`` 0).
        output_dir: where ``model.pt``, ``train_state/`` (resumable state) and ``runs/`` (TensorBoard) go.
        image_size: square input size (a multiple of 32).
        epochs: passes of the main loop (RAM training) over the cached features; None: the CPU schedule (3 epochs;
            the restoration transformer's of 100 steps or more: :func:`default_schedule`); 20: the longer one.
        batch_size: batch size of images and of features.
        learning_rate, weight_decay: AdamW settings.
        augment: cached views: ``none``, ``hflip`` or ``dihedral`` (see ``augmented_views``).
        val_fraction: fraction of normal images held out to set thresholds.
        seed: seeds everything (MONAI's ``set_determinism``) and FASM's generator.
        device: ``cpu`` or ``cuda``.
        num_workers: DataLoader workers for decoding images.
        amp: mixed precision on CUDA.
        tensorboard, progress: log losses to ``<output_dir>/runs``; progress bars.
        resume: continue from ``<output_dir>/train_state/train_state.pt`` (the last complete epoch) when present;
            its settings (image size, model, augment, seed, batch size, channels) must match, else ValueError.
            Without ``resume`` an earlier run's state in ``output_dir`` is deleted (never resumed later by mistake).
        model_kwargs: ``URANet`` arguments (ablation switches, sizes, map and score options).
        loss_kwargs: ``URANetLoss`` weights.
        false_alarm_rate: the fraction of normal images above the stored image threshold (its operating point).

    Returns:
        dict with ``checkpoint`` (path), ``postprocessing`` (thresholds) and the ``normal_scores`` they come from,
        ``fit_seconds``, ``epochs``, ``losses``, the trained ``model``, its cached ``features`` (level-scaled), ``groups``.
    """
    # fmt: off
    start, device = time.perf_counter(), torch.device(device)
    set_determinism(seed)
    output_dir = mark_output_dir(output_dir, "fit")  # so that the output-folder rule knows it as a fit run
    fit_items, val_items, channels = _fit_and_threshold_items(train_items, val_fraction, seed)
    model = URANet(image_size=image_size, **(model_kwargs or {})).to(device)
    run_config = {"image_size": image_size, "augment": augment, "seed": seed, "batch_size": batch_size, "channels": channels,
                  "model": {k: v for k, v in model.config.items() if k not in ("num_samples", "backbone_weights")}}
    saved = _saved_train_state(output_dir, resume, run_config, device)
    # one generator for the prototype draw, then the shuffling and FASM (it is saved with the training state)
    generator = torch.Generator().manual_seed(seed)
    dataset = _normal_feature_cache(model, fit_items, image_size, augment, channels, batch_size, device, num_workers,
                                    amp, progress, generator)
    epochs, epoch_length = default_schedule(model, len(dataset), batch_size) if epochs is None else (epochs, None)
    losses = _train(model, dataset, generator, output_dir, run_config, saved, epochs, epoch_length, learning_rate=learning_rate,
                    weight_decay=weight_decay, device=device, amp=amp, loss_kwargs=loss_kwargs, progress=progress,
                    tensorboard=tensorboard)
    train_seconds = time.perf_counter() - start
    postprocessing, normal_scores, fusion_scores, perception = _calibrate(model, fit_items, val_items, dataset, image_size,
        channels, batch_size, device, num_workers, amp, seed, progress, augment, false_alarm_rate)
    extra = {"image_size": image_size, "channels": channels, "epochs": epochs, "seed": seed, "augment": augment,
             "batch_size": batch_size, "learning_rate": learning_rate, "train_images": len(fit_items),
             "val_images": len(val_items), "fit_seconds": round(time.perf_counter() - start, 2),
             "fusion_scores": fusion_scores, "perception_training": perception, "normal_image_scores": normal_scores}
    logger.info("wrote %s", checkpoint := save_checkpoint(output_dir / "model.pt", model, postprocessing, extra))
    return {"checkpoint": str(checkpoint), "postprocessing": postprocessing, "fit_seconds": extra["fit_seconds"], "epochs": epochs,
            "train_seconds": round(train_seconds, 2), "losses": losses, "model": model, "features": dataset.bank,
            "groups": dataset.groups, "normal_scores": normal_scores}
    # fmt: on


def default_schedule(model: URANet, samples: int, batch_size: int) -> tuple[int, int | None]:
    """``(epochs, epoch length in steps)`` of the default schedule for ``samples`` cached training features:
    ``DEFAULT_EPOCHS`` passes; with the restoration transformer each is lengthened (the loader cycled) to reach
    ``DEFAULT_MIN_STEPS`` steps in all (the attention RAM's default map does not depend on the length). None: one
    pass over the loader (which drops the last partial batch)."""
    if not isinstance(model.ram, RestorationTransformer):
        return DEFAULT_EPOCHS, None
    steps_per_pass = max(1, samples // batch_size) if samples > batch_size else 1
    needed = -(-DEFAULT_MIN_STEPS // DEFAULT_EPOCHS)
    return DEFAULT_EPOCHS, (needed if steps_per_pass < needed else None)


def _normal_feature_cache(
    model: URANet,
    fit_items: Sequence[dict],
    image_size: int,
    augment: str,
    channels: int,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    amp: bool,
    progress: bool,
    generator: torch.Generator,
) -> FeatureCacheDataset:
    """The backbone features of the training images (once per view), with the model's normal statistics (level
    scale, prototypes, position model, calibration) fitted on them; the cache holds them under the level scale."""
    dataset = FeatureCacheDataset(model, fit_items, image_size, augment, channels, batch_size, device, num_workers,
                                  amp, init_prototypes=False, progress=progress)  # fmt: skip
    dataset.bank = fit_normal_statistics(model, dataset.bank.to(device), generator, dataset.groups).cpu()
    return dataset


def _calibrate(
    model: URANet,
    fit_items: Sequence[dict],
    val_items: Sequence[dict],
    dataset: FeatureBankDataset,
    image_size: int,
    channels: int,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    amp: bool,
    seed: int,
    progress: bool = False,
    augment: str = "none",
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
) -> tuple[dict[str, float], list[float], dict[str, float] | None, dict[str, Any]]:
    """``(thresholds, the normal image scores they come from (sorted: ``stored_normal_scores``), fusion and residual
    weight scores by weight, perception training summary)`` after training.

    The fused map's weight is chosen on FASM's image-level synthetic defects painted into the held-out normal
    images (unseen by the normal models); it stays 0.5 without FASM or when too few images were held out. The
    signal perception is then trained on synthetic defects painted into the training images (cross-fitted
    signals; ``engines/perception.py``). The thresholds come from normal data, with the uncertainty passes off
    (they do not change the map); a map guided by the image reads the training images again, view by view in the
    bank's order (``augment``)."""
    fusion_scores, bank = None, dataset.bank
    was_training = model.training
    model.eval()
    fused_prior = model.anomaly_map_source == "fused" or model.uses_signal_map
    if val_items is not fit_items and fused_prior and model.fasm is not None:
        fusion_scores = fusion_weight_from_items(
            model, val_items, image_size, channels, batch_size, device, seed, bank=bank
        )
    perception = train_perception_from_items(model, fit_items, bank, image_size, channels, batch_size, seed, progress,
                                             calibrate_residual=fusion_scores is None)  # fmt: skip
    model.train(was_training)
    training_images = bank_view_images(fit_items, image_size, augment, channels, batch_size, num_workers, device)
    scores, maps = normal_scores_and_maps(model, val_items, image_size, channels=channels, batch_size=batch_size,
                                          device=device, num_workers=num_workers, amp=amp, training_features=bank,
                                          training_images=training_images, training_groups=dataset.groups)  # fmt: skip
    return (
        normal_postprocessing_stats(scores, maps, false_alarm_rate=false_alarm_rate),
        stored_normal_scores(scores),
        None if fusion_scores is None else {k: round(v, 4) for k, v in fusion_scores.items()},
        perception,
    )


def _fit_and_threshold_items(
    train_items: Sequence[dict], val_fraction: float, seed: int
) -> tuple[list[dict], list[dict], int]:
    """``(images to train on, images to set thresholds with, channel count)`` of a run's training images."""
    if not train_items:
        raise ValueError("no training images")
    fit_items, val_items = split_normal_validation(train_items, val_fraction, seed)
    if not val_items:
        logger.warning("fewer than 5 training images: thresholds come from the training images themselves")
        val_items = fit_items
    # one channel count for every image of the run (a grey image among RGB ones would not batch); stored in the checkpoint
    return fit_items, val_items, training_channels(train_items)


def _train(
    model: URANet,
    dataset: FeatureBankDataset,
    generator: torch.Generator,
    output_dir: Path,
    run_config: dict[str, Any],
    saved: tuple[dict[str, Any] | None, Path | None],
    epochs: int,
    epoch_length: int | None,
    learning_rate: float,
    weight_decay: float,
    device: torch.device,
    amp: bool,
    loss_kwargs: dict[str, Any] | None,
    progress: bool,
    tensorboard: bool,
) -> dict[str, float]:
    """Train on the cached features for ``epochs`` of ``epoch_length`` steps (None: one pass; continuing the ``saved``
    state when there is one), saving the training state after every epoch; returns the last epoch's loss terms."""
    if not any(p.requires_grad for p in model.parameters()):
        return {}  # the signal perception without the RAM: nothing for the main loop to train
    trainer, optimizer, scheduler = _trainer(
        model,
        dataset,
        generator,
        epochs,
        epoch_length,
        run_config["batch_size"],
        learning_rate,
        weight_decay,
        device,
        amp,
        loss_kwargs,
    )
    _attach_logging(trainer, output_dir, progress, tensorboard)
    state_path = output_dir / "train_state" / TRAIN_STATE_NAME
    state = {
        "network": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "trainer": trainer,
        "rng": _GeneratorState(generator),
    }
    _make_resumable(trainer, state, state_path, run_config, *saved, epochs)
    losses: dict[str, float] = {}

    @trainer.on(Events.EPOCH_COMPLETED)
    def _record(engine):
        losses.update({k: float(v) for k, v in engine.state.output.items()})
        logger.info("epoch %d/%d: %s", engine.state.epoch, epochs, {k: round(v, 4) for k, v in losses.items()})

    if trainer.state.epoch < epochs:  # a finished run that is resumed is not trained again
        trainer.run()
    for legacy in _train_states(state_path.parent):  # ignite-named states of an older version, now in train_state.pt
        if state_path.is_file():
            legacy.unlink()
    return losses


def _make_resumable(
    trainer: URANetTrainer,
    state: dict[str, Any],
    state_path: Path,
    run_config: dict[str, Any],
    saved_state: dict[str, Any] | None,
    saved_from: Path | None,
    epochs: int,
) -> None:
    """Save the training ``state`` after every epoch and, with ``saved_state``, continue from it.

    The state is everything needed to continue exactly where an interrupted run stopped: network, optimizer,
    schedule, trainer and the generator behind FASM draws and shuffling.
    """

    @trainer.on(Events.EPOCH_COMPLETED)
    def _save_state(engine):
        # one file, replaced atomically: a kill during the save leaves the previous epoch's state whole
        atomic_torch_save(state_path, {"run_config": run_config, **{k: obj.state_dict() for k, obj in state.items()}})

    if saved_state is not None:
        schedule = state["scheduler"].lr_lambdas[0]
        total_steps = schedule.total_steps
        Checkpoint.load_objects(state, saved_state)
        schedule.total_steps = total_steps  # decay over this run's total (more epochs may be asked), not the saved one
        trainer.state.max_epochs = epochs  # the saved state's max_epochs would make ignite restart a finished run
        logger.info("resuming from %s (epoch %d)", saved_from, trainer.state.epoch)


def _saved_train_state(
    output_dir: Path, resume: bool, run_config: dict[str, Any], device: torch.device
) -> tuple[dict[str, Any] | None, Path | None]:
    """``(state, its path)`` to resume from, ``(None, None)`` for a fresh run.

    With ``resume``: ``train_state/train_state.pt`` (or an older version's newest ignite-named state), checked
    against ``run_config``. Without: an earlier run's states are deleted, so that they are never resumed later in
    this run's place.
    """
    state_dir = output_dir / "train_state"
    state_path = state_dir / TRAIN_STATE_NAME
    if resume:
        candidates = [state_path] if state_path.is_file() else _train_states(state_dir)[-1:]
        if candidates:
            saved_state = torch.load(candidates[-1], map_location=device, weights_only=True)
            _check_resumable(saved_state, run_config, candidates[-1])
            return saved_state, candidates[-1]
        logger.warning("--resume: no saved training state in %s; training starts at epoch 1", state_dir)
        return None, None
    for stale in [state_path, *_train_states(state_dir)]:
        stale.unlink(missing_ok=True)
    if (output_dir / "model.pt").exists():
        logger.warning("replacing %s of an earlier run", output_dir / "model.pt")
    return None, None


def _trainer(
    model: URANet,
    dataset: FeatureBankDataset,
    generator: torch.Generator,
    epochs: int,
    epoch_length: int | None,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    device: torch.device,
    amp: bool,
    loss_kwargs: dict[str, Any] | None,
) -> tuple[URANetTrainer, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The trainer over the cached features (shuffled with ``generator``), with its AdamW optimizer and the cosine
    schedule stepped every iteration."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=min(batch_size, len(dataset)),
        shuffle=True,
        drop_last=len(dataset) > batch_size,
        generator=generator,
    )
    loss_function = URANetLoss(model.level_channels, dataset_positions=dataset.positions, **(loss_kwargs or {}))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=learning_rate,
        betas=(0.9, 0.95),
        weight_decay=weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, CosineDecay(epochs * (epoch_length or len(loader))))
    trainer = URANetTrainer(
        device=device,
        max_epochs=epochs,
        epoch_length=epoch_length,
        train_data_loader=loader,
        network=model,
        optimizer=optimizer,
        loss_function=loss_function,
        amp=amp,
        generator=generator,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: scheduler.step())
    return trainer, optimizer, scheduler


def _attach_logging(trainer: URANetTrainer, output_dir: Path, progress: bool, tensorboard: bool) -> None:
    """A progress bar with the loss, and the loss terms in TensorBoard under ``<output_dir>/runs``."""
    if progress:
        ProgressBar(desc="train", persist=False).attach(
            trainer, output_transform=lambda out: {"loss": float(out["loss"])}
        )
    if tensorboard:
        from monai.handlers import TensorBoardStatsHandler

        TensorBoardStatsHandler(
            log_dir=str(output_dir / "runs"), output_transform=lambda out: {k: float(v) for k, v in out.items()}
        ).attach(trainer)
