"""The README's demo command works: embedded servers, a real worker killed mid-step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from durable_celery import embedded

pytestmark = pytest.mark.e2e


def test_the_demo_runs_every_run_to_done():
    data_dir = tempfile.mkdtemp(prefix="dcd-")  # short: pgserver puts its socket in there
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "durable_celery.cli", "demo", "--data-dir", data_dir],
            capture_output=True, text=True, timeout=240, env={**os.environ},
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        assert "every run finished" in out
        assert out.count(" done ") == 6, out
        assert "committed once, at attempt 1" in out  # the killed step re-ran
    finally:
        # The demo leaves its Postgres running for a fast next start; stop and delete it.
        embedded.stop_postgres(os.path.join(data_dir, "pg"), delete=True)
        shutil.rmtree(data_dir, ignore_errors=True)
