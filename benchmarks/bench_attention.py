"""NormSoftmax attention vs stock softmax SDPA: time (forward + backward) and peak memory, as ratios.

Each configuration measures stock ``F.scaled_dot_product_attention`` (same mask), the fast NormSoftmax path and the
plain materialising reference in the same run, interleaved, and reports medians over repetitions and their ratios
to SDPA (the machines are shared and noisy: ratios, never bare times). Peak memory is measured in a fresh
subprocess per path: the resident-set high-water mark on CPU (Linux; large allocations mmapped so that frees return
memory), ``torch.cuda.max_memory_allocated`` on GPU.

    python benchmarks/bench_attention.py                # the default settings: B=4, H=12, d=64, fp32
    python benchmarks/bench_attention.py --quick        # small smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from timing_options import CLOCKS, add_timing_options, apply_timing_options

from hf_normsoftmax.attention import normsoftmax_attention, normsoftmax_attention_reference


def _expanded(q, k, v):
    groups = q.shape[1] // k.shape[1]
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


PATHS = {
    "sdpa": lambda q, k, v, mask, causal: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=k.shape[1] != q.shape[1]
    ),
    "normsoftmax_fast": lambda q, k, v, mask, causal: normsoftmax_attention(q, k, v, attn_mask=mask, is_causal=causal)[
        0
    ],
    "normsoftmax_reference": lambda q, k, v, mask, causal: normsoftmax_attention_reference(
        q, k, v, attn_mask=mask, is_causal=causal
    )[0],
    # grouped-query keys/values expanded to one per query head before the call (what the fast path avoids)
    "normsoftmax_fast_expanded": lambda q, k, v, mask, causal: normsoftmax_attention(
        q, *_expanded(q, k, v), attn_mask=mask, is_causal=causal
    )[0],
}


def make_inputs(batch, heads, length, dim, padded, causal, device, dtype, seed=0, window=0, kv_heads=0):
    """q (B, H, N, d), k/v (B, kv_heads or H, N, d) and the mask: None, key padding, causal + padding, or (window > 0)
    a causal sliding window of that many keys as transformers builds it for sdpa, a (B, 1, N, N) bool tensor."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    kv = kv_heads or heads
    q, k, v = (torch.randn(batch, h, length, dim, generator=g).to(device, dtype).requires_grad_()
               for h in (heads, kv, kv))
    mask = None
    if padded:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        valid[batch // 2 :, : length // 4] = False  # half the batch left-padded by a quarter
        mask = valid[:, None, None, :]
        if causal:  # stock SDPA cannot combine a mask with is_causal: give both paths the full 4D mask
            mask = mask & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if window:
        i = torch.arange(length, device=device)
        band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        mask = band.expand(batch, 1, length, length) if mask is None else mask & band
    return q, k, v, mask


CASES = {
    # name: (causal, padded, sliding window, grouped-query)
    "bidirectional": (False, False, False, False),
    "padding": (False, True, False, False),
    "causal": (True, False, False, False),
    "causal+padding": (True, True, False, False),
    "window": (True, False, True, False),
    "gqa": (True, False, False, True),
}
DEFAULT_CASES = "bidirectional,padding,causal,causal+padding"


def case_inputs(case, args, length=None):
    causal, padded, window, grouped = CASES[case]
    return make_inputs(args.batch, args.heads, length or args.length, args.dim, padded, causal, args.device,
                       torch.float32, window=args.window if window else 0, kv_heads=args.kv_heads if grouped else 0)


def case_name(case, args):
    causal, padded, window, grouped = CASES[case]
    name = ("causal" if causal else "bidirectional") + (" + padding" if padded else "")
    if window:
        name += f" + window {args.window}"
    if grouped:
        name += f", {args.heads}/{args.kv_heads} heads (GQA)"
    return name


def step(path, q, k, v, mask, causal, grad_out):
    for t in (q, k, v):
        t.grad = None
    out = PATHS[path](q, k, v, mask, causal)
    out.backward(grad_out)


def time_paths(paths, args, case, reps):
    q, k, v, mask = case_inputs(case, args)
    causal = CASES[case][0]
    grad_out = torch.randn_like(q)
    times = {p: [] for p in paths}
    for p in paths:  # warm-up
        step(p, q, k, v, mask, causal, grad_out)
    for _ in range(reps):
        for p in paths:  # interleaved so load changes hit every path alike
            clock = CLOCKS[args.clock]
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            step(p, q, k, v, mask, causal, grad_out)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[p].append(clock() - t0)
    return times


def quartiles(values):
    """(lower quartile, upper quartile) of a list (the middle half of the repetitions lies between them)."""
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return q1, q3


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(path, case, args):
    """Run one forward+backward in this (fresh) process and print the peak memory above the inputs, in bytes.

    CPU: the resident-set high-water mark (VmHWM), reset after a warm-up step, minus the resident set before the
    measured step. The parent sets MALLOC_MMAP_THRESHOLD_ so that glibc serves large tensors by mmap and returns
    them to the system when freed: the high-water mark then follows the live tensors instead of heap leftovers.
    """
    device = args.device
    q, k, v, mask = case_inputs(case, args)
    causal = CASES[case][0]
    grad_out = torch.randn_like(q)
    step(path, q, k, v, mask, causal, grad_out)  # warm-up: thread pools, lazy initialisation
    for t in (q, k, v):
        t.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
        base = _proc_status_bytes("VmRSS")
    step(path, q, k, v, mask, causal, grad_out)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _proc_status_bytes("VmHWM") - base
    print(json.dumps({"peak": peak}))


def peak_memory(path, args, case):
    cmd = [
        sys.executable, __file__, "--memory-child", path, "--case", case, "--batch", str(args.batch),
        "--heads", str(args.heads), "--length", str(args.mem_length), "--dim", str(args.dim), "--device", args.device,
        "--window", str(args.window), "--kv-heads", str(args.kv_heads),
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # see peak_memory_child
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def count_aten_ops(path, args, case) -> int:
    """aten operator calls (torch profiler, every nesting level) of one forward + backward: each is a dispatch, a
    parallel region on CPU and a kernel launch on a GPU, so the count sets the cost of small and contended calls."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v, mask = case_inputs(case, args)
    causal = CASES[case][0]
    grad_out = torch.randn_like(q)
    step(path, q, k, v, mask, causal, grad_out)  # warm-up: lazy initialisation is not part of a call
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(path, q, k, v, mask, causal, grad_out)
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--mem-length", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--window", type=int, default=256, help="keys per query row of the 'window' case")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads of the 'gqa' case "
                        "(default: heads / 4)")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow materialising reference")
    add_timing_options(parser)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.kv_heads is None:
        args.kv_heads = max(1, args.heads // 4)
    if args.memory_child:
        return peak_memory_child(args.memory_child, args.case, args)
    apply_timing_options(parser, args, min_reps=1)
    if args.quick:
        args.batch, args.heads, args.length, args.mem_length, args.reps = 2, 2, 64, 256, 3
        args.kv_heads, args.window = 1, 16
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; allowed: {', '.join(CASES)}")

    print(
        f"# NormSoftmax attention, forward+backward, B={args.batch} H={args.heads} d={args.dim} fp32 {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, median of {args.reps}"
    )
    print()
    print(
        f"| N | mask | path | time vs SDPA | quartiles of the per-repetition ratios | "
        f"peak memory vs SDPA (N={args.mem_length}) | aten ops (fwd+bwd) |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        paths = ["sdpa", "normsoftmax_fast"]
        if CASES[case][3]:
            paths.append("normsoftmax_fast_expanded")
        if not args.no_reference:
            paths.append("normsoftmax_reference")
        runs = time_paths(paths, args, case, args.reps)
        times = {p: statistics.median(t) for p, t in runs.items()}
        # each repetition's ratio to the SDPA call just before it: their spread shows how noisy this run was
        paired = {p: quartiles([a / b for a, b in zip(runs[p], runs["sdpa"], strict=True)]) for p in paths}
        mems = {}
        if not args.no_memory:
            for p in paths:
                if p == "normsoftmax_reference" and args.mem_length > 1024:
                    continue  # materialises B*H*N*N floats several times: many GB at N=4096
                mems[p] = peak_memory(p, args, case)
        for p in paths:
            mem = f"{mems[p] / mems['sdpa']:.2f}x" if p in mems and mems.get("sdpa") else "-"
            if p in mems:
                mem += f" ({mems[p] / 2**20:.0f} MB)"
            spread = f"{paired[p][0]:.2f}x-{paired[p][1]:.2f}x"
            ops = count_aten_ops(p, args, case)
            print(f"| {args.length} | {case_name(case, args)} | {p} | {times[p] / times['sdpa']:.2f}x | {spread} | "
                  f"{mem} | {ops} |", flush=True)


if __name__ == "__main__":
    main()
