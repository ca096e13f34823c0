"""Auxiliary tasks beside the OT distillation (optical_hf.auxiliary): multi-dataset training in the
sentence-transformers front end, each task's loss logged, and the --aux_pairs flag."""

from __future__ import annotations

import pytest
from conftest import sentence_transformer, toy_bitext
from sentence_transformers import SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from optical_hf import OTLossConfig, bitext_from_pairs
from optical_hf.cli import main
from optical_hf.errors import OpticalInputError
from optical_hf.model_card import StudentCardInfo
from optical_hf.recipe import build_trainer
from optical_hf.vocabulary import Prompts


def _english_pairs(n: int = 24):
    return bitext_from_pairs([(f"what is the {t}", f"the {t} is here") for _, t in toy_bitext(n, seed=5)])


def test_an_auxiliary_task_trains_beside_the_bitext_and_logs_its_loss(model_dirs, bitext, tmp_path):
    student, teacher = sentence_transformer(model_dirs["student"]), sentence_transformer(model_dirs["teacher"])
    args = SentenceTransformerTrainingArguments(str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=8,
                                                logging_steps=6, report_to=[], save_strategy="no", seed=0)
    trainer = build_trainer(student, teacher, bitext, args, OTLossConfig(), Prompts(),
                            auxiliary={"english": (_english_pairs(), MultipleNegativesRankingLoss(student))})
    assert sorted(trainer.train_dataset) == ["bitext", "english"]
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all("english_loss" in log and log["english_loss"] > 0 for log in logs)
    assert all("contrastive" in log for log in logs)  # the OT loss's components, as before
    with pytest.raises(OpticalInputError, match="'bitext' is already a bitext dataset name"):
        build_trainer(student, teacher, bitext, args, OTLossConfig(), Prompts(),
                      auxiliary={"bitext": (_english_pairs(), MultipleNegativesRankingLoss(student))})


def test_distill_takes_aux_pairs(model_dirs, tmp_path, capsys):
    bitext, aux = tmp_path / "pairs.tsv", tmp_path / "qa.tsv"
    bitext.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in toy_bitext(40, seed=3)), encoding="utf-8")
    pairs = _english_pairs()
    aux.write_text("source\ttarget\n" + "".join(f"{q}\t{p}\n" for q, p in zip(pairs["source"], pairs["target"])),
                   encoding="utf-8")
    argv = ["distill", "--teacher", str(model_dirs["teacher"]), "--student", str(model_dirs["student"]), "--bitext",
            str(bitext), "--eval_size", "8", "--max_steps", "4", "--per_device_train_batch_size", "8",
            "--disable_tqdm", "true", "--aux_pairs", str(aux)]
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 0
    assert StudentCardInfo.load(tmp_path / "out").training["aux_pairs"] == "qa.tsv"
    assert main([*argv, "--output_dir", str(tmp_path / "other"), "--front_end", "trainer"]) == 2
    assert "--aux_pairs needs --front_end sentence-transformers" in capsys.readouterr().err
