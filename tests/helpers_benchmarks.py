"""Benchmark modules for tests: ``benchmarks/`` is a folder of scripts, not a package, so load them by file.

The same way tests/test_benchmark_memory.py loads ``memory_backends``; registered in ``sys.modules`` under
a ``benchmarks_`` name (dataclasses look their module up there) without putting ``benchmarks/`` on
``sys.path`` for the whole session.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (loaded once per session)."""
    qualified = f"benchmarks_{name}"
    if qualified not in sys.modules:
        spec = importlib.util.spec_from_file_location(qualified, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        spec.loader.exec_module(module)
    return sys.modules[qualified]


_synthetic = load_benchmark("synthetic")
clustered_unit_vectors, clustered_queries = _synthetic.clustered_unit_vectors, _synthetic.clustered_queries
