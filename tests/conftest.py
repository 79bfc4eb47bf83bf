"""Shared fixtures. The book is built once per test session (it executes every notebook)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def build_book(builddir):
    """Build the whole book from a clean build folder, quick mode, warnings as errors.

    Returns (returncode, combined output, html folder).
    """
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    env = dict(os.environ, DDETR_QUICK="1", PYTHONWARNINGS="ignore::DeprecationWarning")
    proc = subprocess.run(
        [str(jupyter_book), "build", str(ROOT), "--path-output", str(builddir),
         "--warningiserror", "--nitpick", "--keep-going"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    return proc.returncode, proc.stdout + proc.stderr, Path(builddir) / "_build" / "html"


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """The html folder of a fresh quick-mode build; fails the test if the build did."""
    code, log, html = build_book(tmp_path_factory.mktemp("book"))
    (ROOT / "_build").mkdir(exist_ok=True)
    (ROOT / "_build" / "book-test.log").write_text(log)
    if code != 0:
        pytest.fail(f"jupyter-book build failed (exit {code}); the end of its log:\n"
                    + log[-6000:])
    return html


def kill_when_flagged(script, flag, what, timeout_s):
    """Run ``python -c script`` and SIGKILL it as soon as it creates the file ``flag``.

    Fails with ``what`` if the flag never appears (the script ended or timed out first).
    """
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        deadline = time.monotonic() + timeout_s
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert flag.exists(), what
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
