"""The frozen-encoder probe: did pretraining learn features that serve a labelled task?

For each pretrained checkpoint and seed, a fine-tuning run trains only the decoder, the encoder held
still for the whole run, and the held-out (validation) cases are scored with the run's last
validation (mean foreground Dice, sliding window). Beside it, under the same recipe, budget, seed and
cases, the same architecture with a *randomly initialised* encoder held still: the bar that
pretrained features must clear to be worth anything. Optionally (``finetune=True``) also full
fine-tuning from the checkpoint beside training from scratch.

Every run keeps its ``result.json``; calling :func:`probe` again with the same folder reruns only what
did not finish, and runs are shared between calls: a pretraining that probes its own checkpoints
(``probe.every``) measures the random-encoder bar once.

Layout of ``out``::

    store/                      the labelled dataset, prepared once (when given as a raw folder)
    splits/seed<k>.json         the training and held-out cases of seed k
    recipe.json                 what defines the runs (resolved recipe, split): another recipe is refused
    random/seed<k>.pt           the random encoder of seed k (one per architecture)
    runs/<name>/<arm>/seed<k>/  one fine-tuning run (its metrics.jsonl, result.json)
    probe.json, probe.md        every run and the paired comparisons
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from volumefusion import VolumeFusionError, nets
from volumefusion.checkpoint import read_checkpoint, resolve_weights, write_weights
from volumefusion.config import Config, changed_fields, load
from volumefusion.files import atomic_write_text, check_writable_folder, folder_lock
from volumefusion.log import get_logger
from volumefusion.processes import plan_workers, worker_pool
from volumefusion.stats import compare_paired
from volumefusion.train.engine import RunInterrupted
from volumefusion.train.logging import read_metrics
from volumefusion.train.runs import finetune, segmentation_store
from volumefusion.train.tasks import split_cases
from volumefusion.typed_config import ConfigError
from volumefusion.weights import model_from_checkpoint

log = get_logger(__name__)

ARMS = {
    "probe": "encoder from the checkpoint, held; decoder trained",
    "random": "random encoder, held; decoder trained",
    "finetune": "every layer from the checkpoint, all trained",
    "scratch": "random initialisation, all trained",
}
"""The runs of a probe, by their starting weights; ``probe`` is compared with ``random`` and
``finetune`` with ``scratch``, seed by seed."""

PAIRS = (("probe", "random"), ("finetune", "scratch"))
SHARED = ("random", "scratch")
"""Arms that do not depend on the checkpoint, only on its architecture: run once for all that share it."""


@dataclass(frozen=True)
class ProbeRun:
    """One fine-tuning run's outcome: ``score`` is the held-out mean foreground Dice after the last
    step, ``dice`` the per-class Dice, ``curve`` ``[(step, score), ...]`` of every validation."""

    name: str
    arm: str
    seed: int
    score: float
    dice: dict[str, float]
    curve: list[tuple[int, float]]
    seconds: float

    @classmethod
    def from_dict(cls, d: dict) -> ProbeRun:
        return cls(d["name"], d["arm"], int(d["seed"]), float(d["score"]), dict(d["dice"]),
                   [(int(s), float(v)) for s, v in d["curve"]], float(d["seconds"]))


@dataclass(frozen=True)
class _Job:
    name: str
    arm: str
    seed: int
    run_dir: Path
    config: tuple[str, ...]
    overrides: tuple[str, ...]
    split: Path
    store: Path
    start: Path | None
    device: str


@dataclass
class ProbeResult:
    """Every run of :func:`probe` and what they say (also in ``out/probe.json`` and ``out/probe.md``).

    ``runs``: the ``probe`` and ``finetune`` runs are named by their checkpoint, the shared ``random``
    and ``scratch`` runs by the architecture key that ``architecture`` maps each checkpoint to.
    """

    out: Path
    runs: list[ProbeRun]
    seeds: list[int]
    architecture: dict[str, str]

    def scores(self, name: str, arm: str) -> dict[int, float]:
        """``{seed: held-out mean Dice}`` of checkpoint ``name``'s ``arm`` (shared arms included)."""
        owner = self.architecture[name] if arm in SHARED else name
        return {r.seed: r.score for r in self.runs if r.arm == arm and r.name == owner}

    def comparisons(self) -> dict[str, dict[str, dict]]:
        """``{name: {"probe-random": ..., "finetune-scratch": ...}}``: each arm's mean and the paired
        comparison over seeds (:func:`volumefusion.stats.compare_paired`, one-sided: the checkpoint's
        arm better; with one seed only the difference)."""
        out: dict[str, dict[str, dict]] = {}
        for name in self.architecture:
            for arm, base in PAIRS:
                mine, theirs = self.scores(name, arm), self.scores(name, base)
                seeds = [s for s in self.seeds if s in mine and s in theirs]
                if not seeds:
                    continue
                a, b = [theirs[s] for s in seeds], [mine[s] for s in seeds]
                entry = {arm: float(np.mean(b)), base: float(np.mean(a)), "difference": float(np.mean(b) - np.mean(a)),
                         "seeds": seeds}
                if len(seeds) >= 2:
                    entry["test"] = compare_paired(a, b, alternative="greater").to_dict()
                out.setdefault(name, {})[f"{arm}-{base}"] = entry
        return out

    def table(self) -> str:
        """A Markdown table: a row per checkpoint and arm, a column per seed, then the comparison."""
        head = ["weights", "arm", *[f"seed {s}" for s in self.seeds], "mean", "against", "difference",
                "95 % interval", "p (one-sided)", "better on"]
        rows = []
        for name, entries in self.comparisons().items():
            for arm, base in PAIRS:
                entry = entries.get(f"{arm}-{base}")
                if entry is None:
                    continue
                mine, test = self.scores(name, arm), entry.get("test")
                interval = f"{test['ci_low']:+.3f} to {test['ci_high']:+.3f}" if test else "-"
                p = f"{test['p_value']:.3g}" if test and test["p_value"] is not None else "-"
                wins = f"{test['wins']} of {test['n']}" if test else "-"
                rows.append([name, arm, *[f"{mine[s]:.3f}" if s in mine else "-" for s in self.seeds],
                             f"{entry[arm]:.3f}", f"{base} {entry[base]:.3f}", f"{entry['difference']:+.3f}",
                             interval, p, wins])
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    def to_dict(self) -> dict:
        return {"seeds": self.seeds, "architecture": self.architecture, "runs": [asdict(r) for r in self.runs],
                "comparisons": self.comparisons()}


def _name(source: str | Path) -> str:
    """How tables name a checkpoint: ``RUN/step_00002000`` for a file in a run's ``checkpoints/`` folder,
    else the file name without its suffix (``demo`` for ``builtin:demo``)."""
    path = resolve_weights(source)
    return f"{path.parent.parent.name}/{path.stem}" if path.parent.name == "checkpoints" else path.stem


def _architecture(cfg: Config) -> str:
    """A short key of a network's architecture (its output layer aside, which fine-tuning replaces):
    checkpoints that share it share the random arms."""
    text = json.dumps(cfg.to_dict()["model"], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def random_start(cfg: Config, task: dict, seed: int, path: Path) -> Path:
    """A checkpoint of ``cfg``'s network freshly initialised from ``seed`` (written once; ``task`` as the
    pretrained checkpoint's): a random-encoder arm loads, holds and trains it exactly as a probe does the
    pretrained one."""
    if not path.is_file():
        torch.manual_seed(seed)
        model = nets.build_model(cfg.model, int(task["num_classes"]))
        write_weights(path, model.state_dict(), cfg.to_dict(), task, step=0,
                      card={"weights": f"random initialisation (torch seed {seed}), not pretrained"})
    return path


def _claim(out: Path, recipe: Config, split: dict, record: dict) -> None:
    """Keep finished runs only for the same probe: ``out/recipe.json`` records what defines the runs (the
    resolved ``recipe``, and ``split``: the cases and the labelled count); another recipe into the same
    folder is an error naming what changed, rather than a table that mixes runs of two budgets. Fields
    added to the settings since the folder was written count as their defaults (an upgrade keeps it)."""
    path = out / "recipe.json"
    if path.is_file():
        saved = json.loads(path.read_text()).get("defines") or {}
        changed = [f"{key}: {saved.get(key)} -> {now}" if key == "labelled" else f"{key} cases"
                   for key, now in split.items() if json.dumps(saved.get(key)) != json.dumps(now)]
        try:
            changed += changed_fields(saved.get("recipe") or {}, recipe)
        except ConfigError as exc:  # a recipe this version cannot read
            changed.append(f"recorded recipe unreadable: {exc}")
        if changed:
            raise VolumeFusionError(f"--out {out}: holds a probe with another recipe ({'; '.join(changed)}): its "
                                    "runs would be mixed with these; choose another folder")
    atomic_write_text(path, json.dumps({"defines": {"recipe": recipe.to_dict(), **split}, **record}, indent=1) + "\n")


def _write_split(train: list[str], val: list[str], labelled: int | None, seed: int, path: Path) -> Path:
    if labelled:
        if labelled > len(train):
            raise VolumeFusionError(f"labelled: {labelled} training cases asked for, the split has {len(train)}")
        train = sorted(np.random.default_rng(seed).choice(sorted(train), labelled, replace=False).tolist())
    atomic_write_text(path, json.dumps({"train": train, "val": val}, indent=1) + "\n")
    return path


def _run(job: _Job, threads: int | None = None) -> ProbeRun:
    done = job.run_dir / "result.json"
    if done.is_file():
        return ProbeRun.from_dict(json.loads(done.read_text()))
    if threads:
        torch.set_num_threads(threads)
    if job.run_dir.exists():  # an unfinished run starts again from nothing
        shutil.rmtree(job.run_dir)
    t0 = time.perf_counter()
    overrides = [*job.overrides, f"run.seed={job.seed}", f"run.device={job.device}", f"finetune.split_file={job.split}"]
    result = finetune(list(job.config), overrides, job.store, job.run_dir, job.start)
    if result.interrupted:
        raise RunInterrupted(f"{job.run_dir}: stopped at step {result.step} ({result.interrupted}); run the same "
                             "probe again to finish it (finished runs are kept)", result.interrupted)
    records = [r for r in read_metrics(job.run_dir / "metrics.jsonl") if "val_score" in r]
    last = records[-1]
    run = ProbeRun(job.name, job.arm, job.seed, float(last["val_score"]),
                   {k.removeprefix("val_dice_"): float(v) for k, v in last.items() if k.startswith("val_dice_")},
                   [(int(r["step"]), float(r["val_score"])) for r in records], time.perf_counter() - t0)
    for path in (job.run_dir / "checkpoints").glob("*.pt"):  # the score is kept; the weights are not needed
        path.unlink()
    atomic_write_text(done, json.dumps(asdict(run), indent=1) + "\n")
    return run


def probe(weights: Sequence[str | Path] | Mapping[str, str | Path], data: str | Path, out: str | Path, *,
          config: Sequence[str | Path] = ("finetune",), overrides: Sequence[str] = (),
          seeds: Sequence[int] = (0, 1), labelled: int | None = None, split_file: str | Path | None = None,
          finetune_too: bool = False, device: str = "auto", workers: int | None = None) -> ProbeResult:
    """Probe each checkpoint in ``weights`` (paths or ``builtin:NAME``; a mapping names them) on the
    labelled dataset ``data`` (an MSD / nnU-Net folder or a labelled store); see the module docs.

    ``config``/``overrides``: the fine-tuning recipe of every run (files or presets, ``--set``
    strings); ``run.max_steps`` is the budget, and the probe arms hold the encoder for all of it.
    ``seeds``: one run per seed and arm. ``split_file``: training and held-out cases (default: fold 0
    of the 5-fold split by case); ``labelled``: train each run on this many training cases, drawn by
    its seed. ``finetune_too``: also full fine-tuning vs scratch. ``workers``: processes (default one
    per CPU core, one on a GPU).
    """
    named = dict(weights) if isinstance(weights, Mapping) else {_name(w): w for w in weights}
    if not named:
        raise VolumeFusionError("probe: give at least one checkpoint")
    if not isinstance(weights, Mapping) and len(named) < len(weights):
        raise VolumeFusionError(f"probe: two checkpoints are both named {sorted(named)}; give each a name "
                                "(a mapping {name: path} in Python)")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise VolumeFusionError(f"probe: seeds {seeds} must be distinct, at least one")
    out = Path(out)
    check_writable_folder(out, "--out")
    with folder_lock(out):
        return _probe(named, data, out, list(map(str, config)), list(overrides), seeds, labelled, split_file,
                      finetune_too, device, workers)


def _probe(named: dict[str, str | Path], data: str | Path, out: Path, config: list[str], overrides: list[str],
           seeds: list[int], labelled: int | None, split_file: str | Path | None, finetune_too: bool, device: str,
           workers: int | None) -> ProbeResult:
    recipe = load(config, overrides)
    checkpoints = {name: read_checkpoint(w) for name, w in named.items()}
    architectures = {}
    for name, ckpt in checkpoints.items():
        _, cfg, num_classes = model_from_checkpoint(ckpt)
        architectures[name] = (_architecture(cfg), cfg, ckpt.task or {"num_classes": num_classes})
    preprocessing = {json.dumps(c.preprocessing, sort_keys=True) for c in checkpoints.values()}
    if len(preprocessing) > 1:
        raise VolumeFusionError("probe: the checkpoints were pretrained on differently prepared data (spacing, "
                                "orientation); probe them separately")
    first = next(iter(checkpoints.values()))
    store = segmentation_store(data, out, first.preprocessing, recipe.data.workers)
    train, val = split_cases(store.ids, recipe.finetune.num_folds, recipe.finetune.fold,
                             str(split_file) if split_file else recipe.finetune.split_file)
    recipes = {}
    for arm in ARMS:
        held = recipe.run.max_steps if arm in ("probe", "random") else 0
        recipes[arm] = (*overrides, f"finetune.freeze_encoder_steps={held}",
                        f"run.checkpoint_every={recipe.run.max_steps}", "run.keep_last=0", "run.image_every=1000000000")
    _claim(out, recipe, {"train": sorted(train), "val": sorted(val), "labelled": labelled},
           {"config": [str(c) for c in config], "overrides": recipes})
    splits = {s: _write_split(train, val, labelled, s, out / "splits" / f"seed{s}.json") for s in seeds}

    arms = ("probe", "random", "finetune", "scratch") if finetune_too else ("probe", "random")
    jobs = {}
    for name, (arch, cfg, task) in architectures.items():
        for seed in seeds:
            for arm in arms:
                shared = arm in SHARED
                owner = arch if shared else name
                start = named[name] if not shared else None
                if arm == "random":
                    start = random_start(cfg, task, seed, out / "random" / f"{arch}-seed{seed}.pt")
                jobs[owner, arm, seed] = _Job(owner, arm, seed, out / "runs" / owner / arm / f"seed{seed}",
                                              tuple(map(str, config)), recipes[arm], splits[seed], store.path,
                                              start, device)
    runs = _run_all(list(jobs.values()), device, workers)
    result = ProbeResult(out, runs, seeds, {name: arch for name, (arch, _, _) in architectures.items()})
    atomic_write_text(out / "probe.json", json.dumps(result.to_dict(), indent=1) + "\n")
    atomic_write_text(out / "probe.md", f"# Probe\n\nHeld-out mean foreground Dice of {len(val)} case(s) after "
                      f"{recipe.run.max_steps} steps per run ({out}).\n\n{result.table()}\n")
    return result


def _run_all(jobs: list[_Job], device: str, workers: int | None) -> list[ProbeRun]:
    """Every job, one process per CPU core (one on a GPU); finished runs come back from their files."""
    processes, threads = plan_workers(device, workers, len(jobs))
    runs = []

    def finished(run: ProbeRun) -> None:
        runs.append(run)
        log.info("probe: %s %s seed %d: held-out mean Dice %.3f (%.0f s)", run.name, run.arm, run.seed, run.score,
                 run.seconds)

    if processes == 1:
        for job in jobs:
            finished(_run(job))
    else:
        with worker_pool(processes) as pool:
            for future in as_completed([pool.submit(_run, job, threads) for job in jobs]):
                finished(future.result())
    order = {(j.name, j.arm, j.seed): i for i, j in enumerate(jobs)}
    return sorted(runs, key=lambda r: order[r.name, r.arm, r.seed])


def probe_hook(cfg: Config, out_dir: str | Path) -> tuple[int, Callable[[Path, int], dict[str, float]]] | None:
    """What a pretraining under ``cfg`` runs every ``probe.every`` steps (None when 0): :func:`probe` of
    its latest checkpoint on ``probe.data``, into ``out_dir/probe``, with the pretraining's crop size,
    loader workers and device, one run after another in the training process. The random encoder's
    runs are done at the first probe and kept. Returns the metrics logged: ``probe_score`` and ``probe_random``."""
    p = cfg.probe
    if not p.every:
        return None
    overrides = [f"run.max_steps={p.steps}", f"data.crop_size={json.dumps(list(cfg.data.crop_size))}",
                 f"data.workers={cfg.data.workers}", f"run.device={cfg.run.device}"]

    def run(checkpoint: Path, step: int) -> dict[str, float]:
        name = f"step_{step:08d}"
        result = probe({name: checkpoint}, p.data, Path(out_dir) / "probe", config=p.recipe, overrides=overrides,
                       seeds=p.seeds, labelled=p.labelled or None, split_file=p.split_file, device=cfg.run.device,
                       workers=1)
        entry = result.comparisons()[name]["probe-random"]
        log.info("probe at step %d: held-out mean Dice %.3f with the encoder frozen, %.3f with a random one", step,
                 entry["probe"], entry["random"])
        return {"probe_score": entry["probe"], "probe_random": entry["random"]}

    return p.every, run
