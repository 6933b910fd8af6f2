"""Write benchmark results as JSON under `benchmarks/results/`, stamped with machine and date.

Every benchmark prints its figures and calls `write_results(name, payload)`; the payload keeps the
shape its issue asks for and gains one extra top-level key, `"meta"` (machine, CPU model and vector
extensions, date, package versions, git commit and whether the tree was dirty), so the history of committed results shows where and
when each figure was measured, and a figure that moves at the same commit can be traced to the
machine or the environment.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
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

    commit, dirty = git_state()
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
        "git_dirty": dirty,  # tracked files differed from the commit: the figures may not be its
    }


def git_state() -> tuple[str | None, bool | None]:
    """(short commit, whether tracked files differ from it), or (None, None) outside a git checkout."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        return commit, bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None, None


def code_fingerprint(*folders: str) -> str:
    """sha256 over the files under `folders` as they are on disk now (committed or not): a cached
    benchmark run is reused only while the code it ran stays the same. In a git checkout these are the
    tracked files and the untracked ones git does not ignore (a new module not yet added is code the
    run ran); elsewhere every file but Python's bytecode caches, which the runs themselves write."""
    root = Path(__file__).resolve().parents[1]
    try:
        names = _git("ls-files", "--cached", "--others", "--exclude-standard", "--", *folders).splitlines()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        names = [
            str(p.relative_to(root))
            for folder in folders
            for p in (root / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        ]
    digest = hashlib.sha256()
    for name in sorted(set(names)):
        path = root / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root).stdout.strip()


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write `payload` plus a `"meta"` stamp to `benchmarks/results/<name>.json` and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({**payload, "meta": machine_meta()}, indent=2, sort_keys=False) + "\n")
    return path
