"""Write benchmark results as JSON under `benchmarks/results/`, stamped with machine and date.

Every benchmark prints its figures and calls `write_results(name, payload)`; the payload keeps the
shape its issue asks for and gains one extra top-level key, `"meta"` (machine, CPU model and vector
extensions, date, package versions, git commit), so the history of committed results shows where and
when each figure was measured, and a figure that moves at the same commit can be traced to the
machine or the environment.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from basis.tracking import environment

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_meta() -> dict[str, Any]:
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **environment(),
        "git_commit": commit,
    }


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write `payload` plus a `"meta"` stamp to `benchmarks/results/<name>.json` and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({**payload, "meta": machine_meta()}, indent=2, sort_keys=False) + "\n")
    return path
