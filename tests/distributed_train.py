"""Run by tests/test_multiprocess.py under `torchrun --nproc_per_node 2` (CPU, gloo).

Trains both front ends, with and without LoRA, for a few steps, saves each student, and has every rank write a
fingerprint of its final weights so the test can check the replicas stayed in sync.
usage: distributed_train.py STUDENT_DIR TEACHER_DIR OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from transformers import AutoModel, AutoTokenizer, TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from conftest import sentence_transformer, toy_bitext  # noqa: E402

from optical_hf import (  # noqa: E402
    OTDistillationDataCollator, OTDistillationLoss, OTDistillationTrainer, add_lora, bitext_from_pairs, save_student,
)

student_dir, teacher_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
rank = int(os.environ["RANK"])
dataset = bitext_from_pairs(toy_bitext(64))
# use_cpu: without it transformers does not detect a multi-process CPU run under torchrun (accelerate launch --cpu
# sets ACCELERATE_USE_CPU instead).
common = dict(max_steps=4, per_device_train_batch_size=8, learning_rate=5e-4, report_to=[], save_strategy="no", seed=0,
              use_cpu=True)
lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
fingerprints = {}

for use_lora in (False, True):
    name = f"st{'_lora' if use_lora else ''}"
    student, teacher = sentence_transformer(student_dir), sentence_transformer(teacher_dir)
    if use_lora:
        add_lora(student, lora)
    trainer = SentenceTransformerTrainer(
        model=student, args=SentenceTransformerTrainingArguments(output_dir=str(out / name), **common),
        train_dataset=dataset, loss=OTDistillationLoss(student, teacher),
        data_collator=OTDistillationDataCollator(student.preprocess, teacher_preprocess_fn=teacher.preprocess),
    )
    trainer.train()
    if trainer.args.should_save:
        save_student(student, out / name / "final")
    fingerprints[name] = sum(p.double().sum().item() for p in student.parameters())

    name = f"trainer{'_lora' if use_lora else ''}"
    trainer = OTDistillationTrainer(
        model=AutoModel.from_pretrained(student_dir), teacher=AutoModel.from_pretrained(teacher_dir),
        teacher_processing_class=AutoTokenizer.from_pretrained(teacher_dir),
        args=TrainingArguments(output_dir=str(out / name), **common), train_dataset=dataset,
        peft_config=lora if use_lora else None,
    )
    trainer.train()
    trainer.save_model(str(out / name / "final"))
    fingerprints[name] = sum(p.double().sum().item() for p in trainer.model.parameters())

(out / f"rank{rank}.json").write_text(json.dumps({"world_size": torch.distributed.get_world_size(), **fingerprints}))
