"""Running the demo: the gate, the pretraining stages and the fine-tuning runs, scheduled over processes.

Each fine-tuning run (:class:`FinetuneJob`) fine-tunes with :func:`volumefusion.train.runs.finetune`,
then segments the held-out phantoms with its final weights, and with its weights after the early
budget (:func:`volumefusion.infer.predict_files`), and scores them
(:func:`volumefusion.evaluate.evaluate_folders`). On a CPU the runs go to one process per core (each
with its own torch threads), the pretraining stages among them; on a GPU one after another.

Every stage leaves its result as JSON beside its files; rerunning the same command in the same
folder picks up what was finished and redoes only what was not.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from volumefusion import VolumeFusionError
from volumefusion.checkpoint import read_checkpoint, resolve_weights
from volumefusion.config import load, save, to_dict
from volumefusion.demo.data import DemoData, make_data
from volumefusion.demo.report import write_report
from volumefusion.demo.results import DemoResult, GateResult, PretrainResult, RunResult, run_folder
from volumefusion.demo.settings import ARMS, DemoSettings, load_settings
from volumefusion.device import resolve_device
from volumefusion.evaluate import evaluate_folders
from volumefusion.files import FOLDER_LOCK, atomic_write_text, check_writable_folder, folder_lock
from volumefusion.infer import predict_files
from volumefusion.log import get_logger, setup
from volumefusion.nets import build_model, main_output
from volumefusion.processes import plan_workers, worker_pool
from volumefusion.train.logging import read_metrics
from volumefusion.train.probe import random_start
from volumefusion.train.runs import evaluate_pretext, finetune, pretrain

log = get_logger(__name__)

RUN_OVERHEAD_STEPS = 10
SCORE_STEPS = 20
STEP_SLOWDOWN = 1.3
"""The time estimate: besides its training steps, a run spends about RUN_OVERHEAD_STEPS steps' time on
preparing its store, validations and checkpoints, and SCORE_STEPS on each scoring of the held-out
phantoms; a training step with its data, beside another run, takes STEP_SLOWDOWN times the model's step
alone (measured in round three on 2 cores: 0.30 s against 0.23 s)."""
MARKER = "demo.json"
"""The file that makes a folder a demo's (its settings): a rerun with the same settings resumes there."""


@dataclass(frozen=True)
class FinetuneJob:
    """One fine-tuning run and its evaluation on the held-out phantoms (picklable: it may run in a
    worker process). ``needs``: the pretraining stage (``live`` or ``control``) whose weights it
    starts from, which must finish first."""

    seed: int
    arm: str
    labelled: int
    run_dir: Path
    config: Path
    split: Path
    dataset: Path
    pretrained: Path | None
    test_images: Path
    test_labels: Path
    label_names: dict[int, str]
    device: str
    steps: int
    early_steps: tuple[int, ...]
    stop_after: int = 0
    needs: str | None = None


def evaluate_checkpoint(checkpoint: Path, images: Path, labels: Path, label_names: dict[int, str],
                        device: str, into: Path) -> dict[str, dict[str, float]]:
    """``{organ: {case: Dice}}`` of ``checkpoint`` on the held-out phantoms: their label maps go to
    ``into/predictions/`` (:func:`volumefusion.infer.predict_files`), every metric to
    ``into/metrics.csv`` (:func:`volumefusion.evaluate.evaluate_folders`)."""
    predicted = predict_files(checkpoint, [images], into / "predictions", device=device)
    if predicted.failed:
        raise VolumeFusionError(f"{checkpoint}: prediction failed: {predicted.format()}")
    organs = {v: n for v, n in label_names.items() if v}
    evaluate_folders(into / "predictions", labels, into / "metrics.csv", organs, tolerance_mm=1.0)
    dice: dict[str, dict[str, float]] = {name: {} for name in organs.values()}
    with open(into / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            dice[row["label"]][row["case"]] = float(row["dice"])
    return dice


def _worker_setup(threads: int | None, verbosity: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    if verbosity is not None:
        setup(verbosity)


def _finished(result, what: str, run_dir: Path) -> None:
    """An interrupted stage (a signal reached its process) must not pass for a finished one."""
    if result.interrupted:
        raise VolumeFusionError(f"{what} stopped at step {result.step} ({result.interrupted}) in {run_dir}; "
                                "rerun the same demo command to resume (finished runs are kept)")


def _fresh(run_dir: Path) -> None:
    """A stage without its result file did not finish: start it again from nothing."""
    if run_dir.exists():
        shutil.rmtree(run_dir)


def run_job(job: FinetuneJob, threads: int | None = None, verbosity: int | None = None) -> RunResult:
    """Fine-tune, then score the final weights (unless the run stops early) and those after each of
    ``early_steps`` on the held-out phantoms; a run whose ``result.json`` exists is not run again.
    ``threads``/``verbosity``: torch threads and log level (:func:`volumefusion.log.setup`) to set
    first, in a worker process."""
    done = job.run_dir / "result.json"
    if done.is_file():
        return RunResult.from_dict(json.loads(done.read_text()))
    _worker_setup(threads, verbosity)
    _fresh(job.run_dir)
    t0 = time.perf_counter()
    every = math.gcd(*job.early_steps)  # numbered checkpoints at each step of the early readout
    overrides = [f"run.device={job.device}", f"run.seed={job.seed}", f"finetune.split_file={job.split}",
                 f"run.max_steps={job.steps}", f"run.stop_after={job.stop_after}", f"run.checkpoint_every={every}",
                 f"run.keep_last={job.steps // every + 1}"]
    result = finetune([str(job.config)], overrides, job.dataset, job.run_dir, job.pretrained)
    _finished(result, f"fine-tuning ({job.labelled} labelled, seed {job.seed}, {job.arm})", job.run_dir)
    seconds = time.perf_counter() - t0
    checkpoints = job.run_dir / "checkpoints"
    score = [job.test_images, job.test_labels, job.label_names, job.device]
    dice = {} if job.stop_after else evaluate_checkpoint(checkpoints / "latest.pt", *score, job.run_dir)
    early = {str(step): evaluate_checkpoint(checkpoints / f"step_{step:08d}.pt", *score,
                                            job.run_dir / "early" / f"step{step}") for step in job.early_steps}
    for numbered in checkpoints.glob("step_*.pt"):  # scored; latest.pt stays for predict
        numbered.unlink()
    curve = [(int(r["step"]), float(r["val_score"])) for r in read_metrics(job.run_dir / "metrics.jsonl")
             if "val_score" in r]
    run = RunResult(job.seed, job.arm, job.labelled, seconds, result.best_score, dice, early, curve)
    # beside the run's own files, so an interrupted demo still leaves every finished run's scores
    atomic_write_text(done, json.dumps(run.to_dict(), indent=1) + "\n")
    return run


def _stage_result(run_dir: Path, seconds: float, steps: int) -> PretrainResult:
    result = PretrainResult(run_dir, seconds, steps,
                            [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_score" in r])
    atomic_write_text(run_dir / "result.json", json.dumps({"seconds": seconds, "steps": steps}) + "\n")
    return result


def _stage_done(run_dir: Path) -> PretrainResult | None:
    done = run_dir / "result.json"
    if not done.is_file():
        return None
    d = json.loads(done.read_text())
    return PretrainResult(run_dir, d["seconds"], d["steps"],
                          [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_score" in r])


def _run_stage(what: str, run_dir: Path, train: Callable[[], object], threads: int | None,
               verbosity: int | None) -> PretrainResult:
    """A pretraining stage: its kept result, or ``train()`` from nothing (an unfinished run starts again)."""
    finished = _stage_done(run_dir)
    if finished:
        return finished
    _worker_setup(threads, verbosity)
    _fresh(run_dir)
    t0 = time.perf_counter()
    result = train()
    _finished(result, what, run_dir)
    return _stage_result(run_dir, time.perf_counter() - t0, result.step)


def run_pretraining(config: Path, overrides: tuple[str, ...], store: Path, run_dir: Path,
                    threads: int | None = None, verbosity: int | None = None) -> PretrainResult:
    """The live Volume Fusion pretraining (``threads``/``verbosity`` as in :func:`run_job`)."""
    return _run_stage("the live pretraining", run_dir,
                      lambda: pretrain(load([config], list(overrides)), store, run_dir), threads, verbosity)


def run_control(config: Path, overrides: tuple[str, ...], dataset: Path, split: Path, run_dir: Path,
                threads: int | None = None, verbosity: int | None = None) -> PretrainResult:
    """The positive control's supervised pretraining: a network trained from scratch with every label
    of the control phantoms (``threads``/``verbosity`` as in :func:`run_job`)."""
    overrides = (*overrides, f"finetune.split_file={split}")
    return _run_stage("the positive control's supervised pretraining", run_dir,
                      lambda: finetune([str(config)], list(overrides), dataset, run_dir, None), threads, verbosity)


def measure_gate(settings: DemoSettings, builtin: Path, store: Path, device: str, out: Path) -> GateResult:
    """The pretext Dice of the built-in weights on the gate's unseen phantoms (kept in ``out``)."""
    if out.is_file():
        return GateResult.from_dict(json.loads(out.read_text()))
    proto = settings.protocol
    metrics = evaluate_pretext(builtin, store, samples=proto.gate_samples, seed=0, device=device)
    levels = {k.removeprefix("dice_"): v for k, v in metrics.items() if k.startswith("dice_a")}
    gate = GateResult(levels, metrics["score"], proto.gate_mean, proto.gate_level, proto.gate_samples,
                      settings.phantoms.gate)
    atomic_write_text(out, json.dumps(gate.to_dict(), indent=1) + "\n")
    return gate


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


def write_configs(settings: DemoSettings, folder: Path) -> dict[str, Path]:
    """Each fine-tuning recipe (scratch, pretrained, probe) and the pretraining stages' configs as
    YAML files in ``folder`` (each run sets its budget and checkpoints on top)."""
    paths = {}
    for name in ("scratch", "pretrained", "probe"):
        cfg = settings.finetune_run_config(next(a.name for a in ARMS.values() if a.recipe == name))
        paths[name] = folder / f"finetune_{name}.yaml"
        save(cfg, paths[name])
    for name, cfg in (("pretrain", settings.pretrain_run_config()), ("control", settings.control_run_config())):
        paths[name] = folder / f"{name}.yaml"
        save(cfg, paths[name])
    return paths


def make_jobs(settings: DemoSettings, data: DemoData, out: Path, configs: dict[str, Path],
              starts: dict[str, Path], device: str) -> list[FinetuneJob]:
    """Every fine-tuning run: regime x seed x arm, the arms of one seed and regime alike but for the
    starting weights and their recipe (scratch or pretrained; the probes hold the encoder still)."""
    proto = settings.protocol
    jobs = []
    for n in proto.labelled:
        early = settings.early_steps(n)
        for seed in proto.seeds:
            for arm in proto.arms_of(n):
                a = ARMS[arm]
                jobs.append(FinetuneJob(seed, arm, n, run_folder(out, n, seed, arm),
                                        configs[a.recipe], data.split(n, seed), data.dataset,
                                        starts[a.start] if a.start else None, data.test_images, data.test_labels,
                                        data.label_names, device, settings.budget(n), early,
                                        settings.trained_steps(n) if n in proto.stop_early else 0, a.stage))
    return jobs


class _Progress:
    """Progress lines: runs done of all, elapsed time and the expected remainder: the planned work
    (``cost``: training steps and their overheads, per regime) still to do, at the pace the finished
    runs kept (their seconds per planned step), over the ``workers``."""

    def __init__(self, cost: dict[int, int], regimes: list[int], workers: int):
        self.cost, self.total, self.workers = cost, len(regimes), workers
        self.left_cost = sum(cost[n] for n in regimes)
        self.done, self.seconds, self.cost_done = 0, 0.0, 0
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run_done(self, r: RunResult) -> None:
        self.done += 1
        self.seconds += r.seconds
        self.cost_done += self.cost[r.labelled]
        self.left_cost -= self.cost[r.labelled]
        left = self.seconds / self.cost_done * self.left_cost / self.workers
        score = f"held-out mean Dice {r.mean_dice:.3f}" if r.dice else f"early readout {r.early_mean_dice:.3f}"
        log.info("[demo %5.0f s] %d/%d runs: %d labelled, seed %d, %s: %s (fine-tuned in %.0f s); about %.0f s "
                 "left", self.elapsed(), self.done, self.total, r.labelled, r.seed, r.arm, score, r.seconds, left)


def claim_folder(out: Path, settings: DemoSettings) -> bool:
    """Make ``out`` this demo's folder: True when it holds an earlier run of the same settings (to
    resume), False when new; VolumeFusionError for a folder holding anything else, which the demo
    would otherwise overwrite."""
    marker = out / MARKER
    mine = json.dumps(to_dict(settings), sort_keys=True)
    if marker.is_file():
        theirs = json.dumps(json.loads(marker.read_text()).get("settings"), sort_keys=True)
        if theirs != mine:
            raise VolumeFusionError(f"{out} holds a demo with other settings; remove it or choose another --out")
        return True
    if out.exists() and (not out.is_dir() or any(p.name != FOLDER_LOCK for p in out.iterdir())):
        raise VolumeFusionError(f"{out} is not empty and holds no demo of this version (no {MARKER}); the demo "
                                "writes many files there: choose an empty or new folder for --out")
    check_writable_folder(out, "--out")
    atomic_write_text(marker, json.dumps({"settings": to_dict(settings)}, indent=1) + "\n")
    return False


def run_demo(out: str | Path = "vf-demo", *, quick: bool = False, seeds: list[int] | None = None,
             device: str = "auto", config: str | Path | None = None, workers: int | None = None,
             study: bool = False) -> DemoResult:
    """Run the whole demo into ``out`` and write its report; see :mod:`volumefusion.demo`.

    ``study``: the longer study (the settings' ``study`` section: more regimes and arms).
    ``workers``: processes (default: one per CPU core; one on a GPU). A folder that holds an
    unfinished demo of the same settings is resumed: finished runs are kept.
    """
    settings = load_settings(config, quick, seeds, study)
    if workers is not None and workers < 1:
        raise VolumeFusionError(f"--workers {workers}: give a number of processes >= 1 (or leave it out)")
    resolve_device(device)
    builtin = resolve_weights(settings.protocol.builtin)
    out = Path(out).resolve()
    check_writable_folder(out, "--out")
    with folder_lock(out):
        return _run_demo(settings, out, builtin, quick, study, device, workers)


def _run_demo(settings: DemoSettings, out: Path, builtin: Path, quick: bool, study: bool, device: str,
              workers: int | None) -> DemoResult:
    resumed = claim_folder(out, settings)
    proto = settings.protocol
    arms = {a for n in proto.labelled for a in proto.arms_of(n)}
    needed = {ARMS[a].stage for a in arms} - {None}  # pretraining stages some arm starts from
    pretrain_cfg, finetune_cfg = settings.pretrain_run_config(), settings.finetune_run_config()
    control_cfg = settings.control_run_config()
    configs = write_configs(settings, out / "configs")
    stage_dirs = {"live": out / "runs" / "pretrain", "control": out / "runs" / "control"}
    stage_steps = sum(cfg.run.max_steps for name, cfg in (("live", pretrain_cfg), ("control", control_cfg))
                      if name in needed and not _stage_done(stage_dirs[name]))
    # per regime: a run's training steps, and its validations, checkpoints and scorings in steps' time
    steps = {n: settings.trained_steps(n) for n in proto.labelled}
    scorings = {n: len(settings.early_steps(n)) + (n not in proto.stop_early) for n in proto.labelled}
    cost = {n: steps[n] + RUN_OVERHEAD_STEPS + SCORE_STEPS * scorings[n] for n in proto.labelled}
    planned = [(n, s, a) for n in proto.labelled for s in proto.seeds for a in proto.arms_of(n)]
    regimes = [n for n, _, _ in planned]  # of each run
    n_jobs = len(regimes)
    # the runs a resumed demo has still to do (a finished one left its result.json)
    todo = [n for n, s, a in planned if not (run_folder(out, n, s, a) / "result.json").is_file()]
    n_workers, threads = plan_workers(device, workers, n_jobs + 1)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    per_step = step_seconds(finetune_cfg, device)
    expected = STEP_SLOWDOWN * per_step * (stage_steps + sum(cost[n] for n in todo)) / n_workers + 30
    log.info("[demo] %s%d fine-tuning runs (%d steps in all) and %d steps of pretraining stages on %d process(es): "
             "expected about %.0f min (%.2f s per training step here)",
             f"resuming ({n_jobs - len(todo)} runs kept): " if resumed else "", len(todo),
             sum(steps[n] for n in todo), stage_steps, n_workers, expected / 60, per_step)
    progress = _Progress(cost, regimes, n_workers)
    try:
        data = make_data(settings, out / "data", with_pool="live" in needed)
        log.info("[demo %5.0f s] data: %d labelled training, %d validation, %d test, %d control and %d gate "
                 "phantoms%s", progress.elapsed(), settings.phantoms.train, settings.phantoms.val,
                 settings.phantoms.test, settings.phantoms.control, settings.phantoms.gate,
                 f", {settings.phantoms.pool} pool phantoms" + (" + the chest CT" if data.chest_ct else "")
                 if data.pool_store else "")
        gate = measure_gate(settings, builtin, data.gate_store, device, out / "gate.json")
        log.info("[demo %5.0f s] gate: pretext Dice of %s on unseen phantoms %.3f (%s): %s", progress.elapsed(),
                 proto.builtin, gate.mean, ", ".join(f"{k} {v:.2f}" for k, v in gate.levels.items()),
                 "passed" if gate.passed else "NOT passed")
        shipped = read_checkpoint(builtin)  # the random arm holds a fresh network of the same architecture
        starts = {"builtin": builtin, "random": random_start(shipped.run_config(), shipped.task, 0,
                                                             out / "data" / "random_encoder.pt"),
                  **{k: d / "checkpoints" / "latest.pt" for k, d in stage_dirs.items()}}
        stages = {}
        if "live" in needed:
            stages["live"] = (run_pretraining, (configs["pretrain"], (f"run.device={device}",), data.pool_store,
                                                stage_dirs["live"]))
        if "control" in needed:
            stages["control"] = (run_control, (configs["control"], (f"run.device={device}",),
                                               data.control_dataset, data.control_split, stage_dirs["control"]))
        jobs = make_jobs(settings, data, out, configs, starts, device)
        pretraining, runs = _schedule(jobs, {n for _, n in proto.hypotheses()}, stages, n_workers, threads,
                                      progress)
    finally:
        torch.set_num_threads(previous_threads)
    order = {(j.labelled, j.seed, j.arm): i for i, j in enumerate(jobs)}
    runs.sort(key=lambda r: order[r.labelled, r.seed, r.arm])
    report = write_report(out, settings, data, gate, pretraining, runs, builtin, device=device, quick=quick,
                          study=study, workers=n_workers, seconds=progress.elapsed(), expected=expected)
    log.info("[demo %5.0f s] report: %s", progress.elapsed(), report)
    return DemoResult(out, report, runs, gate, pretraining, progress.elapsed())


def _schedule(jobs: list[FinetuneJob], primary: set[int], stages: dict[str, tuple[Callable, tuple]],
              n_workers: int, threads: int | None, progress: _Progress
              ) -> tuple[dict[str, PretrainResult], list[RunResult]]:
    """The pretraining stages and every job; a job that ``needs`` a stage starts once it is done.

    Order: the pre-registered comparisons (scratch and builtin in the primary regimes; runs to the end
    of the budget before runs that stop early, so that the short ones fill the last gaps) first, then
    the stages, then the primary regimes' other arms, then the other regimes (scratch first: the
    headroom the comparison rests on), so that an interrupted demo has measured what matters most."""
    first = sorted((j for j in jobs if j.labelled in primary and j.arm in ("scratch", "builtin")),
                   key=lambda j: j.stop_after > 0)
    rest = sorted((j for j in jobs if j not in first), key=lambda j: (j.labelled not in primary, j.arm != "scratch"))
    waiting = {name: [j for j in rest if j.needs == name] for name in stages}
    later = [j for j in rest if j.needs is None]
    done: dict[str, PretrainResult] = {}
    runs: list[RunResult] = []

    def stage_done(name: str, result: PretrainResult) -> None:
        done[name] = result
        log.info("[demo %5.0f s] %s done (%d steps in %.0f s)", progress.elapsed(),
                 {"live": "live pretraining", "control": "positive control's supervised pretraining"}[name],
                 result.steps, result.seconds)

    if n_workers == 1:
        for job in first:
            runs.append(run_job(job))
            progress.run_done(runs[-1])
        for name, (fn, args) in stages.items():
            stage_done(name, fn(*args))
        for job in later + [j for group in waiting.values() for j in group]:
            runs.append(run_job(job))
            progress.run_done(runs[-1])
        return done, runs
    verbosity = _verbosity()
    with worker_pool(n_workers) as pool:
        pending: dict[Future, str] = {pool.submit(run_job, j, threads, verbosity): "run" for j in first}
        for name, (fn, args) in stages.items():
            pending[pool.submit(fn, *args, threads, verbosity)] = name
        pending.update({pool.submit(run_job, j, threads, verbosity): "run" for j in later})
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    kind = pending.pop(future)
                    if kind == "run":
                        runs.append(future.result())
                        progress.run_done(runs[-1])
                    else:
                        stage_done(kind, future.result())
                        pending.update({pool.submit(run_job, j, threads, verbosity): "run" for j in waiting[kind]})
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return done, runs
