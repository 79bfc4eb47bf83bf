"""The build flags keep the shared C++ runtime, even with a compiler that links its own.

On the first GPU machine the compiler (CXX=/opt/gcc/bin/g++, a wrapper) linked libstdc++
statically into the extension. Every TORCH_CHECK whose message holds a number then
killed the process (the extension's own copy of the iostream code read locale state
that only the process's shared libstdc++ had set up); messages without numbers passed.
Here the same wrapper, imitated, makes the numbers vanish from the message instead (an
uninitialised copy behaves differently on another machine: it is undefined behaviour
either way). ddetr.ops.toolchain names the shared runtime on the link line; this test
builds a tiny operator both ways, with that wrapper, in fresh processes.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ddetr.ops import toolchain

ROOT = Path(__file__).resolve().parents[1]

SOURCE = r"""
#include <torch/library.h>
TORCH_LIBRARY(PROBE_NS, m) { m.def("check(Tensor x) -> Tensor"); }
at::Tensor check(const at::Tensor& x) {
  TORCH_CHECK_VALUE(false, "level ", x.size(0), " of ", x.sizes());
  return x;
}
TORCH_LIBRARY_IMPL(PROBE_NS, CompositeExplicitAutograd, m) { m.impl("check", &check); }
"""

SCRIPT = """
import sys, torch
from torch.utils import cpp_extension
from ddetr.ops import toolchain
name, folder, fixed = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
ldflags = toolchain.build_flags(folder, cuda=False)["extra_ldflags"] if fixed else []
cpp_extension.load(name=name, sources=[folder + "/probe.cpp"], build_directory=folder,
                   extra_ldflags=ldflags, is_python_module=False)
try:
    getattr(torch.ops, name).check(torch.zeros(17, 3))
except ValueError as e:
    print("MESSAGE", str(e).splitlines()[0])
"""


def build_and_raise(tmp_path, name, fixed):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "probe.cpp").write_text(SOURCE.replace("PROBE_NS", name))
    # the GPU image's compiler, imitated: g++ that links libstdc++ statically
    wrapper = tmp_path / "static-g++"
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('g++')} \"$@\" -static-libstdc++\n")
    wrapper.chmod(0o755)
    env = dict(os.environ, CXX=str(wrapper),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", SCRIPT, name, str(folder), "1" if fixed else "0"],
                         env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("MESSAGE ")]
    return run.returncode, (lines[0][len("MESSAGE "):] if lines else None), run.stderr


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the probe with")
def test_numbers_in_error_messages_survive_a_statically_linking_compiler(tmp_path):
    code, message, err = build_and_raise(tmp_path, "probe_fixed", fixed=True)
    assert code == 0 and message == "level 17 of [17, 3]", (code, message, err[-2000:])
    # and the test can fail: without the flag the same build loses the numbers (or,
    # as on the GPU machine, the process)
    code, message, err = build_and_raise(tmp_path, "probe_static", fixed=False)
    assert code != 0 or message != "level 17 of [17, 3]", textwrap.shorten(err, 500)


def test_every_build_names_the_shared_runtime():
    for cuda in (False, True):
        flags = toolchain.build_flags("csrc", cuda=cuda)["extra_ldflags"]
        assert flags[-len(toolchain.SHARED_CXX_RUNTIME):] == toolchain.SHARED_CXX_RUNTIME
