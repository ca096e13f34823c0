"""Plumbing shared by the benchmark scripts: the machine a result was measured on, and the packaged teacher."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

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
