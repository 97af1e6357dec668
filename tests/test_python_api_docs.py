"""The examples of docs/python-api.md run as written (in order, in one namespace, in a temp folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_python_api_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)  # noqa: S102 - our own docs
        except Exception as exc:
            pytest.fail(f"{DOC.name} example {i + 1} failed: {type(exc).__name__}: {exc}")
    assert set(namespace["dice"]) == {n for v, n in namespace["predictor"].label_names.items() if v != 0}
    assert (tmp_path / "results" / "metrics.csv").is_file()
