"""The kernel benchmark writes its JSON and table (a quick, small run), measures memory
in a subprocess, and knows the bytes a forward must move."""
import json

import pytest

from ddetr.experiments.kernel_inputs import forward_bytes, make_inputs, sizes_of
from ddetr.experiments.kernels import bench_kernels
from ddetr.experiments.memory import cpu_peak_memory


def test_bench_kernels_writes_json_and_table(tmp_path):
    result = bench_kernels(tmp_path, "cpu", ["book"], repeat=1, memory=False)
    assert json.loads((tmp_path / "kernels_cpu.json").read_text()) == json.loads(json.dumps(result))
    entry = result["shapes"]["book"]
    assert set(entry["impls"]) == {"reference", "kernel"}
    assert entry["speedup"]["forward_backward"] > 0
    assert "| book" in (tmp_path / "kernels.md").read_text()


def test_bench_kernels_refuses_unknown_shapes_and_devices(tmp_path):
    with pytest.raises(ValueError, match="unknown \\['nope'\\]"):
        bench_kernels(tmp_path, "cpu", ["book", "nope"])
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        bench_kernels(tmp_path, "tpu", ["book"])
    assert not list(tmp_path.iterdir())


def test_cpu_peak_memory_counts_what_the_call_allocates():
    # fused forward+backward of the book shape allocates the output and three
    # gradients: 4 * 1360 * 8 * (16 + 16 + 4*4*3) floats = 13.3 MiB
    peak = cpu_peak_memory("book", "kernel", True)
    assert peak is not None and 10 * 2**20 < peak < 40 * 2**20, peak


def test_forward_bytes():
    s = sizes_of("decoder")
    points = s["N"] * s["Lq"] * s["M"] * s["L"] * s["K"]
    value = s["N"] * s["S"] * s["M"] * s["D"]
    assert forward_bytes("decoder") == 4 * (value + 3 * points + 2 * 300 * 256)


def test_make_inputs_are_shaped_like_the_model():
    value, shapes, starts, loc, w = make_inputs("book", "cpu")
    s = sizes_of("book")
    assert value.shape == (s["N"], s["S"], s["M"], s["D"])
    assert loc.shape == (s["N"], s["Lq"], s["M"], s["L"], s["K"], 2)
    assert shapes.tolist() == [list(hw) for hw in s["levels"]] and starts[0] == 0
    assert w.sum((-2, -1)).allclose(w.new_ones(()))       # softmax over the L*K points
    # encoder queries sample around their own pixel: the first is the top-left pixel
    # of level 0, whose centre is (0.5 / 32, 0.5 / 32)
    assert (loc[0, 0, :, 0].mean((0, 1)) - 0.5 / 32).abs().max() < 0.1
    with pytest.raises(ValueError, match="shape must be one of"):
        sizes_of("huge")
