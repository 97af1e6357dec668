"""The benchmark runner, its JSON document, the BENCHMARKS.md report and the GPU check script."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import report
from benchmarks.run import CPU_ONLY, MODULES, OWN_STEP, RESULT_KEYS, check_result, main, run_benchmarks

ROOT = Path(__file__).resolve().parents[1]
PRESENT = [m for m in MODULES if (ROOT / "benchmarks" / f"{m}.py").is_file()]


def _env() -> dict:
    """The test's environment for a child process, with the source tree importable."""
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1"}


def _figure(name="x_per_s", value=200.0, baseline=50.0, higher=True, **extra) -> dict:
    ratio = None if baseline is None else (value / baseline if higher else baseline / value)
    return {"name": name, "value": value, "unit": "samples/s", "baseline": baseline,
            "baseline_name": None if baseline is None else "loop", "ratio": ratio,
            "higher_is_better": higher, "device": "cpu", "params": {}, **extra}


# --- the runner ---------------------------------------------------------------------------------------

def _run_tiny(modules: list[str], out: Path) -> dict:
    """``python -m benchmarks --tiny --device cpu --only MODULES --out OUT``; its JSON document."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--device", "cpu", "--only", ",".join(modules),
         "--out", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout)
    assert json.loads(out.read_text()) == document
    return document


def _check_document(document: dict, modules: list[str]) -> None:
    """The document's schema: machine, versions, one status per module, well-formed figures."""
    assert {"hostname", "cpu", "cores", "ram_gib", "gpu", "gpu_memory_gib", "gpu_driver", "cuda"} <= set(
        document["machine"])
    assert document["machine"]["cores"] >= 1
    assert {"python", "torch", "numpy", "SimpleITK", "monai", "volumefusion", "commit", "dirty"} <= set(
        document["versions"])
    assert document["tiny"] is True and document["complete"] is True and document["errors"] == []
    assert [m["benchmark"] for m in document["modules"]] == modules
    present = [m["benchmark"] for m in document["modules"] if m["status"] != "missing"]
    assert all(m["status"] == "ok" for m in document["modules"] if m["benchmark"] in present)
    assert {r["benchmark"] for r in document["results"]} == set(present)
    for result in document["results"]:
        assert set(result) == set(RESULT_KEYS) | {"benchmark", "seconds"}, result
        assert result["device"] == "cpu" and result["seconds"] >= 0
        if result["baseline"] is None:
            assert result["ratio"] is None
        else:
            expected = (result["value"] / result["baseline"] if result["higher_is_better"]
                        else result["baseline"] / result["value"])
            assert math.isclose(result["ratio"], expected, rel_tol=1e-2, abs_tol=1e-3), result


def test_tiny_run_prints_one_well_formed_document(tmp_path):
    """The real entry point with the quickest benchmark; all of them: the `heavy` test below."""
    _check_document(_run_tiny(["fusion"], tmp_path / "results.json"), ["fusion"])


@pytest.mark.heavy
@pytest.mark.skipif(not PRESENT, reason="no benchmark module exists yet")
def test_every_present_benchmark_runs_tiny_on_cpu(tmp_path):
    _check_document(_run_tiny(PRESENT, tmp_path / "results.json"), PRESENT)


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A package of three benchmark modules: one good, one that raises, one with an inverted ratio."""
    name = f"fakebench_{tmp_path.name.replace('-', '_')}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    good = _figure(name="speed", value=30.0, baseline=60.0, higher=False)
    inverted = {**good, "ratio": 0.5}
    (package / "good.py").write_text(
        f"def run(tiny=False, device='cpu'):\n    return [{{**{good!r}, 'params': {{'tiny': tiny}}}}]\n")
    (package / "broken.py").write_text(
        "def run(tiny=False, device='cpu'):\n    raise RuntimeError('disk on fire')\n")
    (package / "inverted.py").write_text(f"def run(tiny=False, device='cpu'):\n    return [{inverted!r}]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_runner_skips_missing_modules_and_records_failures_without_stopping(fake_package):
    lines = []
    results, errors, modules = run_benchmarks(["absent", "broken", "good", "inverted"], tiny=True,
                                              device="cpu", package=fake_package, log=lines.append)
    assert [(m["benchmark"], m["status"]) for m in modules] == [
        ("absent", "missing"), ("broken", "error"), ("good", "ok"), ("inverted", "error")]
    assert any("absent" in line and "does not exist" in line for line in lines)
    assert all({"commit", "dirty"} <= set(m) for m in modules if m["status"] != "missing")
    assert len(results) == 1
    assert results[0]["benchmark"] == "good" and results[0]["params"] == {"tiny": True}
    assert results[0]["seconds"] >= 0
    by_module = {e["benchmark"]: e for e in errors}
    assert set(by_module) == {"broken", "inverted"}
    assert "disk on fire" in by_module["broken"]["error"]
    assert "RuntimeError" in by_module["broken"]["traceback"]
    assert "ratio" in by_module["inverted"]["error"] and by_module["inverted"]["result"]["ratio"] == 0.5


def test_check_result_accepts_a_consistent_figure_and_names_each_problem():
    assert check_result(_figure()) == []
    assert check_result(_figure(value=2.0, baseline=8.0, higher=False)) == []
    assert check_result(_figure(baseline=None)) == []
    assert check_result(_figure(value=np.float32(200.0), baseline=np.float64(50.0))) == []
    inverted = _figure(value=2.0, baseline=8.0, higher=False)
    inverted["ratio"] = 0.25
    assert any("ratio" in p for p in check_result(inverted))
    assert any("'unit'" in p for p in check_result({k: v for k, v in _figure().items() if k != "unit"}))
    assert any("value" in p for p in check_result(_figure(value=True)))
    assert any("unexpected key 'speed'" in p for p in check_result(_figure(speed=1)))
    assert any("not finite" in p for p in check_result(_figure(value=float("nan"), baseline=None)))


def test_unknown_module_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--only", "fusion,warp_drive"])
    assert stop.value.code == 2
    assert "warp_drive" in capsys.readouterr().err


# --- the report ---------------------------------------------------------------------------------------

def _document(date: str, results: list[dict], *, gpu: str | None = None, tiny: bool = False,
              errors: list[dict] | None = None, commit: str = "abc1234") -> dict:
    return {
        "machine": {"hostname": "h", "os": "Linux", "cpu": "Test CPU", "cores": 2, "ram_gib": 8.0, "gpu": gpu,
                    "gpu_count": int(gpu is not None), "gpu_memory_gib": 139.8 if gpu else None,
                    "gpu_driver": "580.1" if gpu else None, "cuda": "13.0" if gpu else None,
                    "cudnn": 91000 if gpu else None},
        "versions": {"python": "3.12", "torch": "2.13", "numpy": "2.4", "SimpleITK": "2.5", "monai": "1.6",
                     "volumefusion": "0.1.0", "commit": commit, "dirty": False},
        "date": date, "tiny": tiny, "device": "cuda" if gpu else "cpu", "command": "python -m benchmarks",
        "complete": True, "modules": [], "results": results, "errors": errors or [],
    }


def _row(benchmark: str, name: str, value: float, device: str = "cpu", **params) -> dict:
    return {"benchmark": benchmark, **_figure(name=name, value=value, baseline=100.0), "device": device,
            "params": params, "seconds": 1.0}


def _write(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document))
    return path


def test_report_has_a_table_per_machine_with_values_baselines_targets_and_notes(tmp_path):
    cpu = _write(tmp_path / "cpu.json", _document("2026-11-20T10:00:00+00:00", [
        _row("fusion", "fusion_boxes_samples_per_s", 1234.5, batch=16),
        _row("loader", "pretrain_loader_crops_per_s", 30.0, workers=1),
        _row("loader", "pretrain_loader_crops_per_s", 90.0, workers=4),
        _row("network", "pctnet_paper_train_fp32_samples_per_s", 30.0),
        _row("engine", "engine_overhead_pct", 3.25)]))
    gpu = _write(tmp_path / "h200.json", _document("2026-11-21T10:00:00+00:00", [
        _row("fusion", "fusion_boxes_samples_per_s", 4321.0, device="cuda", batch=16),
        _row("network", "pctnet_paper_train_bf16_samples_per_s", 75.0, device="cuda")], gpu="NVIDIA H200",
        errors=[{"benchmark": "predict", "error": "OutOfMemoryError: CUDA out of memory"}], commit="def5678"))
    document = json.loads(gpu.read_text())  # fusion ran at a later commit than the run started at
    document["modules"] = [{"benchmark": "fusion", "status": "ok", "seconds": 1.0, "commit": "9999999",
                            "dirty": False}]
    _write(gpu, document)
    notes = tmp_path / "notes.md"
    notes.write_text("Fusion misses its GPU target by 14 %: *rasterisation* is the bottleneck.\n")
    out = tmp_path / "BENCHMARKS.md"

    assert report.main([str(cpu), str(gpu), "--notes", str(notes), "--out", str(out)]) == 0
    page = out.read_text()
    cpu_part, gpu_part = page.split("### CPU: Test CPU, 2 cores")[1].split("### NVIDIA H200")
    assert "1,234" in cpu_part and "12.3×" in cpu_part and "100 (loop)" in cpu_part
    assert "4,321" not in cpu_part and "4,321" in gpu_part and "def5678" in gpu_part
    fusion_gpu = next(line for line in gpu_part.splitlines() if "fusion_boxes_samples_per_s" in line)
    assert "≥ 5000 samples/s" in fusion_gpu and "| no |" in fusion_gpu and "2026-11-21" in fusion_gpu
    assert "9999999" in fusion_gpu
    overhead = next(line for line in cpu_part.splitlines() if "engine_overhead_pct" in line)
    assert "< 5 %" in overhead and "| yes |" in overhead
    network = next(line for line in gpu_part.splitlines() if "pctnet_paper_train_bf16" in line)
    assert "≥ 70 samples/s" in network and "| yes |" in network
    # the loader's 4 workers supply 90 / 2 samples/s against a 30 samples/s training step: 1.5x
    supply = next(line for line in cpu_part.splitlines() if "vs_training" in line)
    assert "| 45.0 |" in supply and "1.50×" in supply and "| yes |" in supply and "workers=4" in supply
    assert "vs_training" not in gpu_part  # no loader figures there
    assert "OutOfMemoryError" in gpu_part
    assert notes.read_text().strip() in page.split("## Notes")[1]
    assert report.RESULTS_MARK not in page and report.NOTES_MARK not in page


def test_report_takes_each_modules_rows_from_its_newest_run_and_leaves_out_tiny_runs(tmp_path):
    old = _write(tmp_path / "old.json", _document("2026-11-01T10:00:00+00:00", [
        _row("fusion", "fusion_boxes_samples_per_s", 111.0),
        _row("loader", "crops_per_s_per_worker", 222.0)]))
    new = _write(tmp_path / "new.json", _document("2026-11-02T10:00:00+00:00", [
        _row("fusion", "fusion_boxes_samples_per_s", 333.0)], commit="fff0000"))
    tiny = _write(tmp_path / "tiny.json", _document("2026-11-03T10:00:00+00:00", [
        _row("fusion", "fusion_boxes_samples_per_s", 999.0)], tiny=True))
    template = report.TEMPLATE.read_text()

    page = report.render(report.load([new, tiny, old], include_tiny=False), None, template)
    assert "333" in page and "222" in page and "111" not in page and "999" not in page
    loader = next(line for line in page.splitlines() if "crops_per_s_per_worker" in line)
    assert "| yes |" in loader and "2026-11-01" in loader

    page = report.render(report.load([new, tiny, old], include_tiny=True), None, template)
    fusion = next(line for line in page.splitlines() if "fusion_boxes_samples_per_s" in line)
    assert "999" in fusion and "| tiny |" not in fusion  # fusion on CPU has no target
    assert "tiny sizes" in page


def test_report_rejects_a_file_that_is_not_a_benchmark_result(tmp_path, capsys):
    bad = _write(tmp_path / "bad.json", {"results": []})
    with pytest.raises(SystemExit) as stop:
        report.main([str(bad)])
    assert stop.value.code == 2 and "bad.json" in capsys.readouterr().err


# --- the GPU check script -----------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_gpu_check_tiny_writes_json_status_and_report(tmp_path):
    module = "fusion"  # the quickest benchmark; the script's steps are what is tested here
    env = {**_env(), "PYTHON": sys.executable}
    script = ROOT / "benchmarks" / "gpu_check.sh"
    # nnunet and the quick demo have tests of their own; here they are skipped as the script allows
    env["GPU_CHECK_SKIP"] = "nnunet demo"
    # the step limits are sized for a GPU; a loaded CPU must not turn them into failures of this test
    env.update(TESTS_TIMEOUT="300", PROFILE_TIMEOUT="300", BENCH_TIMEOUT="300", COMPILE_TIMEOUT="300")
    done = subprocess.run(["bash", str(script), str(tmp_path), "--tiny", "--only", module],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    status = {line.split()[0]: line.split()[1] for line in (tmp_path / "status.txt").read_text().splitlines()}
    assert list(status) == ["nvidia-smi", "gpu_tests", "profile", "benchmarks", "compile", "nnunet", "demo",
                            "report", "overall"], status
    assert status["nnunet"] == status["demo"] == "skipped" and status["compile"] == "0"
    assert status["profile"] == "0" and json.loads((tmp_path / "profile.json").read_text())["top"]
    assert status["benchmarks"] == "0" and status["report"] == "0", done.stdout[-3000:]
    assert status["overall"] == "0" and done.returncode == 0
    document = json.loads((tmp_path / "gpu.json").read_text())
    assert document["tiny"] is True and document["complete"] is True
    assert [m["benchmark"] for m in document["modules"]] == [module]
    assert (tmp_path / "bench.log").read_text().count('"machine"') == 1
    assert (tmp_path / "gpu_tests.log").is_file() and "Benchmarks" in (tmp_path / "BENCHMARKS.md").read_text()


def test_gpu_check_runs_every_device_benchmark_by_default():
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    default = next(line for line in script.splitlines() if line.startswith("ONLY=(--only "))
    expected = sorted(set(MODULES) - set(CPU_ONLY) - set(OWN_STEP))
    assert sorted(default.removeprefix("ONLY=(--only ").rstrip(")").split(",")) == expected
    for module in OWN_STEP:
        assert f"--only {module} --out" in script
