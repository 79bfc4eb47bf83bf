"""Experiments and benchmarks: commands that measure the library and record results.

The paper's claims in miniature (``python -m ddetr experiment convergence``):

    convergence     the experiment: its models, one training run, the whole run
    runner          runs the trainings one after the other or in a process pool
    results         convergence.json: read, write, summary statistics, markdown table
    claims          the paper's two claims tested on a results file, with verdicts
    followups       the detectors after Deformable DETR side by side, with the
                    sources of every number (chapter 7's table)
    probes          what a trained model learned: where its decoder queries sample,
                    how its boxes move through the decoder (decoder_trace)
                    (the int8 weights the book loads instead of training are
                    ``ddetr.engine.checkpoint.save_compact``'s)

The fused kernel against the reference (``python -m ddetr bench build | kernels``):

    kernels         build the kernel; time and measure both; kernels_<device>.json/.md
    kernel_inputs   the benchmark's shapes and model-like inputs (also chapter 5's)
    timing          side-by-side timing, CUDA events, bare ops, DRAM and L2 bandwidth
    memory          peak memory of one call (fresh subprocess on the CPU)
    official_op     the official Deformable-DETR CUDA op, built at run time from a
                    checkout the user names (``bench kernels --official``)

The training step (``python -m ddetr bench train | profile``):

    train_step      images/s and peak memory per backend, amp setting and batch size
    train_profile   where a GPU step's time goes: host syncs, GPU busy fraction, kernels

What attention learns, for the book's figures:

    toy_attention   toy trainings with a known answer (chapters 3 and 4): deformable,
                    dense and multi-scale attention, in seconds on a CPU

Training on the CPU (``python -m ddetr bench contention | experiment record``, the
training chapter):

    contention      training images/s on a shared CPU, per thread setting
    train_record    recorded runs of the cpu preset (train_cpu.json), the reference
                    run and the comparison the training chapter prints

Shared by all:

    machine         the machine, git commit and load average a result records
    markdown_block  a generated table inside a hand-written benchmarks/*.md

Import the modules themselves (``from ddetr.experiments.results import load_results``):
this package imports nothing on its own, so that ``bench build`` does not load the
training engine.
"""
