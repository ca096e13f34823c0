"""Start-up: lazy public names, a fast ``optical-hf --version``/``--help`` (``python -m optical_hf``), the launcher
check of :func:`optical_hf.recipe.use_cpu_processes_if_no_gpu`, and the gathering of a sharded Trainer student."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel

import optical_hf
from optical_hf import recipe
from optical_hf.trainer import _unsharded_copy

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "sentence_transformers", "datasets", "peft")


def imported_modules(*python_args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime PYTHON_ARGS`` from the repository root; return it and the top-level packages it
    imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-X", "importtime", *python_args], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=120)
    lines = [line.split("|")[-1] for line in result.stderr.splitlines() if line.startswith("import time:")]
    return result, {line.strip().split(".")[0] for line in lines}


def test_every_public_name_resolves():
    for name in optical_hf.__all__:
        namespace: dict = {}
        exec(f"from optical_hf import {name}", namespace)
        assert namespace[name] is getattr(optical_hf, name), name
    assert set(optical_hf.__all__) <= set(dir(optical_hf))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        optical_hf.nope  # noqa: B018


@pytest.mark.parametrize("flag, expected", [("--version", f"optical-hf {optical_hf.__version__}"),
                                            ("--help", "distill")])
def test_python_m_optical_hf_answers_without_importing_torch(flag, expected):
    result, modules = imported_modules("-m", "optical_hf", flag)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout
    assert "optical_hf" in modules and [name for name in HEAVY if name in modules] == []


def test_import_optical_hf_is_cheap():
    result, modules = imported_modules("-c", "import optical_hf; optical_hf.__version__")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [name for name in HEAVY if name in modules] == []


@pytest.mark.parametrize("env, warns", [
    ({"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1"}, True),  # accelerate launch --num_processes 2
    ({"ACCELERATE_MIXED_PRECISION": "no"}, False),  # accelerate launch, one process asked for
    ({"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1", "OMPI_COMM_WORLD_SIZE": "2"}, False),  # mpirun
])
def test_accelerate_launch_of_a_single_cpu_process_warns(env, warns, monkeypatch, caplog):
    if torch.cuda.is_available():
        pytest.skip("the check is for machines without GPU")
    for name in ("WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_MIXED_PRECISION", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                 "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING, logger="optical_hf"):
        recipe.use_cpu_processes_if_no_gpu()
    assert any("--multi_gpu --num_processes N" in record.getMessage() for record in caplog.records) is warns


def test_use_cpu_processes_under_torchrun(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the check is for machines without GPU")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    recipe.use_cpu_processes_if_no_gpu()
    assert os.environ["ACCELERATE_USE_CPU"] == "true"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_unsharded_copy_holds_the_gathered_weights(lora, model_dirs):
    """The copy built from a gathered (FSDP / ZeRO-3) state dict has the student's architecture and weights."""
    model = AutoModel.from_pretrained(model_dirs["student"])
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"]))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))  # trained weights, LoRA B included, differ from any init
    state_dict = {key: value.clone() for key, value in model.state_dict().items()}
    copy = _unsharded_copy(model, state_dict)
    assert type(copy) is type(model) and copy is not model
    assert copy.state_dict().keys() == state_dict.keys()
    assert all(torch.equal(copy.state_dict()[key], value) for key, value in state_dict.items())
