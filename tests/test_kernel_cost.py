"""The static cost analysis of the CUDA kernels (ddetr/analysis/kernel_cost.py).

The parsers run on output captured from a real compile (tests/data/kernel_cost/: the
ptxas -v report of ddetr/csrc/ms_deform_attn_cuda.cu for sm_90, and cuobjdump -sass of
two float32 forward kernels, this one's L=4,K=4 instantiation and the first version's,
trimmed to the instruction text); the slow test compiles the source and checks the
recorded goal: at most 20 instructions per point per channel, no spills.
"""
import gzip
from pathlib import Path

import pytest

from ddetr.analysis import kernel_cost as kc

DATA = Path(__file__).resolve().parent / "data" / "kernel_cost"


def read(name):
    path = DATA / name
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return f.read()


def test_parse_ptxas_on_a_real_report():
    kernels = kc.parse_ptxas(read("ptxas_sm90.txt"))
    described = {kc.label(kc.describe(name)): info for name, info in kernels.items()}
    assert len(described) == len(kernels) == 26  # 13 forward + 13 backward instantiations
    info = described["forward float32 VEC=8 L=4,K=4 int32"]
    assert info["arch"] == "sm_90" and 0 < info["registers"] <= 255
    assert all(v["registers"] and v["stack_bytes"] == v["spill_stores"] == v["spill_loads"] == 0
               for v in kernels.values())


def test_parse_ptxas_reads_spills():
    report = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
              "ptxas info    : Function properties for _Z3fooPf\n"
              "    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads\n"
              "ptxas info    : Used 128 registers, used 0 barriers, 368 bytes cmem[0]\n")
    assert kc.parse_ptxas(report) == {"_Z3fooPf": dict(
        arch="sm_90", registers=128, stack_bytes=24, spill_stores=16, spill_loads=8)}


@pytest.mark.parametrize("sass, kernel, per_point_per_channel", [
    ("forward_f32_L4K4_sm90.sass.gz", "forward float32 VEC=8 L=4,K=4 int32", (5, 20)),
    ("forward_f32_first_version_sm90.sass.gz", "forward float32 VEC=1 L,K at run time int64",
     (150, 300)),
])
def test_hot_loop_of_real_sass(sass, kernel, per_point_per_channel):
    functions = kc.parse_sass(read(sass))
    assert len(functions) == 1
    (name, instructions), = functions.items()
    d = kc.describe(name)
    assert kc.label(d) == kernel
    assert instructions[0][0] == 0 and all(op for _, op, _ in instructions)
    loop = kc.hot_loop(instructions, kc.expected_loads(d))
    assert loop is not None and loop["loads"] == kc.expected_loads(d)
    points = d["L"] * d["K"] if d["L"] else 1
    low, high = per_point_per_channel
    assert low <= loop["instructions"] / (points * d["vec"]) <= high


def test_loops_and_nesting():
    """A loop at 0x20..0x60 with one nested at 0x30..0x40; the trap BRA to itself is no
    loop; the outer loop's own instructions leave the nested ones and NOPs out."""
    text = """
        Function : kernel
        /*0010*/                   MOV R1, c[0x0][0x28] ;
        /*0020*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0030*/                   FADD R3, R3, R2 ;
        /*0040*/               @P0 BRA 0x30 ;
        /*0050*/                   NOP ;
        /*0060*/              @!P1 BRA 0x20 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
    """
    instructions = kc.parse_sass(text)["kernel"]
    assert [op for _, op, _ in instructions][:3] == ["MOV", "LDG.E", "FADD"]
    assert kc.loops(instructions) == [(0x20, 0x60), (0x30, 0x40)]
    own = kc.own_instructions(instructions, (0x20, 0x60), kc.loops(instructions))
    assert [a for a, _, _ in own] == [0x20, 0x60]
    assert kc.hot_loop(instructions) == dict(first=0x20, last=0x60, instructions=2, loads=1)
    assert kc.hot_loop(instructions, expected_loads=5) is None


@pytest.mark.slow
@pytest.mark.skipif(kc.nvcc_path() is None or kc.cuobjdump_path() is None,
                    reason="nvcc or cuobjdump not found")
def test_compiled_kernels_meet_the_goal():
    """Compile for sm_90 (about a minute): every instantiation without spills, every
    float32 forward at most GOAL instructions per sampling point per channel."""
    rows = kc.kernel_costs(archs=("sm_90",))
    assert len(rows) == 32  # 16 instantiations (4 dtypes) each forward and backward
    for row in rows:
        p = row["ptxas"]["sm_90"]
        assert p["stack_bytes"] == p["spill_stores"] == p["spill_loads"] == 0, row
    float32 = [r for r in rows if r["kind"] == "forward" and r["dtype"] == "float32"
               and r["vec"] == 8]
    assert len(float32) == 4  # L=4,K=4 (levels split or not), L=1,K=4, run-time L, K
    for row in float32:
        assert row["per_point_per_channel"] <= kc.GOAL, row


def _simulated_plan(D, vec):
    """Threads per (query, head), rounds and idle threads, found by dealing the D
    channels out in vec-channel pieces to the largest power-of-two group of at most 32
    threads that every thread has a piece of in the first round."""
    pieces = -(-D // vec)
    lanes = max(p for p in (1, 2, 4, 8, 16, 32) if p <= max(pieces, 1))
    rounds = -(-pieces // lanes)
    return lanes, rounds, rounds * lanes - pieces


@pytest.mark.parametrize("D", [1, 3, 8, 24, 32, 40, 64, 256, 264, 300])
@pytest.mark.parametrize("float32", [True, False])
def test_launch_plan_deals_out_every_channel(D, float32):
    plan = kc.launch_plan(D, float32=float32)
    assert plan["fast"] == (float32 and D % 8 == 0)
    vec = 8 if plan["fast"] else 1
    assert (plan["lanes"], plan["rounds"], plan["idle"]) == _simulated_plan(D, vec)


def test_launch_plan_refuses_no_channels():
    with pytest.raises(ValueError, match="D .* at least 1, got 0"):
        kc.launch_plan(0)


def test_register_summary_of_a_record():
    def kernel(name, kind, regs, spills, per_point=0.0):
        return dict(kernel=name, kind=kind, per_point_per_channel=per_point,
                    ptxas={"sm_90": dict(registers=regs, spill_stores=spills, spill_loads=1)})
    cost = dict(command="python -m ddetr bench cost", commit="abc", date="2026-01-01",
                nvcc="nvcc 12", baseline=dict(kernels=[kernel("old_fwd", "forward", 90, 8, 31.5)]),
                kernels=[kernel("fwd", "forward", 40, 0, 19.25), kernel("bwd_a", "backward", 64, 3),
                         kernel("bwd_b", "backward", 72, 0), kernel("bwd_c", "backward", 56, 2)])
    lines = kc.register_summary(cost).split("\n")
    assert lines[:2] == ["read from benchmarks/kernel_cost.json, made by",
                         "  python -m ddetr bench cost"]
    assert lines[2] == "at commit abc on 2026-01-01 (nvcc 12)" and lines[3] == ""
    rows = [line.split() for line in lines[5:]]
    assert rows == [["--", "first", "version"], ["old_fwd", "90", "9", "31.5"], ["--", "now"],
                    ["fwd", "40", "1", "19.2"],
                    "-- now, 3 backward kernels: 56-72 registers at sm_90, 8 spill bytes in all".split()]


def test_register_summary_reads_the_recorded_file():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_cost.json"
    cost = kc.read_kernel_cost(path)
    text = kc.register_summary(cost)
    for k in cost["kernels"] + cost["baseline"]["kernels"]:
        assert (k["kernel"] in text) == (k["kind"] == "forward")
