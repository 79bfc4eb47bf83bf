"""The kernel benchmark writes its JSON and table (a quick, small run), measures memory
in a subprocess, and knows the bytes a forward must move."""
import json

import pytest

from ddetr.experiments.kernel_inputs import (forward_bytes, gather_bytes, make_inputs, sizes_of,
                                             traffic)
from ddetr.experiments.kernels import bench_kernels, cuda_goals, write_markdown
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


def test_bench_kernels_refuses_dtypes_a_device_cannot_measure(tmp_path):
    with pytest.raises(ValueError, match="float32 first, then some of \\[\\]"):
        bench_kernels(tmp_path, "cpu", ["book"], dtypes=["bfloat16"])
    assert not list(tmp_path.iterdir())


def test_traffic_counts_every_corner_and_half_values():
    s = sizes_of("encoder")
    points = s["N"] * s["Lq"] * s["M"] * s["L"] * s["K"]
    t = traffic("encoder", value_size=2, point_size=4)
    assert t["gathered"] == 4 * points * s["D"] * 2 and t["points"] == 3 * points * 4
    assert forward_bytes("encoder", 2, 4) == t["value"] + t["points"] + t["output"]
    assert gather_bytes("encoder") > 10 * forward_bytes("encoder")   # Lq = S: reads shared


def _cuda_result(over_floor, speedup, bf16_gain, over_official=2.5, host_ms=0.01):
    """A kernels_cuda.json result of measure_kernels' form, with chosen numbers: the
    bare ops' fwd+bwd take 1 ms (float32), 1 / bf16_gain ms (bfloat16) and over_official
    ms (the official op), each enqueued in host_ms per call."""
    row = {"forward_ms": 1.0, "forward_backward_ms": 3.0, "forward_backward_peak_MB": 10.0}

    def bare(total):
        return {"forward_ms": total / 4, "backward_ms": 3 * total / 4,
                "forward_host_ms": host_ms, "backward_host_ms": host_ms}

    def one(total, official=None):
        times = {"CUDA": bare(total)}
        if official:
            times["official"] = bare(official)
        return {"impls": {"reference": row, "kernel": row, "triton": row},
                "speedup": {"forward": speedup, "forward_backward": speedup},
                "speedup_by_impl": {"kernel": {"forward": speedup, "forward_backward": speedup},
                                    "triton": {"forward": 2.0, "forward_backward": 2.0}},
                "bandwidth_floor": {"floor_ms": 0.1, "gather_floor_ms": 1.5, "l2_gather_ms": 1.0,
                                    "op_forward_ms": 0.1 * over_floor,
                                    "fused_forward_over_floor": over_floor},
                "bare": times}

    sizes = {k: v for k, v in sizes_of("encoder").items() if k != "levels"}
    entry = {"description": "paper encoder", "sizes": sizes, **one(1.0, over_official),
             "bfloat16": {**one(1.0 / bf16_gain),
                          "over_float32": {"reference": 1.0, "kernel": bf16_gain,
                                           "triton": 1.2}}}
    return {"device": "cuda", "machine": {"gpu": "a GPU", "cuda": "13.0", "torch": "2.11"},
            "repeat": 5, "memory": "CUDA", "dtypes": ["float32", "bfloat16"],
            "bandwidth_GBps": {"theoretical": 4800.0, "measured_copy": 4000.0,
                               "measured_l2_copy": 8000.0},
            "shapes": {"encoder": entry}}


def test_the_gpu_table_states_the_goals_either_way(tmp_path):
    (tmp_path / "kernels_cuda.json").write_text(json.dumps(_cuda_result(2.5, 12.0, 1.7)))
    text = write_markdown(tmp_path).read_text()
    assert "|  | bfloat16 | reference |" in text and "|  |  | CUDA | 1.000 | 3.000 | 12.0x" in text
    assert ("floors: DRAM / gather / every corner from L2; bare CUDA op | 0.100 / 1.500 / "
            "1.000; 0.250 (2.50x DRAM)") in text
    assert "| encoder | float32 | official | 0.6250 | 1.8750 | 2.5000 |" in text
    assert "encoder forward at 2.50x its DRAM floor (goal <= 3x): met" in text
    assert "2.50x faster than the official op (bare GPU time; goal >= 2x): met" in text
    assert "bfloat16 forward+backward 1.70x faster than float32 (bare GPU time; goal >= " \
           "1.6x): met" in text
    assert "host-bound" not in text
    goals = cuda_goals(_cuda_result(3.5, 9.0, 1.1, over_official=1.5))
    assert all("not met" in line for line in goals) and len(goals) == 4, goals
    # a bare op that took as long to enqueue as to run: its ratio is the host's
    slow = cuda_goals(_cuda_result(2.5, 12.0, 1.7, host_ms=0.5))
    assert sum("host-bound" in line for line in slow) == 2


