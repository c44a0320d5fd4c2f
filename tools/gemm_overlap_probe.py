"""Can a GEMM and a memory-bound kernel share the GPU usefully?

A question for the training step's design, answered with PyTorch on the GPU machine: the
backward's weight-gradient GEMMs do not feed the next ops, so they could run on a second stream
beside the memory-bound kernels (SwiGLU's and RMSNorm's backward, the attention's prep). This
times, in sustained loops (the card at its power cap, as in a step), an XL-sized GEMM alone, two
603-MB elementwise kernels alone, both back to back on one stream, and both on two streams, and
prints how much of the memory work the overlap recovers.

    python3 tools/gemm_overlap_probe.py

On an H200 (docs/perf.md, fifth session): 7-8%. A cuBLAS GEMM fills every SM, so there is
little room beside it.
"""
import time

import torch

T, D, I = 12288, 1536, 4096  # XL: tokens per step, hidden, intermediate
dev = "cuda"
dgu = torch.randn(T, 2 * I, device=dev, dtype=torch.bfloat16)
xn = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
dw = torch.empty(2 * I, D, device=dev, dtype=torch.bfloat16)
dres = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
w = torch.randn(2 * I, D, device=dev, dtype=torch.bfloat16)
dx = torch.empty(T, 2 * I, device=dev, dtype=torch.bfloat16)
a = torch.randn(T, 2 * I, device=dev, dtype=torch.bfloat16)
b = torch.randn(T, 2 * I, device=dev, dtype=torch.bfloat16)
c = torch.empty_like(a)


def gemm_weight():  # dW [8192, 1536] = dgu^T xn: 309 GFLOP, K = 12288
    torch.mm(dgu.t(), xn, out=dw)


def gemm_input():  # [12288, 8192] = dres w^T: 309 GFLOP, K = 1536
    torch.mm(dres, w.t(), out=dx)


def memory_op():  # 603 MB read + written
    torch.mul(a, b, out=c)


side_gemm, side_mem = torch.cuda.Stream(), torch.cuda.Stream()


def timed(name, fn, rounds=40):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / rounds * 1e3
    print(f"{name:44s} {ms:8.3f} ms per round")
    return ms


def one_stream(gemm):
    def run():
        gemm()
        memory_op()
        memory_op()
    return run


def two_streams(gemm):
    main = torch.cuda.current_stream()

    def run():
        side_gemm.wait_stream(main)
        side_mem.wait_stream(main)
        with torch.cuda.stream(side_gemm):
            gemm()
        with torch.cuda.stream(side_mem):
            memory_op()
            memory_op()
        main.wait_stream(side_gemm)
        main.wait_stream(side_mem)
    return run


# Into the sustained (power-capped) state first.
t0 = time.perf_counter()
while time.perf_counter() - t0 < 3:
    gemm_input()
torch.cuda.synchronize()
for gemm, name in ((gemm_input, "input-grad GEMM"), (gemm_weight, "weight-grad GEMM")):
    timed(name + " alone", gemm)
    mem = timed("2 memory kernels alone", lambda: (memory_op(), memory_op()))
    serial = timed(name + " + 2 memory kernels, one stream", one_stream(gemm))
    overlapped = timed(name + " + 2 memory kernels, two streams", two_streams(gemm))
    print(f"  overlap recovers {serial - overlapped:.3f} ms of {mem:.3f} ms of memory work ({(serial - overlapped) / mem * 100:.0f}%)")
