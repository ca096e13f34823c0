"""save_student never deletes what optical_hf did not write, and recovers from saves killed at any instant."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import sentence_transformer
from sentence_transformers import SentenceTransformer

from optical_hf import save_student
from optical_hf.export import STUDENT_MARKER, prepare_output_dir


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder``."""
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def model(model_dirs):
    return sentence_transformer(model_dirs["student"])


@pytest.fixture
def user_project(tmp_path) -> Path:
    """A folder of the user's own files."""
    project = tmp_path / "myproject"
    (project / "notes").mkdir(parents=True)
    (project / "train.tsv").write_text("source\ttarget\nkitacwa\tcat\n", encoding="utf-8")
    (project / "notes" / "todo.txt").write_text("try lora\n", encoding="utf-8")
    (project / "README.md").write_text("# my project\n", encoding="utf-8")
    return project


def test_a_folder_of_user_files_is_refused_and_left_untouched(model, user_project):
    (user_project / "checkpoint-4").mkdir()  # the Trainer's outputs do not make the folder acceptable
    before = _snapshot(user_project)
    with pytest.raises(ValueError, match=f"output_dir {user_project} holds files optical_hf did not write"):
        save_student(model, user_project)
    assert _snapshot(user_project) == before
    assert sorted(path.name for path in user_project.parent.iterdir()) == [user_project.name]  # no staging left


def test_a_file_as_output_dir_is_refused(model, tmp_path):
    file = tmp_path / "student.txt"
    file.write_text("not a folder", encoding="utf-8")
    for output_dir in (file, file / "student"):
        with pytest.raises(ValueError, match=f"{file} is a file, not a folder"):
            save_student(model, output_dir)
    assert file.read_text(encoding="utf-8") == "not a folder"


def test_a_folder_of_trainer_outputs_is_accepted_and_they_are_kept(model, tmp_path):
    output_dir = tmp_path / "student"
    (output_dir / "checkpoint-3").mkdir(parents=True)
    (output_dir / "checkpoint-3" / "optimizer.pt").write_bytes(b"resumable state")
    (output_dir / "runs").mkdir()
    (output_dir / "runs" / "events.out.tfevents.1").write_bytes(b"tensorboard")
    trainer_outputs = _snapshot(output_dir)
    save_student(model, output_dir)
    after = _snapshot(output_dir)
    assert {name: after.get(name) for name in trainer_outputs} == trainer_outputs
    assert (output_dir / "modules.json").is_file()


def test_a_re_save_replaces_its_own_files_and_keeps_the_users(model, tmp_path):
    output_dir = save_student(model, tmp_path / "student")
    assert (output_dir / STUDENT_MARKER).is_file() and (output_dir / "optical_hf.json").is_file()
    assert "model.safetensors" in json.loads((output_dir / STUDENT_MARKER).read_text(encoding="utf-8"))["files"]
    (output_dir / "notes.txt").write_text("mine", encoding="utf-8")
    (output_dir / "1_Pooling" / "why.md").write_text("pooling notes", encoding="utf-8")
    (output_dir / "model.safetensors").write_bytes(b"overwritten by the save")  # optical_hf's file: replaced
    save_student(model, output_dir)
    assert (output_dir / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (output_dir / "1_Pooling" / "why.md").read_text(encoding="utf-8") == "pooling notes"
    SentenceTransformer(str(output_dir), device="cpu")  # the new weights
    save_student(model, output_dir)  # the carried files are still the user's at the next save
    assert (output_dir / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["student"]


def test_a_student_of_an_earlier_version_keeps_the_users_files_but_not_its_adapter(model, tmp_path):
    output_dir = save_student(model, tmp_path / "student")
    (output_dir / STUDENT_MARKER).write_text("", encoding="utf-8")  # earlier versions wrote an empty marker
    (output_dir / "adapter").mkdir()
    (output_dir / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    (output_dir / "notes.txt").write_text("mine", encoding="utf-8")
    save_student(model, output_dir)
    assert (output_dir / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert not (output_dir / "adapter").exists()


def test_the_folder_permissions_follow_the_umask(model, tmp_path):
    umask = os.umask(0o022)
    try:
        output_dir = save_student(model, tmp_path / "student")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(output_dir.stat().st_mode) == 0o755
    modes = {path.relative_to(output_dir).as_posix(): stat.S_IMODE(path.stat().st_mode)
             for path in output_dir.rglob("*")}
    assert modes["model.safetensors"] == 0o644
    assert {mode for path, mode in modes.items() if (output_dir / path).is_file()} == {0o644}
    assert {mode for path, mode in modes.items() if (output_dir / path).is_dir()} == {0o755}


def _killed_between_renames(model, output_dir: Path) -> Path:
    """A previous student (with a checkpoint) renamed away: what a save killed between its two renames leaves."""
    save_student(model, output_dir)
    (output_dir / "checkpoint-4").mkdir()
    (output_dir / "checkpoint-4" / "optimizer.pt").write_bytes(b"resumable state")
    old = output_dir.with_name(f".{output_dir.name}.old-99999")
    output_dir.rename(old)
    return old


def test_a_save_killed_between_the_renames_is_undone_at_the_next_start(model, tmp_path):
    output_dir = tmp_path / "student"
    old = _killed_between_renames(model, output_dir)
    before = _snapshot(old)
    prepare_output_dir(output_dir)  # what `optical-hf distill` runs before training
    assert not old.exists()
    assert _snapshot(output_dir) == before


def test_a_save_killed_between_the_renames_is_finished_by_the_next_save(model, tmp_path):
    output_dir = tmp_path / "student"
    _killed_between_renames(model, output_dir)
    (output_dir / "checkpoint-8").mkdir(parents=True)  # the next run trained into a fresh output_dir
    save_student(model, output_dir)
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert (output_dir / "checkpoint-4" / "optimizer.pt").read_bytes() == b"resumable state"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["student"]


def test_stale_staging_folders_of_killed_saves_are_removed(model, tmp_path):
    output_dir = tmp_path / "student"
    partial = tmp_path / f".{output_dir.name}.partial-99999-abcd"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half-written weights")
    unrelated = tmp_path / ".other.partial-1"
    unrelated.mkdir()
    save_student(model, output_dir)
    assert sorted(path.name for path in tmp_path.iterdir()) == [".other.partial-1", "student"]


def test_save_student_stores_the_card_prompts_for_encode_query(model_dirs, tmp_path):
    from optical_hf.model_card import StudentCardInfo

    student = sentence_transformer(model_dirs["student"])
    student.prompts["document"] = "own document: "
    save_student(student, tmp_path / "out", card=StudentCardInfo(query_prompt="query: "))
    reloaded = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert reloaded.prompts == {"query": "query: ", "document": "own document: "}  # None keeps the model's own
    texts = ["kiehtaw kisnurwa"]
    torch.testing.assert_close(reloaded.encode_query(texts, convert_to_tensor=True),
                               student.encode(texts, prompt="query: ", convert_to_tensor=True))
    save_student(student, tmp_path / "out", card=StudentCardInfo(query_prompt="", document_prompt="passage: "))
    assert SentenceTransformer(str(tmp_path / "out"), device="cpu").prompts == {"query": "", "document": "passage: "}


def test_a_student_without_a_transformer_first_is_one_input_error():
    from peft import LoraConfig
    from sentence_transformers.sentence_transformer.modules import Normalize

    from optical_hf import OpticalInputError, add_lora

    with pytest.raises(OpticalInputError, match="add_lora: the student SentenceTransformer needs a Transformer as its "
                                                "first module, got Normalize"):
        add_lora(SentenceTransformer(modules=[Normalize()], device="cpu"), LoraConfig(target_modules=["query"]))
