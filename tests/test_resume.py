"""Resuming an interrupted distillation reproduces the uninterrupted run; saving a student never corrupts its folder.

Both front ends (``OTDistillationTrainer`` and ``SentenceTransformerTrainer`` + ``OTDistillationLoss``) train tiny
random models with dropout on, shuffled data, AdamW and a warmup + linear-decay schedule, so the final weights only
match when the model, optimizer, scheduler, RNG state and data order are all restored from the checkpoint.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from conftest import sentence_transformer, tiny_bert, toy_bitext
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from transformers import AutoModel, AutoTokenizer, TrainerCallback, TrainingArguments

import optical_hf.export
from optical_hf import OTDistillationDataCollator, OTDistillationLoss, OTDistillationTrainer, bitext_from_pairs
from optical_hf.cli import main
from optical_hf.export import QUERY_SUBFOLDER, save_student
from optical_hf.model_card import StudentCardInfo
from optical_hf.recipe import last_complete_checkpoint

STEPS, SAVE_EVERY, STOP_AT = 12, 4, 8  # 40 pairs / batch 8 = 5 steps per epoch: step 8 is in the middle of epoch 2
ATOL = 1e-5


class StopAt(TrainerCallback):
    """Interrupt training after ``step`` (the checkpoint of that step, if one is due, is still written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control



@pytest.fixture(scope="module")
def pairs():
    return bitext_from_pairs(toy_bitext(40, seed=5))


def _args(kind: str, output_dir: Path):
    arguments_class = SentenceTransformerTrainingArguments if kind == "sentence-transformers" else TrainingArguments
    return arguments_class(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=2e-3,
        lr_scheduler_type="linear", warmup_steps=3, weight_decay=0.01, optim="adamw_torch", save_strategy="steps",
        save_steps=SAVE_EVERY, seed=0, report_to=[], disable_tqdm=True, logging_steps=SAVE_EVERY,
        dataloader_pin_memory=False,
    )


def _trainer(kind: str, model_dirs, pairs, output_dir: Path, callbacks=()):
    """A fresh trainer whose models are loaded from disk (as a new process resuming a run would)."""
    if kind == "trainer":
        return OTDistillationTrainer(
            model=AutoModel.from_pretrained(model_dirs["student"]),
            teacher=AutoModel.from_pretrained(model_dirs["teacher"]),
            teacher_processing_class=AutoTokenizer.from_pretrained(model_dirs["teacher"]),
            args=_args(kind, output_dir), train_dataset=pairs, callbacks=list(callbacks),
        )
    student, teacher = sentence_transformer(model_dirs["student"]), sentence_transformer(model_dirs["teacher"])
    return SentenceTransformerTrainer(
        model=student, args=_args(kind, output_dir), train_dataset=pairs, loss=OTDistillationLoss(student, teacher),
        data_collator=OTDistillationDataCollator(student.preprocess, teacher_preprocess_fn=teacher.preprocess),
        callbacks=list(callbacks),
    )


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.parametrize("kind", ["trainer", "sentence-transformers"])
def test_resumed_run_reaches_the_uninterrupted_weights(kind, model_dirs, pairs, tmp_path):
    uninterrupted = _trainer(kind, model_dirs, pairs, tmp_path / "a")
    uninterrupted.train()
    assert uninterrupted.state.global_step == STEPS

    interrupted = _trainer(kind, model_dirs, pairs, tmp_path / "b", callbacks=[StopAt(STOP_AT)])
    interrupted.train()
    assert interrupted.state.global_step == STOP_AT
    checkpoint = tmp_path / "b" / f"checkpoint-{STOP_AT}"
    saved = {path.name for path in checkpoint.iterdir()}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= saved
    at_stop = _weights(interrupted)

    resumed = _trainer(kind, model_dirs, pairs, tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == STEPS
    final = _weights(resumed)
    assert _max_difference(final, _weights(uninterrupted)) <= ATOL
    assert _max_difference(final, at_stop) > 100 * ATOL  # the last steps really trained

    # The match is not a coincidence: resuming without the saved optimizer state or RNG state (dropout masks) ends
    # elsewhere.
    for missing in ("optimizer.pt", "rng_state.pth"):
        partial = tmp_path / f"without-{missing}"
        shutil.copytree(checkpoint, partial / checkpoint.name)
        (partial / checkpoint.name / missing).unlink()
        control = _trainer(kind, model_dirs, pairs, partial)
        control.train(resume_from_checkpoint=str(partial / checkpoint.name))
        assert _max_difference(_weights(control), final) > 10 * ATOL, missing


def _kill_while_saving(checkpoint: Path) -> None:
    """Leave ``checkpoint`` as a kill -9 while the Trainer writes it does: weights cut short, no trainer_state.json."""
    (checkpoint / "trainer_state.json").unlink()
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


@pytest.mark.parametrize("resume, interruption", [("latest", "killed-while-saving"), ("true", "killed-before-saving")])
def test_cli_resume_from_latest_checkpoint_reaches_the_uninterrupted_weights(resume, interruption, model_dirs, tmp_path,
                                                                             caplog):
    """``optical-hf distill --resume_from_checkpoint latest`` continues from the newest complete checkpoint in
    --output_dir, skipping one a crash left incomplete."""
    bitext = tmp_path / "pairs.tsv"
    bitext.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in toy_bitext(48, seed=5)), encoding="utf-8")
    out = tmp_path / "student"
    common = ["distill", "--teacher", str(model_dirs["teacher"]), "--bitext", str(bitext), "--eval_size", "8",
              "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--per_device_train_batch_size", "8",
              "--learning_rate", "2e-3", "--seed", "0", "--output_dir", str(out), "--disable_tqdm", "true"]
    assert main([*common, "--student", str(model_dirs["student"])]) == 0
    uninterrupted = load_file(out / QUERY_SUBFOLDER / "model.safetensors")  # the pair folder's student
    if interruption == "killed-while-saving":
        _kill_while_saving(out / "checkpoint-6")
    else:
        shutil.rmtree(out / "checkpoint-6")

    # A student initialised differently: only a real resume from checkpoint-3 can end on the same weights.
    other = tiny_bert(tmp_path / "other-init", AutoTokenizer.from_pretrained(model_dirs["student"]), seed=7)
    assert main([*common, "--student", str(other), "--resume_from_checkpoint", resume]) == 0
    skipped = [record.getMessage() for record in caplog.records if "incomplete checkpoint" in record.getMessage()]
    expected = (f"Skipping incomplete checkpoint(s) {out / 'checkpoint-6'} (interrupted while saving); resuming from "
                f"{out / 'checkpoint-3'}")
    assert skipped == ([expected] if interruption == "killed-while-saving" else [])
    resumed = load_file(out / QUERY_SUBFOLDER / "model.safetensors")
    assert _max_difference(resumed, uninterrupted) <= ATOL
    assert _max_difference(load_file(other / "model.safetensors"),
                           load_file(model_dirs["student"] / "model.safetensors")) > 1e-2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_latest_checkpoint_skips_a_truncated_trainer_state(tmp_path):
    for step in (3, 6, 9, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text('{"global_step": 1}', encoding="utf-8")
    (tmp_path / "checkpoint-9" / "trainer_state.json").write_text('{"global_st', encoding="utf-8")  # cut short
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    with pytest.raises(ValueError, match=f"no complete checkpoint-\\* folder in {tmp_path / 'empty'}"):
        last_complete_checkpoint(tmp_path / "empty")


# ---- atomic save -------------------------------------------------------------------------------------------------

CARD = StudentCardInfo(language="sw", teacher="sentence-transformers/all-MiniLM-L6-v2", train_pairs=40,
                       training_data="40 toy pairs")


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder``."""
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def previous(model_dirs, tmp_path):
    """A student model and an older complete student folder (with a resumable checkpoint) at its destination."""
    model = sentence_transformer(model_dirs["student"])
    destination = tmp_path / "runs" / "student"
    save_student(model, destination, card=CARD)
    (destination / "checkpoint-4").mkdir()
    (destination / "checkpoint-4" / "optimizer.pt").write_bytes(b"resumable optimizer state")
    with torch.no_grad():  # the model now holds newer weights than the folder
        for parameter in model.parameters():
            parameter.add_(0.5)
    return model, destination


def _crash_in_model_save(monkeypatch, model):
    def save(path, *args, **kwargs):
        (Path(path) / "config.json").write_text("{}", encoding="utf-8")
        (Path(path) / "model.safetensors").write_bytes(b"half-written weights")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save", save)


def _crash_in_model_card(monkeypatch, model):
    def write_model_card(folder, info, name=None):
        (Path(folder) / "README.md").write_text("---\nlanguage:", encoding="utf-8")
        raise KeyboardInterrupt  # e.g. Ctrl-C while the card is written

    monkeypatch.setattr(optical_hf.export, "write_model_card", write_model_card)


@pytest.mark.parametrize("crash", [_crash_in_model_save, _crash_in_model_card], ids=["model-save", "model-card"])
def test_crash_mid_save_leaves_the_previous_folder_intact(crash, previous, monkeypatch):
    model, destination = previous
    before = _snapshot(destination)
    crash(monkeypatch, model)
    with pytest.raises((OSError, KeyboardInterrupt)):
        save_student(model, destination, card=CARD)
    assert _snapshot(destination) == before
    assert [path.name for path in destination.parent.iterdir()] == [destination.name]  # no partial / old folder left
    reloaded = SentenceTransformer(str(destination), device="cpu")
    assert _max_difference(reloaded.state_dict(), model.state_dict()) > 0.4  # still the old weights


def test_save_over_an_existing_folder_replaces_it_and_keeps_checkpoints_and_user_files(previous):
    model, destination = previous
    checkpoint_before = _snapshot(destination / "checkpoint-4")
    (destination / "notes.txt").write_text("the user's own file", encoding="utf-8")
    save_student(model, destination, card=CARD)
    assert _snapshot(destination / "checkpoint-4") == checkpoint_before
    assert (destination / "notes.txt").read_text(encoding="utf-8") == "the user's own file"
    assert {"README.md", "optical_hf.json", "modules.json"} <= {path.name for path in destination.iterdir()}
    assert [path.name for path in destination.parent.iterdir()] == [destination.name]
    reloaded = SentenceTransformer(str(destination), device="cpu")
    assert _max_difference(reloaded.state_dict(), model.state_dict()) <= ATOL
