"""The benchmark command runs and writes its JSON and table (a quick, small run)."""
import json

from ddetr import bench
from ddetr.cli import build_parser


def test_bench_kernels_cli_writes_json_and_table(tmp_path):
    args = build_parser().parse_args(["bench", "kernels", "--device", "cpu", "--shapes",
                                      "book", "--repeat", "1", "--no-memory", "--out",
                                      str(tmp_path)])
    assert args.func(args) == 0
    result = json.loads((tmp_path / "kernels_cpu.json").read_text())
    entry = result["shapes"]["book"]
    assert set(entry["impls"]) == {"reference", "kernel"}
    assert entry["speedup"]["forward_backward"] > 0
    assert "| book" in (tmp_path / "kernels.md").read_text()


def test_cpu_peak_memory_counts_what_the_call_allocates():
    # fused forward+backward of the book shape allocates the output and three
    # gradients: 4 * 1360 * 8 * (16 + 16 + 4*4*3) floats = 13.3 MiB
    peak = bench.cpu_peak_memory("book", "kernel", True)
    assert peak is not None and 10 * 2**20 < peak < 40 * 2**20, peak


def test_forward_bytes():
    s = bench.sizes_of("decoder")
    points = s["N"] * s["Lq"] * s["M"] * s["L"] * s["K"]
    value = s["N"] * s["S"] * s["M"] * s["D"]
    assert bench.forward_bytes("decoder") == 4 * (value + 3 * points + 2 * 300 * 256)
