"""Two CPU processes (torchrun or accelerate launch, gloo) train both front ends, with and without LoRA, and run the
example script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import toy_bitext
from sentence_transformers import SentenceTransformer
from transformers import AutoModel


def test_two_process_training(model_dirs, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "distributed_train.py"), str(model_dirs["student"]), str(model_dirs["teacher"]),
           str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    for name in ("st", "st_lora", "trainer", "trainer_lora"):
        assert ranks[0][name] == pytest.approx(ranks[1][name], rel=1e-9, abs=1e-6), name  # replicas in sync
        final = out / name / "final"
        assert (final / "modules.json").exists() and (final / "model.safetensors").exists()
        assert (final / "adapter" / "adapter_config.json").exists() == name.endswith("lora")
        embedding = SentenceTransformer(str(final), device="cpu").encode(["kitacwa kiehtwa"], convert_to_tensor=True)
        assert torch.isfinite(embedding).all()
        assert AutoModel.from_pretrained(final).config.hidden_size == embedding.shape[-1]


def test_accelerate_launch_of_the_example_on_two_cpu_processes(model_dirs, tmp_path):
    """The documented CPU launch (`accelerate launch --multi_gpu --num_processes 2`) trains on 2 ranks; only rank 0
    logs INFO, prints the table and saves."""
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in toy_bitext(48)), encoding="utf-8")
    out = tmp_path / "student"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(Path(__file__).parents[1] / "examples" / "distill.py"),
           "--teacher", str(model_dirs["teacher"]), "--student", str(model_dirs["student"]), "--bitext", str(pairs),
           "--eval_size", "8", "--max_steps", "2", "--per_device_train_batch_size", "4", "--output_dir", str(out),
           "--disable_tqdm", "true", "--log_level", "info"]  # info: the Trainer's own lines too (default: warning)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}  # no accelerate config
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in result.stderr  # 2 ranks x 4
    assert result.stderr.count("Training on 40 pairs") == 1  # optical_hf INFO on rank 0 only
    assert result.stdout.count("| distilled student |") == 1 and result.stdout.count(f"Student saved to {out}") == 1
    assert json.loads((out / "optical_hf.json").read_text(encoding="utf-8"))["training"]["steps"] == 2
