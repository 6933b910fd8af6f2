"""`make test-sglang` only: these checks import the real `sglang==0.5.23`, which lives in `.venv-sglang`.

The default `pytest` run (and CI) does not collect them; `make test-sglang` sets `SGLANG_CONTRACT=1`.
"""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("SGLANG_CONTRACT") == "1" else ["test_*.py"]
