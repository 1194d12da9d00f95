"""A script run in a fresh interpreter on a chosen Keras backend, for the tests that
compare backends (Keras reads ``KERAS_BACKEND`` once, at its first import).

Imports neither Keras nor TensorFlow (``tests/helpers.py`` imports TensorFlow), so the
tests that check what a backend imports can use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, backend: str, *, timeout: float = 600) -> Any:
    """The JSON value ``script`` prints on its last line, run by this interpreter on this
    checkout with ``KERAS_BACKEND=backend``; a failing script fails the test with the end
    of its stderr."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
