"""Plumbing shared by the benchmark scripts: the machine a result was measured on, round-robin timing, peak memory,
the order-statistic interval of a median, and markdown tables."""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

DEFAULT_E5 = Path("~/.cache/optical-bench/multilingual-e5-small").expanduser()
"""Where the benchmarks look for multilingual-e5-small (``python ../shared/tools/build_multilingual_e5_small.py``)."""
THREAD_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables recorded in a result's command when they are set."""


def machine_info(device: str, **versions: str) -> dict[str, Any]:
    """What a measurement ran on: the device and its hardware name, cores, torch threads, the load average at the
    start, python/torch/transformers/sentence-transformers versions (plus ``versions``), the date and the command."""
    import sentence_transformers
    import transformers

    if device.startswith("cuda"):
        hardware = torch.cuda.get_device_name(torch.device(device))
    else:
        cpu_lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
        models = [line.split(":", 1)[1].strip() for line in cpu_lines if line.startswith("model name")]
        hardware = models[0] if models else platform.processor() or platform.machine()
    return {
        "device": device,
        "hardware": hardware,
        "cores_available": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        **versions,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([f"{var}={shlex.quote(os.environ[var])}" for var in THREAD_ENV if var in os.environ]
                            + [shlex.join([Path(sys.executable).name, *sys.argv])]),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device, desc: str
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` times after ``warmup`` untimed calls, run round-robin so that
    background load hits them alike (``time.perf_counter``, CUDA synchronised around each call)."""
    from tqdm.auto import tqdm

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc=desc, leave=False, disable=repeats < 2):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak tensor memory allocated by one call of ``fn`` above what was live when it started: on CUDA from
    ``torch.cuda.max_memory_allocated``, on CPU from the torch profiler's allocation records (``profile_memory=True``:
    every tensor allocation and free in the call, replayed in time order)."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation:
            records.append((node.start_time_ns, node.typed[1].alloc_size))  # frees have a negative size
    return max(itertools.accumulate((size for _, size in sorted(records)), initial=0))


def median_interval(values: list[float], confidence: float = 0.95) -> dict[str, float]:
    """The median of ``values`` with its distribution-free order-statistic confidence interval.

    The interval is ``[v_(j), v_(n+1-j)]`` with the largest ``j`` whose coverage ``1 - 2 P(Binomial(n, 1/2) <= j - 1)``
    is still at least ``confidence`` (or ``j = 1`` when ``n`` is too small; ``coverage`` says what it is).
    """
    ordered = sorted(values)
    n = len(ordered)

    def below(k: int) -> float:  # P(Binomial(n, 1/2) <= k)
        return sum(math.comb(n, i) for i in range(k + 1)) / 2**n

    j = 1
    while j < (n + 1) // 2 and 1 - 2 * below(j) >= confidence:
        j += 1
    return {"median": statistics.median(ordered), "low": ordered[j - 1], "high": ordered[n - j],
            "coverage": 1 - 2 * below(j - 1)}


def paired_ratio(numerator: list[float], denominator: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Median of the per-round ratios ``numerator[r] / denominator[r]`` with its :func:`median_interval`, and the ratio
    of the two medians. With the variants timed round-robin (:func:`measure`), a slow phase of the machine slows both
    sides of a round and cancels in its ratio, not in the ratio of two medians taken over different rounds."""
    r = median_interval([a / b for a, b in zip(numerator, denominator, strict=True)], confidence)
    return {"paired_median": r["median"], "low": r["low"], "high": r["high"], "coverage": r["coverage"],
            "ratio_of_medians": statistics.median(numerator) / statistics.median(denominator)}


def positive_int(value: str) -> int:
    """argparse type of a repeat count: a median needs at least one timed run."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return int(value)


def markdown_table(header: str, rows: Iterable[Iterable[Any]]) -> list[str]:
    """Markdown table lines: ``header`` is the column names joined by ``" | "``, ``rows`` the cells (``str`` of each).
    Every column is left-aligned (``|---|``)."""
    return [f"| {header} |", "|" + "---|" * len(header.split(" | "))] + [
        "| " + " | ".join(map(str, row)) + " |" for row in rows]


def write_report(lines: list[str], path: Path) -> str:
    """Join ``lines`` into a Markdown report, write it to ``path`` (its folder created if needed), print and return it."""
    report = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report, encoding="utf-8")
    print(report)
    return report
