"""Two CPU processes (torchrun, gloo) train both front ends, with and without LoRA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
