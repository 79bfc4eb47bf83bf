"""Packaging: the three descriptions of the environment agree with each other, the
package has no import cycles, and a wheel built from the tree carries the fused op."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

try:
    import tomllib  # Python >= 3.11
except ImportError:
    tomllib = None
needs_tomllib = pytest.mark.skipif(tomllib is None, reason="tomllib needs Python >= 3.11")

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement):
    """'torch>=2.4' -> 'torch'; 'jupyter-book<2' -> 'jupyter-book' (lower case)."""
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def _pyproject_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        names |= {_name(r) for r in extra}
    return names


def _environment_names():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            names |= {_name(r) for r in dep["pip"] if not r.startswith("-")}
        elif _name(dep) not in ("python", "pip"):
            names.add(_name(dep))
    return names


@needs_tomllib
def test_environment_yml_lists_the_packages_of_pyproject():
    assert _environment_names() == _pyproject_names()


@needs_tomllib
def test_constraints_pin_every_direct_dependency():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    missing = sorted(n for n in _pyproject_names() if n.replace("_", "-") not in pins)
    assert not missing, f"constraints.txt does not pin {missing}"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_ci_runs_the_makefiles_test_target():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1].strip() == "make test"
    targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
    assert "test" in targets and "book" in targets


# ---- no import cycles ---------------------------------------------------------------

def import_graph(package_dir, package="ddetr"):
    """{module: set of the package's modules it imports} over the .py files of a
    package, from every import statement, also those inside functions (a cycle of
    deferred imports is still two modules that need each other)."""
    files = {}
    for path in sorted(Path(package_dir).rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        files[".".join([package, *parts[:-1 if is_package else None]])] = (path, is_package)
    graph = {}
    for module, (path, is_package) in files.items():
        here = module if is_package else module.rpartition(".")[0]
        graph[module] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module
                if node.level:
                    base = here
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{node.module}" if node.module else base
                # "from pkg import name": the submodule pkg.name if there is one
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files
                           else base for alias in node.names]
            else:
                continue
            graph[module] |= {t for t in targets if t in files and t != module}
    return graph


def import_cycles(graph):
    """The groups of modules that import each other, directly or around a loop (the
    strongly connected components of more than one module, Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_import_cycle_detection_finds_a_deferred_cycle(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text("def f():\n    from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from ..a import f\nimport os\n")
    (package / "c.py").write_text("from . import a\nfrom .sub.b import f\n")
    graph = import_graph(package, "pkg")
    assert graph["pkg.c"] == {"pkg.a", "pkg.sub.b"}
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_no_import_cycles_in_the_package():
    cycles = import_cycles(import_graph(ROOT / "ddetr"))
    assert not cycles, f"modules of ddetr import each other: {cycles}"


# ---- the wheel carries the fused op -----------------------------------------------------

INSTALLED_SCRIPT = """
import json, sys
import torch
import ddetr
from ddetr.experiments.kernel_inputs import make_inputs
from ddetr.ops import kernel, ms_deform_attn, ms_deform_attn_reference

status = kernel.load_kernel(with_cuda=False)
sizes = dict(N=2, S=20 + 6, M=2, D=4, Lq=5, L=2, K=3, levels=[(4, 5), (2, 3)])
inputs = make_inputs(sizes, "cpu", dtype=torch.float64)
out = ms_deform_attn(*inputs, backend="kernel")
print("RESULT", json.dumps(dict(
    file=ddetr.__file__, csrc=str(kernel.CSRC), cpu=status["cpu"],
    max_error=(out - ms_deform_attn_reference(*inputs)).abs().max().item(),
    shape=list(out.shape))))
"""


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_runs_the_fused_op(tmp_path):
    """A wheel built from the tree carries the kernel sources, and an installed copy
    builds and runs the fused CPU op from them.

    What it does and checks:

    1. copies what the build reads (pyproject.toml, README.md, LICENSE, ddetr/) to a
       temporary folder, so that the build leaves no build/ or egg-info in the
       checkout, and builds a wheel there with ``pip wheel --no-deps
       --no-build-isolation`` (the build backend needs no torch);
    2. checks that every file of ddetr/csrc/ (*.h, *.cpp, *.cu) is in the wheel;
    3. installs the wheel with ``pip install --no-deps --target SITE`` (the torch of
       this environment is reused: a fresh venv would download it);
    4. runs a fresh interpreter from an empty folder outside the checkout with
       PYTHONPATH=SITE only (it wins over the editable install's finder, which
       setuptools appends to sys.meta_path) and a temporary DDETR_BUILD_DIR, and
       checks there that ``ddetr.__file__`` and ``kernel.CSRC`` are the installed copy,
       that ``load_kernel()`` builds the CPU op, that the build compiled the
       installed sources, and that ``ms_deform_attn(..., backend="kernel")`` matches
       ``ms_deform_attn_reference`` in float64.
    """
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "ddetr", source / "ddetr",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
    dist, site, build, cwd = (tmp_path / n for n in ("dist", "site", "build", "cwd"))
    cwd.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                                str(source)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"pip wheel failed:\n{run.stdout}\n{run.stderr}"
    wheel, = dist.glob("ddetr-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "ddetr" / "csrc").iterdir()
                     if p.suffix in (".h", ".cpp", ".cu"))
    assert sources and {f"ddetr/csrc/{n}" for n in sources} <= names, sorted(names)

    run = subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"pip install failed:\n{run.stdout}\n{run.stderr}"

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DDETR_BUILD_DIR")}
    env.update(PYTHONPATH=str(site), DDETR_BUILD_DIR=str(build))
    run = subprocess.run([sys.executable, "-c", INSTALLED_SCRIPT], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=1200)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, f"the installed copy failed:\n{run.stdout}\n{run.stderr}"
    result = json.loads(lines[-1][len("RESULT "):])
    installed = site / "ddetr"
    assert Path(result["file"]) == installed / "__init__.py", result
    assert Path(result["csrc"]) == installed / "csrc", result
    assert result["cpu"] is True, result
    ninja = (build / "build.ninja").read_text()       # what the build compiled
    assert str(installed / "csrc" / "ms_deform_attn_cpu.cpp") in ninja
    assert str(ROOT / "ddetr") not in ninja      # not the checkout's sources
    assert result["shape"] == [2, 5, 8] and result["max_error"] < 1e-12, result
