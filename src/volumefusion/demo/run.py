"""Running the demo: the live pretraining and the fine-tuning runs, scheduled over processes.

Each fine-tuning run (:class:`FinetuneJob`) fine-tunes with :func:`volumefusion.train.runs.finetune`,
then segments the held-out phantoms with its ``best.pt`` (:func:`volumefusion.infer.predict_files`)
and scores them (:func:`volumefusion.evaluate.evaluate_folders`). On a CPU the runs go to one process per
core (each with its own torch threads), the live pretraining among them; on a GPU one after another.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from volumefusion import VolumeFusionError
from volumefusion.config import load, save
from volumefusion.data.store import Store
from volumefusion.demo.data import DemoData, make_data
from volumefusion.demo.report import write_report
from volumefusion.demo.results import DemoResult, PretrainResult, RunResult
from volumefusion.demo.settings import ARMS, DemoSettings, load_settings
from volumefusion.device import resolve_device
from volumefusion.evaluate import evaluate_folders
from volumefusion.infer import predict_files
from volumefusion.io import atomic_write_text, check_writable_folder
from volumefusion.log import get_logger, setup
from volumefusion.nets import build_model, main_output
from volumefusion.nets.weights import resolve_weights
from volumefusion.processes import cpu_count, worker_pool
from volumefusion.train.logging import read_metrics
from volumefusion.train.runs import finetune, pretrain

log = get_logger(__name__)

RUN_OVERHEAD_STEPS = 20


@dataclass(frozen=True)
class FinetuneJob:
    """One fine-tuning run and its evaluation on the held-out phantoms (picklable: it may run in a
    worker process)."""

    seed: int
    arm: str
    labelled: int
    run_dir: Path
    config: Path
    overrides: tuple[str, ...]
    dataset: Path
    pretrained: Path | None
    test_images: Path
    test_labels: Path
    label_names: dict[int, str]
    device: str


def evaluate_checkpoint(checkpoint: Path, images: Path, labels: Path, label_names: dict[int, str],
                        device: str, run_dir: Path) -> dict[str, dict[str, float]]:
    """``{organ: {case: Dice}}`` of ``checkpoint`` on the held-out phantoms: their label maps go to
    ``run_dir/predictions/`` (:func:`volumefusion.infer.predict_files`), every metric to
    ``run_dir/metrics.csv`` (:func:`volumefusion.evaluate.evaluate_folders`)."""
    predicted = predict_files(checkpoint, [images], run_dir / "predictions", device=device)
    if predicted.failed:
        raise VolumeFusionError(f"{checkpoint}: prediction failed: {predicted.format()}")
    organs = {v: n for v, n in label_names.items() if v}
    evaluate_folders(run_dir / "predictions", labels, run_dir / "metrics.csv", organs, tolerance_mm=1.0)
    dice: dict[str, dict[str, float]] = {name: {} for name in organs.values()}
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            dice[row["label"]][row["case"]] = float(row["dice"])
    return dice


def _worker_setup(threads: int | None, verbosity: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    if verbosity is not None:
        setup(verbosity)


def run_job(job: FinetuneJob, threads: int | None = None, verbosity: int | None = None) -> RunResult:
    """Fine-tune, then score ``best.pt`` on the held-out phantoms. ``threads``/``verbosity``: torch
    threads and log level (:func:`volumefusion.log.setup`) to set first, in a worker process."""
    _worker_setup(threads, verbosity)
    t0 = time.perf_counter()
    result = finetune([str(job.config)], list(job.overrides), job.dataset, job.run_dir, job.pretrained)
    seconds = time.perf_counter() - t0
    dice = evaluate_checkpoint(job.run_dir / "checkpoints" / "best.pt", job.test_images, job.test_labels,
                               job.label_names, job.device, job.run_dir)
    curve = [(int(r["step"]), float(r["val_score"])) for r in read_metrics(job.run_dir / "metrics.jsonl")
             if "val_score" in r]
    run = RunResult(job.seed, job.arm, job.labelled, seconds, result.best_score, dice, curve)
    # beside the run's own files, so an interrupted demo still leaves every finished run's scores
    atomic_write_text(job.run_dir / "result.json", json.dumps(run.to_dict(), indent=1) + "\n")
    return run


def run_pretraining(config: Path, overrides: tuple[str, ...], store: Path, run_dir: Path,
                    threads: int | None = None, verbosity: int | None = None) -> PretrainResult:
    """The live Volume Fusion pretraining (``threads``/``verbosity`` as in :func:`run_job`)."""
    _worker_setup(threads, verbosity)
    t0 = time.perf_counter()
    pretrain(load([config], list(overrides)), store, run_dir)
    return PretrainResult(run_dir, time.perf_counter() - t0,
                          [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_score" in r])


def plan_workers(device: str, workers: int | None, jobs: int) -> tuple[int, int | None]:
    """``(processes, torch threads per process)``: on a CPU one process per core by default (a small
    3D network gains little from a second intra-op thread, and independent runs scale linearly); on
    a GPU one process (None: threads unchanged)."""
    if resolve_device(device).type != "cpu":
        return 1, None
    cores = cpu_count()
    workers = max(1, min(workers or cores, jobs))
    return workers, max(1, cores // workers)


def step_seconds(cfg, device: str, repeats: int = 3) -> float:
    """Measured seconds per training step of the demo network at its crop and batch (for the time
    estimate stated up front), with this process's torch threads."""
    dev = resolve_device(device)
    model = build_model(cfg.model, 8).to(dev)
    optim = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.zeros((cfg.run.batch_size, 1, *cfg.data.crop_size), device=dev)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        out = model(x)
        main_output(out).float().mean().backward()
        optim.step()
        optim.zero_grad()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def _verbosity() -> int:
    level = get_logger("volumefusion").getEffectiveLevel()
    return 1 if level <= logging.DEBUG else -1 if level >= logging.WARNING else 0


def make_jobs(settings: DemoSettings, data: DemoData, out: Path, finetune_yaml: Path, builtin: Path,
              live: Path, device: str) -> list[FinetuneJob]:
    """Every fine-tuning run: regime x seed x arm, the arms of one seed and regime identical but for
    the starting weights."""
    jobs = []
    for n in settings.protocol.labelled:
        for seed in settings.protocol.seeds:
            for arm in ARMS:
                overrides = (f"run.device={device}", f"run.seed={seed}", f"finetune.split_file={data.splits[n]}")
                jobs.append(FinetuneJob(seed, arm, n, out / "runs" / f"{n}labelled" / f"seed{seed}" / arm,
                                        finetune_yaml, overrides, data.dataset,
                                        {"scratch": None, "builtin": builtin, "live": live}[arm],
                                        data.test_images, data.test_labels, data.label_names, device))
    return jobs


class _Progress:
    """Progress lines: runs done of all, elapsed time and the expected remainder."""

    def __init__(self, total: int, expected: float):
        self.total, self.expected, self.done = total, expected, 0
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run_done(self, r: RunResult) -> None:
        self.done += 1
        left = self.elapsed() / self.done * (self.total - self.done)
        log.info("[demo %5.0f s] %d/%d runs: %d labelled, seed %d, %s: held-out mean Dice %.3f "
                 "(fine-tuned in %.0f s); about %.0f s left", self.elapsed(), self.done, self.total,
                 r.labelled, r.seed, r.arm, r.mean_dice, r.seconds, left)


def run_demo(out: str | Path = "vf-demo", *, quick: bool = False, seeds: list[int] | None = None,
             device: str = "auto", config: str | Path | None = None, workers: int | None = None
             ) -> DemoResult:
    """Run the whole demo into ``out`` and write its report; see :mod:`volumefusion.demo`.

    ``workers``: processes (default: one per CPU core; one on a GPU).
    """
    settings = load_settings(config, quick, seeds)
    out = Path(out).resolve()
    if (out / "report.md").exists() or (out / "runs").exists():
        raise VolumeFusionError(f"{out} holds an earlier demo; remove it or choose another --out")
    check_writable_folder(out, "--out")
    resolve_device(device)
    builtin = resolve_weights(settings.protocol.builtin)
    pretrain_cfg, finetune_cfg = settings.pretrain_run_config(), settings.finetune_run_config()
    n_jobs = len(settings.protocol.labelled) * len(settings.protocol.seeds) * len(ARMS)
    n_workers, threads = plan_workers(device, workers, n_jobs + 1)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    per_step = step_seconds(finetune_cfg, device)
    # Besides its steps, a run spends about RUN_OVERHEAD_STEPS steps' time on preparing its store,
    # validations, checkpoints and scoring the held-out phantoms (measured on the quick demo).
    steps = pretrain_cfg.run.max_steps + n_jobs * (finetune_cfg.run.max_steps + RUN_OVERHEAD_STEPS)
    expected = per_step * steps / n_workers + 30
    log.info("[demo] %d fine-tuning runs (%d regimes x %d seeds x %d arms, %d steps each) and %d steps of "
             "live pretraining on %d process(es): expected about %.0f min (%.2f s per training step here)",
             n_jobs, len(settings.protocol.labelled), len(settings.protocol.seeds), len(ARMS),
             finetune_cfg.run.max_steps, pretrain_cfg.run.max_steps, n_workers, expected / 60, per_step)
    progress = _Progress(n_jobs, expected)
    try:
        data = make_data(settings, out / "data")
        log.info("[demo %5.0f s] data written: %d pool phantoms%s, %d labelled training, %d validation and %d "
                 "test phantoms", progress.elapsed(), settings.phantoms.pool, " + the chest CT" if data.chest_ct
                 else "", settings.phantoms.train, settings.phantoms.val, settings.phantoms.test)
        pretrain_yaml, finetune_yaml = out / "configs" / "pretrain.yaml", out / "configs" / "finetune.yaml"
        save(pretrain_cfg, pretrain_yaml)
        save(finetune_cfg, finetune_yaml)
        live = out / "runs" / "pretrain" / "checkpoints" / "latest.pt"
        jobs = make_jobs(settings, data, out, finetune_yaml, builtin, live, device)
        pretraining, runs = _schedule(jobs, settings.protocol.primary, pretrain_yaml, (f"run.device={device}",),
                                      data.pool_store, out / "runs" / "pretrain", n_workers, threads, progress)
    finally:
        torch.set_num_threads(previous_threads)
    order = {(n, s, a): i for i, (n, s, a) in enumerate((j.labelled, j.seed, j.arm) for j in jobs)}
    runs.sort(key=lambda r: order[r.labelled, r.seed, r.arm])
    report = write_report(out, settings, data, pretraining, runs, builtin, device=device, quick=quick,
                          workers=n_workers, seconds=progress.elapsed(), expected=expected)
    log.info("[demo %5.0f s] report: %s", progress.elapsed(), report)
    return DemoResult(out, report, runs, pretraining, progress.elapsed())


def _schedule(jobs: list[FinetuneJob], primary: int, pretrain_yaml: Path, overrides: tuple[str, ...],
              store: Path, pretrain_dir: Path, n_workers: int, threads: int | None, progress: _Progress
              ) -> tuple[PretrainResult, list[RunResult]]:
    """The live pretraining and every job; the ``live`` arm's jobs start once pretraining is done.

    Order: the pre-registered comparison (scratch and builtin in the primary regime) first, then the
    live pretraining, then the other regimes (scratch first: the floor the comparison rests on), so
    that an interrupted demo has measured what matters most (every finished run leaves its
    ``result.json``)."""
    waiting = [j for j in jobs if j.arm == "live"]
    first = [j for j in jobs if j.arm != "live" and j.labelled == primary]
    later = sorted((j for j in jobs if j.arm != "live" and j.labelled != primary), key=lambda j: j.arm != "scratch")
    log.info("[demo %5.0f s] live pretraining on %d cases", progress.elapsed(), len(Store.open(store).ids))
    if n_workers == 1:
        runs = []
        for job in first:
            runs.append(run_job(job))
            progress.run_done(runs[-1])
        pretraining = run_pretraining(pretrain_yaml, overrides, store, pretrain_dir)
        log.info("[demo %5.0f s] live pretraining done in %.0f s", progress.elapsed(), pretraining.seconds)
        for job in later + waiting:
            runs.append(run_job(job))
            progress.run_done(runs[-1])
        return pretraining, runs
    verbosity = _verbosity()
    runs: list[RunResult] = []
    with worker_pool(n_workers) as pool:
        pending: dict[Future, str] = {pool.submit(run_job, j, threads, verbosity): "run" for j in first}
        pending[pool.submit(run_pretraining, pretrain_yaml, overrides, store, pretrain_dir, threads,
                            verbosity)] = "pretrain"
        pending.update({pool.submit(run_job, j, threads, verbosity): "run" for j in later})
        pretraining = None
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    kind = pending.pop(future)
                    if kind == "pretrain":
                        pretraining = future.result()
                        log.info("[demo %5.0f s] live pretraining done in %.0f s", progress.elapsed(),
                                 pretraining.seconds)
                        pending.update({pool.submit(run_job, j, threads, verbosity): "run" for j in waiting})
                    else:
                        runs.append(future.result())
                        progress.run_done(runs[-1])
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return pretraining, runs
