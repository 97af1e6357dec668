"""Benchmarks: each module ``benchmarks/<name>.py`` exposes ``run(tiny, device) -> list[dict]``.

``python -m benchmarks`` runs them all and prints one JSON document (see :mod:`benchmarks.run`);
``python -m benchmarks.report`` turns recorded JSON files into BENCHMARKS.md.
"""
