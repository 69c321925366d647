"""The timing options of the benchmark scripts: repetitions (their median is reported), torch threads, the clock.

Imported by the scripts as a sibling module (``python benchmarks/<script>.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

# wall: elapsed time; cpu: process CPU time, far less sensitive to other jobs on a shared machine
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def add_timing_options(parser: argparse.ArgumentParser, reps: int = 7, reps_help: str | None = None,
                       clock: bool = True) -> None:
    """--reps (default ``reps``), --threads and, with ``clock``, --clock."""
    parser.add_argument("--reps", type=int, default=reps, help=reps_help or "repetitions; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    if clock:
        parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                            help="wall clock, or process CPU time (steadier on a shared machine; use with --threads 1)")


def apply_timing_options(parser: argparse.ArgumentParser, args: argparse.Namespace, min_reps: int = 5):
    """Refuse fewer than ``min_reps`` repetitions (0: any), set torch's thread count; the clock function, if the
    parser has --clock."""
    if args.reps < min_reps:
        parser.error(f"--reps must be at least {min_reps} (the medians are reported), got {args.reps}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return CLOCKS[args.clock] if hasattr(args, "clock") else None
