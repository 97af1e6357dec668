"""The training loop shared by pretraining and fine-tuning.

The engine owns what every run needs: devices and DDP, mixed precision, the optimiser and schedule,
gradient accumulation and clipping, checkpoints and exact resume, signals, logging. What differs
between pretraining and fine-tuning (data, how a batch becomes network input and target, how to
validate) comes from a :class:`Task`. The engine knows nothing of any particular network.

Exact resume: the data stream and every per-step random draw are functions of (seed, rank, step),
and the checkpoint carries the global RNG states (dropout), so N steps + resume + N steps equals 2N.

Divergence: a step whose loss or gradient norm is not finite (NaN or inf) changes nothing: the
optimiser skips it and the normalisation statistics its forward pass moved are put back; after
:data:`MAX_NONFINITE_STEPS` such steps in a row the run stops with an error. A checkpoint is only
ever written with finite weights.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from volumefusion import VolumeFusionError
from volumefusion.checkpoint import TrainingState, read_checkpoint, write_training
from volumefusion.config import Config, OptimConfig, changed_fields
from volumefusion.data.store import StoreChanged
from volumefusion.device import autocast, autocast_dtype, resolve_device
from volumefusion.log import get_logger, progress
from volumefusion.nets import main_output
from volumefusion.train.logging import RunLogger
from volumefusion.train.losses import DeepSupervisionLoss

log = get_logger(__name__)

# Settings that may change when a run resumes: how long it runs and how it reports, where and how
# fast it computes; everything else defines the run and must stay as the checkpoint has it.
RESUMABLE_CHANGES = frozenset({
    "run.max_steps", "run.stop_after", "run.device", "run.compile", "run.channels_last", "run.log_every",
    "run.val_every", "run.val_samples", "run.checkpoint_every", "run.keep_last", "run.image_every", "data.workers",
    "data.prefetch", "model.activation_checkpointing", "finetune.window_batch",
    *(f"probe.{name}" for name in ("every", "data", "split_file", "labelled", "seeds", "steps", "recipe")),
})

MAX_NONFINITE_STEPS = 5
"""Non-finite steps in a row after which a run stops: one is a bad batch, several are divergence."""

_SIGNAL, _DATA_ERROR = 1.0, 2.0
"""Why the ranks of a run stop together (the larger wins in their all-reduce)."""


class RunInterrupted(VolumeFusionError):
    """A run stopped by a signal (``signal``: ``"SIGINT"``, ``"SIGTERM"``) before its last step, after
    writing ``latest.pt``."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal = signal_name


def _changed_elsewhere() -> StoreChanged:
    return StoreChanged("the data changed under another rank of this run (its log names the file): "
                        "was the store prepared again while the run read it?")


class Task(Protocol):
    """What a training run is about; see :mod:`volumefusion.train.tasks`."""

    num_classes: int

    def batches(self, start_step: int, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        """Micro-batches from micro-step ``start_step`` on (an infinite, deterministic stream)."""

    def make_inputs(self, batch: dict[str, Any], generator: torch.Generator,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Network input (N, C, D, H, W) float and target labels (N, D, H, W) long, on ``device``."""

    def validate(self, model: nn.Module, device: torch.device, autocast) -> dict[str, float]:
        """Validation metrics; ``score`` (higher is better) chooses the best checkpoint."""

    def checkpoint_info(self) -> dict[str, Any]:
        """The checkpoint's ``task`` entry (kind, num_classes, label_names, preprocessing)."""

    def data_fingerprint(self) -> dict[str, Any] | None:
        """What identifies the run's training and validation data (None: nothing to check on resume)."""

    def save_images(self, path: Path, inputs: torch.Tensor, labels: torch.Tensor,
                    predictions: torch.Tensor) -> None:
        """A PNG montage of a few inputs with true and predicted class maps."""


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        """Ranks as set by torchrun (RANK, WORLD_SIZE, LOCAL_RANK); a single process otherwise."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def _next_batch(data: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The next batch; a VolumeFusionError raised in a loader worker (a store file it cannot read) comes
    back with its own one-line message, not wrapped in the worker's traceback as torch re-raises it."""
    try:
        return next(data)
    except VolumeFusionError as exc:
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        last = text.rstrip().splitlines()[-1]
        raise type(exc)(last.split(": ", 1)[1] if ": " in last else last) from None


def run_device(cfg: Config, local_rank: int = 0) -> torch.device:
    """The device a run trains on (``run.device``), after refusing what cannot run there: ``run.compile``
    on the CPU, where the code torch.compile generates (inductor, torch 2.13.0+cpu) aborts the process
    with glibc heap corruption ("corrupted size vs. prev_size", exit 134) in the first training step
    of PCT-Net; the network, a random batch, cross-entropy and Adam suffice, so it is PyTorch's bug."""
    device = resolve_device(cfg.run.device, local_rank, setting="run.device")
    if cfg.run.compile and device.type == "cpu":
        raise VolumeFusionError(
            f"run.compile=true on the CPU: torch {torch.__version__}'s compiled CPU code (inductor) corrupts memory "
            "in these networks' training and aborts the process minutes in; set run.compile=false on the CPU "
            "(compiling is for GPUs)")
    return device


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """Seed of the random draws of one micro-step (fusion, augmentation), independent of history."""
    return int(np.random.SeedSequence([seed, rank, micro_step]).generate_state(1, np.uint64)[0] >> 1)


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                           nesterov=cfg.momentum > 0)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning-rate multiplier at optimiser step ``step``: linear warm-up, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "step":
        return cfg.gamma ** (step // cfg.step_size)
    progress_ = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    if cfg.schedule == "poly":
        return (1 - progress_) ** cfg.poly_power
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress_))
    return 1.0


class _Signals:
    """First SIGINT/SIGTERM asks the loop to stop after the current step; a second one exits at once.

    ``loader``: the data iterator. SLURM, ``timeout`` and ``kill -- -PGID`` signal the whole process
    group, so loader workers die with the first SIGTERM; torch would then raise "DataLoader worker
    killed" at any point of the step (from its SIGCHLD handler) and lose the checkpoint. On a stop
    request the iterator's workers are taken off that watch: the step in progress already holds its
    batch. (Python runs pending handlers in signal-number order, SIGTERM 15 before SIGCHLD 17.)
    """

    def __init__(self, loader: Iterator | None = None):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        self._loader = loader

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            os._exit(128 + signum)
        self.requested = signal.Signals(signum).name
        if getattr(self._loader, "_worker_pids_set", False):
            from torch.utils.data._utils.signal_handling import _remove_worker_pids

            _remove_worker_pids(id(self._loader))
            self._loader._worker_pids_set = False
        log.warning("%s received: finishing the current step and writing a checkpoint "
                    "(send it again to exit at once)", self.requested)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class FitResult:
    step: int
    interrupted: str | None = None
    best_score: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        """0 for a finished run; 128 + the signal's number (130 SIGINT, 143 SIGTERM) for a run stopped
        by a signal, as a shell reports a process ended by it, so ``pretrain && finetune`` or a SLURM
        ``afterok`` dependency does not go on with an unfinished model."""
        if not self.interrupted:
            return 0
        name = self.interrupted if self.interrupted in signal.Signals.__members__ else "SIGTERM"
        return 128 + signal.Signals[name].value


class Trainer:
    """Train ``model`` on ``task`` under ``cfg`` (sections ``optim``, ``loss``, ``run``), writing to ``out_dir``.

    ``freeze``: ``(prefixes, steps)`` keeps the parameters whose names start with one of ``prefixes``
    unchanged for the first ``steps`` optimiser steps: learning rate 0 for that group, and in a single
    process no gradients for it either (a frozen encoder then costs no backward pass); under DDP the
    gradients are still computed, since toggling ``requires_grad`` after wrapping breaks DDP.

    ``on_checkpoint``: ``(every, fn)`` calls ``fn(latest.pt, step)`` on the main process every ``every``
    steps, after writing ``latest.pt``, and logs the metrics it returns (the other processes wait);
    a :class:`RunInterrupted` from it stops the run as a signal does.
    """

    def __init__(self, cfg: Config, model: nn.Module, task: Task, out_dir: str | Path, *,
                 resume: bool | str | Path = False, freeze: tuple[tuple[str, ...], int] | None = None,
                 on_checkpoint: tuple[int, Callable[[Path, int], dict[str, float]]] | None = None):
        self.cfg, self.task, self.out_dir = cfg, task, Path(out_dir)
        self.on_checkpoint = on_checkpoint
        self.dist = DistInfo.from_env()
        if self.dist.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if cfg.run.device != "cpu" and torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        self.device = run_device(cfg, self.dist.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        dtype = autocast_dtype(cfg.run.precision, self.device)
        if dtype == torch.bfloat16 and self.device.type == "cpu":
            log.warning("run.precision=bf16 on the CPU: oneDNN's bf16 3D-convolution backward (seen with torch %s) "
                        "turned most runs' losses into NaN within 20 steps; use run.precision=fp32 on the CPU "
                        "(bf16 is meant for GPUs)", torch.__version__)
        self.autocast = functools.partial(autocast, self.device, dtype)
        memory_format = torch.channels_last_3d if cfg.run.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format)
        self.loss_fn = DeepSupervisionLoss(task.num_classes, cfg.loss.dice_weight, cfg.loss.ce_weight,
                                           cfg.loss.deep_supervision)
        self.freeze_steps = freeze[1] if freeze else 0
        frozen = [p for n, p in model.named_parameters() if freeze and n.startswith(freeze[0])]
        frozen_ids = {id(p) for p in frozen}
        self._held = frozen if self.dist.world_size == 1 else []
        groups = [{"params": [p for p in model.parameters() if id(p) not in frozen_ids], "name": "main"}]
        if frozen:
            groups.append({"params": frozen, "name": "frozen"})
        self.optimizer = build_optimizer(groups, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [self._group_lambda(g["name"]) for g in groups])
        self.step = 0
        self.best_score: float | None = None
        self.nonfinite_in_row = 0
        # what a training-mode forward pass changes besides the parameters (normalisation running
        # statistics): restored after a non-finite step, which would otherwise leave them NaN for good
        self._running = [b for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                         for b in m.buffers()]
        self._running_before = [b.clone() for b in self._running]
        # the shapes and types of the last training inputs: a rank whose data fails mid-run under DDP
        # still takes part in that step's gradient reduction, with zeros of these (in a run's first
        # step there are none yet: that rank stops alone, and torchrun ends the others)
        self._input_like: tuple | None = None
        self.ckpt_dir = self.out_dir / "checkpoints"
        self._data = task.data_fingerprint()
        if resume:
            self._resume(resume)
        self.train_model: nn.Module = self.model
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.run.compile:
            self.train_model = torch.compile(self.train_model)
        self.logger = RunLogger(self.out_dir, enabled=self.dist.is_main, resume_step=self.step)

    def _group_lambda(self, name: str):
        def factor(step: int) -> float:
            if name == "frozen" and step < self.freeze_steps:
                return 0.0
            return lr_factor(step, self.cfg.optim, self.cfg.run.max_steps)
        return factor

    # ---------------------------------------------------------------------------------- checkpoints

    def save(self, name: str) -> Path | None:
        """Write checkpoint ``name``; a VolumeFusionError instead when the weights are not finite."""
        if not self.dist.is_main:
            return None
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        extra = {"best_score": self.best_score, "world_size": self.dist.world_size, "data": self._data}
        training = TrainingState(self.optimizer.state_dict(), self.scheduler.state_dict(), self.step, rng, extra)
        return write_training(self.ckpt_dir / name, self.model.state_dict(), self.cfg.to_dict(),
                              self.task.checkpoint_info(), training)

    def _save_numbered(self) -> None:
        if not self.dist.is_main:
            return
        self.save(f"step_{self.step:08d}.pt")
        numbered = sorted(self.ckpt_dir.glob("step_*.pt"))
        for old in numbered[: max(0, len(numbered) - self.cfg.run.keep_last)]:
            old.unlink()

    def _resume(self, resume: bool | str | Path) -> None:
        path = self.ckpt_dir / "latest.pt" if resume is True else Path(resume)
        if not path.exists():
            if resume is True:
                log.info("no checkpoint at %s: starting from step 0", path)
                return
            raise VolumeFusionError(f"--resume {path}: checkpoint not found")
        try:
            ckpt = read_checkpoint(path)
        except VolumeFusionError as exc:
            raise VolumeFusionError(f"{exc}{self._intact_hint(path)}") from None
        training = ckpt.training_state()
        if training is None:
            raise VolumeFusionError(f"--resume {path}: not a checkpoint of a volumefusion run (no config or "
                                    "optimizer state); to start from its weights use finetune --pretrained")
        changes = changed_fields(ckpt.config, self.cfg, ignore=RESUMABLE_CHANGES)
        if changes:
            raise VolumeFusionError(
                f"--resume {path}: the settings differ from the run's ({'; '.join(changes)}); resume with "
                f"the run's own config ({self.out_dir / 'config.yaml'}), or start a new run in another folder. "
                f"Only these may change on resume: {', '.join(sorted(RESUMABLE_CHANGES))}")
        saved = training.extra.get("data")
        if saved and self._data and saved["sha256"] != self._data["sha256"]:
            raise VolumeFusionError(
                f"--resume {path}: the run trained on other data ({saved['train']} training and {saved['val']} "
                f"validation cases; now {self._data['train']} and {self._data['val']}, or other contents); resume "
                "with the run's own --data and split, or start a new run in another folder")
        self.model.load_state_dict(ckpt.state)
        self.optimizer.load_state_dict(training.optimizer)
        self.scheduler.load_state_dict(training.scheduler)
        self.step = training.step
        self.best_score = training.extra.get("best_score")
        torch.set_rng_state(training.rng["torch"])
        if "cuda" in training.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(training.rng["cuda"])
        if self.step > self.cfg.run.max_steps:
            raise VolumeFusionError(f"--resume {path}: the run is at step {self.step}, beyond run.max_steps "
                                    f"{self.cfg.run.max_steps}; give a larger --max-steps to train on")
        log.info("resumed from %s at step %d%s", path, self.step,
                 " (run.max_steps: nothing left to train)" if self.step == self.cfg.run.max_steps else "")

    def _intact_hint(self, damaged: Path) -> str:
        """Where to resume from instead of a damaged checkpoint: the newest numbered one that reads."""
        for numbered in sorted(self.ckpt_dir.glob("step_*.pt"), reverse=True):
            if numbered == damaged:
                continue
            try:
                read_checkpoint(numbered)
            except VolumeFusionError:
                continue
            return f"; the newest intact checkpoint of this run is {numbered}: --resume {numbered}"
        return ""

    # ---------------------------------------------------------------------------------------- loop

    def _stop_requested(self, signals: _Signals, data_error: bool = False) -> float:
        """Whether any rank must stop, agreed by all ranks (they must stop at the same step): 0 no,
        ``_SIGNAL`` a rank got a signal, ``_DATA_ERROR`` a rank's data changed under the run."""
        flag = _DATA_ERROR if data_error else _SIGNAL if signals.requested else 0.0
        if self.dist.world_size == 1:
            return flag
        flag = torch.tensor([flag], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item()

    def _train_step(self, data: Iterator[dict[str, Any]], keep: bool) -> tuple[torch.Tensor | None, int, tuple | None]:
        """One optimiser step over ``accumulate`` micro-batches.

        Returns the loss (a device tensor; None when the loss or the gradient norm was not finite and
        the step was skipped), the samples seen, and, if ``keep``, the last micro-batch's (inputs,
        labels, outputs) for pictures.
        """
        accumulate = self.cfg.optim.accumulate
        self.train_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        held = self.step < self.freeze_steps
        if self._held and self._held[0].requires_grad == held:
            for p in self._held:
                p.requires_grad_(not held)
        if self._running:
            torch._foreach_copy_(self._running_before, self._running)
        total = torch.zeros((), device=self.device)
        samples = 0
        data_error = None
        for micro in range(accumulate):
            micro_step = self.step * accumulate + micro
            generator = torch.Generator().manual_seed(step_seed(self.cfg.run.seed, self.dist.rank, micro_step))
            if data_error is None:
                try:
                    x, y = self.task.make_inputs(_next_batch(data), generator, self.device)
                    self._input_like = (x.shape, x.dtype, y.shape, y.dtype)
                except StoreChanged as exc:
                    if self.dist.world_size == 1 or self._input_like is None:
                        raise
                    data_error = exc  # the other ranks wait in this step's gradient reduction: join them
            if data_error is not None:
                x_shape, x_dtype, y_shape, y_dtype = self._input_like
                x = torch.zeros(x_shape, dtype=x_dtype, device=self.device)
                y = torch.zeros(y_shape, dtype=y_dtype, device=self.device)
            if self.cfg.run.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            sync = micro == accumulate - 1 or not isinstance(self.train_model, nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else self.train_model.no_sync()), self.autocast():
                outputs = self.train_model(x)
                loss = self.loss_fn(outputs, y) / accumulate
            loss.backward()
            total += loss.detach()
            samples += x.shape[0]
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.cfg.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(grads, self.cfg.optim.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        # one synchronisation a step; under DDP the gradients agree but the losses are per rank
        bad = (~torch.isfinite(norm + total)).float()
        if self.dist.world_size > 1:
            if data_error is not None:
                bad.fill_(_DATA_ERROR)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        verdict = bad.item()
        finite = not verdict
        if finite:
            self.optimizer.step()
        elif self._running:
            torch._foreach_copy_(self._running, self._running_before)
        if verdict == _DATA_ERROR:  # every rank stops before this step, with the weights of the last
            raise data_error or _changed_elsewhere()
        if not finite:
            log.warning("step %d: the loss (%s) or the gradient norm (%s) is not finite; step skipped",
                        self.step + 1, f"{total.item():.4g}", f"{norm.item():.4g}")
        self.scheduler.step()
        return total if finite else None, samples, (x, y, outputs) if keep else None

    def validate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            metrics = self.task.validate(self.model, self.device, self.autocast)
        score = metrics.get("score")
        if score is not None and math.isfinite(score) and (self.best_score is None or score > self.best_score):
            self.best_score = score
            self.save("best.pt")
        return metrics

    def _call_hook(self, run) -> None:
        if self.step % run.checkpoint_every:
            self.save("latest.pt")
        # the hook's own runs draw random numbers: the run's stream continues as if it had not been called
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            record = {"step": self.step, **self.on_checkpoint[1](self.ckpt_dir / "latest.pt", self.step)}
        self.logger.log(record)
        self.logger.plot(force=False)

    def _stop_on_data_error(self, exc: StoreChanged, bar) -> None:
        """The data changed under the run: write ``latest.pt`` (the weights of the last finished step)
        and stop with the data's error and where to continue from."""
        bar.close()
        self.logger.close()
        path = None
        with contextlib.suppress(VolumeFusionError):  # non-finite weights are not saved
            path = self.save("latest.pt")
        saved = f"; stopped at step {self.step}, {path} written: continue with --resume" if path else ""
        raise StoreChanged(f"{exc}{saved}") from None

    def fit(self) -> FitResult:
        run = self.cfg.run
        accumulate = self.cfg.optim.accumulate
        result = FitResult(step=self.step)
        data = iter(self.task.batches(self.step * accumulate, self.dist.rank, self.dist.world_size))
        bar = progress(total=run.max_steps, initial=self.step, desc="train", unit="step",
                       disable=None if self.dist.is_main else True)
        running, count, skipped, t_log = torch.zeros((), device=self.device), 0, 0, time.perf_counter()
        samples_since = 0
        first = self.step
        end = min(run.stop_after or run.max_steps, run.max_steps)
        with _Signals(data) as signals:
            while self.step < end:
                want_images = self.dist.is_main and ((self.step + 1) % run.image_every == 0 or self.step == 0)
                try:
                    loss, samples, last = self._train_step(data, keep=want_images)
                except torch.cuda.OutOfMemoryError:
                    if self.step != first:
                        raise
                    raise VolumeFusionError(
                        f"out of GPU memory in the first step (batch {run.batch_size}, crop "
                        f"{list(self.cfg.data.crop_size)}): lower --batch-size (use optim.accumulate to keep "
                        "the global batch), set model.activation_checkpointing=true, or use a smaller "
                        "data.crop_size") from None
                except StoreChanged as exc:
                    self._stop_on_data_error(exc, bar)
                except RuntimeError as exc:
                    # a signal to the process group can end a loader worker before this step got its
                    # batch: that is the stop that was asked for, not a failure
                    if not signals.requested or "DataLoader worker" not in str(exc):
                        raise
                    result.interrupted = signals.requested
                    break
                self.step += 1
                if loss is None:
                    skipped += 1
                    self.nonfinite_in_row += 1
                    if self.nonfinite_in_row >= MAX_NONFINITE_STEPS:
                        break
                else:
                    self.nonfinite_in_row = 0
                    running += loss
                    count += 1
                samples_since += samples * self.dist.world_size
                bar.update(1)
                if self.step % run.log_every == 0 or self.step == end:
                    elapsed = time.perf_counter() - t_log
                    record = {"step": self.step, "loss": running.item() / count if count else float("nan"),
                              "lr": self.optimizer.param_groups[0]["lr"],
                              "samples_per_s": samples_since / max(elapsed, 1e-9)}
                    if skipped:
                        record["skipped_steps"] = skipped
                    if self.device.type == "cuda":
                        record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    self.logger.log(record)
                    result.history.append(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    sps=f"{record['samples_per_s']:.1f}", refresh=False)
                    running.zero_()
                    count, skipped, samples_since, t_log = 0, 0, 0, time.perf_counter()
                if last is not None:
                    x, y, outputs = last
                    pred = main_output(outputs).argmax(1)
                    self.task.save_images(self.out_dir / "images" / f"step_{self.step:08d}.png", x, y, pred)
                data_error = None
                if self.step % run.val_every == 0 or self.step == end:
                    if self.dist.is_main:
                        try:
                            metrics = self.validate()
                            record = {"step": self.step, **{f"val_{k}": v for k, v in metrics.items()}}
                            self.logger.log(record)
                            result.history.append(record)
                        except StoreChanged as exc:
                            data_error = exc  # every rank hears of it below, and all stop together
                    self.logger.plot(force=False)
                if self.step % run.checkpoint_every == 0:
                    self.save("latest.pt")
                    if run.keep_last:
                        self._save_numbered()
                if self.on_checkpoint and self.step % self.on_checkpoint[0] == 0 and self.dist.is_main:
                    try:
                        self._call_hook(run)
                    except RunInterrupted as exc:
                        signals.requested = exc.signal
                stop = self._stop_requested(signals, data_error is not None)
                if stop == _DATA_ERROR:
                    self._stop_on_data_error(data_error or _changed_elsewhere(), bar)
                if stop:
                    result.interrupted = signals.requested or "signal on another rank"
                    break
        bar.close()
        for p in self._held:  # the model leaves as trainable as it came
            p.requires_grad_(True)
        if self.nonfinite_in_row >= MAX_NONFINITE_STEPS:
            self.logger.close()
            raise VolumeFusionError(
                f"the loss or the gradients were not finite (NaN or inf) in {self.nonfinite_in_row} steps in a row, "
                f"steps {self.step - self.nonfinite_in_row + 1} to {self.step}: training diverged. Lower optim.lr "
                f"(now {self.cfg.optim.lr:g}), set optim.grad_clip, or use run.precision=fp32 on the CPU; skipped "
                f"steps change no weights, so the checkpoints in {self.ckpt_dir} hold weights from before them")
        self.save("latest.pt")
        self.logger.plot()
        self.logger.close()
        result.step, result.best_score = self.step, self.best_score
        if result.interrupted and self.dist.is_main:
            log.warning("stopped at step %d (%s); continue with --resume", self.step, result.interrupted)
        return result
