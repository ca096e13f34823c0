"""Writing a trained student as one complete, loadable folder.

The folder loads with ``SentenceTransformer(path)`` and ``AutoModel.from_pretrained(path)``: LoRA adapters (added with
:func:`add_lora`) are merged into the weights and also kept, unmerged, under ``adapter/``. The folder is staged next to
its destination and swapped in with renames, so an interrupted save leaves the previous folder or the new one (a save
killed between the two renames is finished or undone by the next save or training run).

Saving never deletes what optical_hf did not write: the destination must be missing, empty, a previous student folder
(recognised by its ``.optical_hf_student`` marker or ``optical_hf.json``) or hold only what a Trainer writes there
during training (``checkpoint-*``, ``runs/``, ``eval/``). Any other folder is refused. The marker lists the files the
save wrote (its manifest); when a student folder is saved again, every other file in it (a Trainer's outputs, files a
user added) is carried over untouched into the new folder.
"""

from __future__ import annotations

import copy
import fnmatch
import glob
import json
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.router import Router
from sentence_transformers.base.modules.transformer import Transformer
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import OpticalInputError
from .fingerprint import model_fingerprint
from .model_card import CARD_INFO_NAME, StudentCardInfo, write_model_card

__all__ = [
    "QUERY_SUBFOLDER", "add_lora", "check_output_dir", "has_adapters", "merged_copy", "pair_model", "prepare_output_dir",
    "save_student",
    "sentence_transformer_from", "store_prompts", "transformer_module", "with_transformer_model",
]

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
# Marks a folder written by save_student; holds its manifest, {"files": [the relative paths the save wrote]}.
STUDENT_MARKER = ".optical_hf_student"
# What a Trainer writes into its output_dir during training: accepted in a destination and carried into the new folder.
TRAINER_OUTPUTS = ("checkpoint-*", "runs", "eval")


def add_lora(student: SentenceTransformer, config: PeftConfig) -> PeftModel:
    """Train only LoRA (or other peft) adapters of ``student``: wrap its transformer with ``peft.get_peft_model``.

    The wrapped model replaces ``student[0].auto_model``; :func:`save_student` merges the adapters into the saved
    weights and keeps them under ``adapter/``. Trainer checkpoints hold the adapter only, and resuming from one works
    (sentence-transformers reloads it with the adapters injected into the bare model; a load hook maps that layout).

    Returns:
        The ``PeftModel`` now inside ``student``.
    """
    transformer = transformer_module(student, "add_lora")
    peft_model = get_peft_model(transformer.auto_model, config)
    peft_model.register_load_state_dict_pre_hook(_from_injected_layout)
    transformer.model = peft_model
    return peft_model


def transformer_module(model: SentenceTransformer, who: str) -> Transformer:
    """The first module of ``model``, which must be a ``Transformer`` (the weights optical_hf trains and saves);
    otherwise an :class:`OpticalInputError` naming ``who`` needs it."""
    transformer = model[0]
    if not isinstance(transformer, Transformer):
        raise OpticalInputError(
            f"{who}: the student SentenceTransformer needs a Transformer as its first module, got "
            f"{type(transformer).__name__}"
        )
    return transformer


def _from_injected_layout(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Load-state-dict pre-hook of a ``PeftModel``: move keys of the same adapters injected into the bare model
    (``{prefix}encoder...lora_A.default.weight``) under ``{prefix}base_model.model.``."""
    for key in [key for key in state_dict if key.startswith(prefix) and not key.startswith(f"{prefix}base_model.")]:
        state_dict[f"{prefix}base_model.model.{key[len(prefix):]}"] = state_dict.pop(key)


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds LoRA/peft adapter layers."""
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _peft_models(model: nn.Module) -> list[tuple[str, PeftModel]]:
    """The ``(name, PeftModel)`` sub-modules of ``model``; adapters outside a ``PeftModel`` are an error."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, PeftModel)]
    if not found:
        raise ValueError(
            "the model holds adapters that peft.get_peft_model did not add (e.g. added with add_adapter): add LoRA "
            "with optical_hf.add_lora(student, LoraConfig(...)) so they can be merged and saved"
        )
    return found


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its adapters merged into the base weights and the adapter layers removed.

    Handles a :class:`peft.PeftModel` and a model holding one (a SentenceTransformer after :func:`add_lora`).
    """
    model = copy.deepcopy(model)
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    for name, peft_model in _peft_models(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, peft_model.merge_and_unload())
    return model


def _save_adapter(model: nn.Module, folder: Path) -> None:
    """Save the (unmerged) adapter of ``model`` with peft's own format under ``folder``."""
    peft_model = model if isinstance(model, PeftModel) else _peft_models(model)[0][1]
    peft_model.save_pretrained(folder)


def sentence_transformer_from(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pooling: str = "mean", max_seq_length: int | None = None
) -> SentenceTransformer:
    """Wrap a plain ``AutoModel`` student (adapters merged) and its tokenizer as a SentenceTransformer.

    Saves both into a temporary folder and builds ``Transformer`` + ``Pooling`` modules from it, so the result
    has exactly the weights of ``model``. Works on every rank of a distributed run (``save_pretrained`` writes the
    weights on rank 0 only, so the config and weights are written directly).
    """
    from safetensors.torch import save_model
    from sentence_transformers.sentence_transformer.modules import Pooling

    with tempfile.TemporaryDirectory() as tmp:
        model.config.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        transformer = Transformer(tmp, max_seq_length=max_seq_length)
    pooling_module = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
    return SentenceTransformer(modules=[transformer, pooling_module], device=str(model.device))


def with_transformer_model(pipeline: SentenceTransformer, model: PreTrainedModel) -> SentenceTransformer:
    """A copy of ``pipeline`` (its modules, ``max_seq_length``, prompts, similarity function) whose first
    ``Transformer`` module holds ``model`` (not copied) instead of its own weights (not copied either).

    How a student given as a SentenceTransformer (e.g. ``Pooling(cls)`` + ``Normalize``) keeps its pipeline after a
    trainer trained its ``auto_model``.
    """
    transformer = transformer_module(pipeline, "with_transformer_model")
    return copy.deepcopy(pipeline, memo={id(transformer.model): model})


def store_prompts(model: SentenceTransformer, card: StudentCardInfo) -> None:
    """Make the card's prompts the model's ``prompts["query"]`` / ``prompts["document"]`` (saved in
    ``config_sentence_transformers.json``), so that ``encode_query`` / ``encode_document`` apply them after reloading.

    ``card.query_prompt`` is the student's query prompt; ``card.document_prompt`` the teacher's document prompt,
    recorded for the query-student / document-teacher pairing. ``None`` keeps the model's own prompt; ``""`` clears it.
    """
    for name, prompt in (("query", card.query_prompt), ("document", card.document_prompt)):
        if prompt is not None:
            model.prompts[name] = prompt


QUERY_SUBFOLDER = "query_0_Transformer"
"""Where a pair folder keeps the student's transformer: ``AutoModel.from_pretrained(folder, subfolder=...)``."""


def pair_model(student: SentenceTransformer, teacher: SentenceTransformer, card: StudentCardInfo) -> SentenceTransformer:
    """One SentenceTransformer holding the retriever: ``encode_query`` runs ``student`` with the card's query prompt,
    ``encode_document`` runs ``teacher`` with its document prompt (sentence-transformers'
    ``Router.for_query_document``; the modules are shared with the two models, not copied)."""
    router = Router.for_query_document(query_modules=list(student.children()), document_modules=list(teacher.children()))
    prompts = {"query": card.query_prompt or "", "document": card.document_prompt or ""}
    return SentenceTransformer(modules=[router], device=str(student.device), prompts=prompts)


def save_student(
    model: SentenceTransformer,
    output_dir: str | os.PathLike,
    adapter_model: nn.Module | None = None,
    card: StudentCardInfo | None = None,
    teacher: str | None = None,
    teacher_model: SentenceTransformer | None = None,
) -> Path:
    """Write ``model`` (a SentenceTransformer student, possibly with adapters) to ``output_dir`` atomically; with
    ``teacher_model``, the whole retriever (:func:`pair_model`: ``encode_query`` the student, ``encode_document`` the
    teacher; the student's transformer in :data:`QUERY_SUBFOLDER`), recorded as ``export="pair"`` in the card.

    Adapters are merged into the saved weights and also saved unmerged under ``output_dir/adapter`` (taken from
    ``adapter_model`` when the adapters live outside ``model``, e.g. a Trainer's peft-wrapped student). The OPTICAL
    model card (README.md, see :mod:`optical_hf.model_card`) and its ``optical_hf.json`` are always written, so the
    folder can be pushed with :func:`optical_hf.hub.push_student`: from ``card``, or without it from what is known
    (the base model sentence-transformers recorded when it loaded ``model`` from the Hub, and ``teacher``, the Hub id
    of the English teacher, when given). Every student folder holds the marker file ``.optical_hf_student`` with the
    manifest of the files the save wrote.

    ``output_dir`` may be missing, empty, a previous student folder or a folder holding only a Trainer's outputs
    (``checkpoint-*``, ``runs/``, ``eval/``). The files of a previous save (listed in its marker's manifest) are
    replaced; every other file there (Trainer outputs, a user's own files) is carried over untouched into the new
    folder. Any other folder raises :class:`~optical_hf.errors.OpticalInputError` and nothing is written: the
    student is never saved over files optical_hf did not write. Files and folders are created with the permissions
    the umask gives (``0o666`` / ``0o777`` masked). One save per folder at a time.

    Returns:
        The folder written.
    """
    output_dir = Path(output_dir).expanduser().resolve()
    prepare_output_dir(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()  # unlike tempfile.mkdtemp (0700), mkdir applies the umask
    card = card or StudentCardInfo(teacher=teacher, base_model=model.model_card_data.base_model)
    card.export = "pair" if teacher_model is not None else "student"
    if teacher_model is not None:  # the card names the teacher it was saved with, and its weights' fingerprint
        card.teacher = card.teacher or teacher_model.model_card_data.base_model or _local_name(teacher_model)
        card.teacher_fingerprint = model_fingerprint(teacher_model)
    store_prompts(model, card)
    try:
        adapter_model = adapter_model if adapter_model is not None else model
        student = merged_copy(model) if has_adapters(model) else model
        saved = pair_model(student, teacher_model, card) if teacher_model is not None else student
        saved.save(str(staging), create_model_card=False)
        if has_adapters(adapter_model):
            _save_adapter(adapter_model, staging / ADAPTER_DIR)
        write_model_card(staging, card, name=output_dir.name)
        _finish_staging(staging)
        _swap_in(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def _local_name(model: SentenceTransformer) -> str | None:
    """The folder (or id) ``model``'s transformer was loaded from, when its first module is a ``Transformer``."""
    first = model[0]
    return (first.auto_model.name_or_path or None) if isinstance(first, Transformer) else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finish_staging(staging: Path) -> None:
    """Give everything in ``staging`` the umask's permissions (some writers create files ``0o600``, as
    ``tempfile.mkstemp`` does) and write the marker with the manifest of the files written."""
    mask = _umask()
    written = []
    for path in sorted(staging.rglob("*")):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
        if path.is_file():
            written.append(path.relative_to(staging).as_posix())
    marker = staging / STUDENT_MARKER
    marker.write_text(json.dumps({"files": written}, indent=1) + "\n", encoding="utf-8")
    marker.chmod(0o666 & ~mask)


def _manifest(folder: Path) -> set[str] | None:
    """The files a save wrote into ``folder`` (its marker's manifest); None for a folder without one (a student
    saved by an earlier version, whose marker is empty, or a folder with an OPTICAL card only)."""
    try:
        files = json.loads((folder / STUDENT_MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return set(files) | {STUDENT_MARKER}


def is_student_folder(folder: Path) -> bool:
    """Whether ``folder`` was written by :func:`save_student` (or carries an OPTICAL card)."""
    return (folder / STUDENT_MARKER).is_file() or (folder / CARD_INFO_NAME).is_file()


def _is_trainer_output(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in TRAINER_OUTPUTS)


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """Raise :class:`OpticalInputError` unless :func:`save_student` may write ``output_dir`` (see there); reads only."""
    output_dir = Path(output_dir).expanduser()
    existing = next(path for path in (output_dir, *output_dir.parents) if path.exists())
    if not existing.is_dir():
        raise OpticalInputError(
            f"output_dir {output_dir}: {existing} is a file, not a folder; choose a folder for the student"
        )
    if existing != output_dir or is_student_folder(output_dir):
        return
    foreign = sorted(path.name for path in output_dir.iterdir() if not _is_trainer_output(path.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OpticalInputError(
            f"output_dir {output_dir} holds files optical_hf did not write ({shown}) and saving the student would "
            f"replace them: choose a new or empty folder (e.g. {output_dir / 'student'})"
        )


def prepare_output_dir(output_dir: str | os.PathLike) -> None:
    """Finish or undo saves into ``output_dir`` that were killed, then :func:`check_output_dir`.

    Removes stale ``.NAME.partial-*`` staging folders. A ``.NAME.old-*`` folder (the previous student, renamed away
    just before the new one was renamed in) is renamed back when ``output_dir`` is missing; otherwise its Trainer
    outputs are carried into ``output_dir`` and it is deleted.
    """
    output_dir = Path(output_dir).expanduser().resolve()
    pattern = f".{glob.escape(output_dir.name)}"
    for partial in output_dir.parent.glob(f"{pattern}.partial-*"):
        logger.warning("Removing %s, left by an interrupted save", partial)
        shutil.rmtree(partial)
    for old in sorted(output_dir.parent.glob(f"{pattern}.old-*"), key=lambda path: path.stat().st_mtime, reverse=True):
        if output_dir.exists():
            logger.warning("Finishing an interrupted save: carrying the Trainer outputs of %s into %s", old, output_dir)
            _retire(old, output_dir)
        else:
            logger.warning("Restoring %s from %s, left by an interrupted save", output_dir, old)
            old.rename(output_dir)
    check_output_dir(output_dir)


def _swap_in(staging: Path, output_dir: Path) -> None:
    """Replace ``output_dir`` by ``staging`` with renames, then move the old folder's Trainer outputs across.

    At every instant the previous content survives in ``output_dir`` or in ``.NAME.old-PID`` beside it (which
    :func:`prepare_output_dir` recovers if the process is killed between the renames).
    """
    if not output_dir.exists():
        staging.rename(output_dir)
        return
    old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
    output_dir.rename(old)
    try:
        staging.rename(output_dir)
    except BaseException:
        old.rename(output_dir)
        raise
    _retire(old, output_dir)


def _retire(old: Path, output_dir: Path) -> None:
    """Carry what optical_hf did not write in the replaced folder ``old`` into ``output_dir``, then delete ``old``.

    Trainer outputs (``checkpoint-*``, ``runs/``, ``eval/``) move as whole folders, unless ``output_dir`` has its own.
    Any other file not in ``old``'s manifest (a user's file, at any depth) moves to the same relative path; if the
    new save wrote a file of that name, the user's file is kept beside it as ``NAME.user-PID`` with a warning. For a
    folder without a manifest, the files the new save wrote, ``adapter/`` and the card files count as optical_hf's.
    """
    ours = _manifest(old)
    if ours is None:
        ours = {path.relative_to(output_dir).as_posix() for path in output_dir.rglob("*")}
        ours |= {STUDENT_MARKER, CARD_INFO_NAME, "README.md"}
        ours |= {path.relative_to(old).as_posix() for path in (old / ADAPTER_DIR).rglob("*")}
    for entry in old.iterdir():
        if _is_trainer_output(entry.name):
            if not (output_dir / entry.name).exists():
                entry.rename(output_dir / entry.name)
            continue
        for path in [entry] if not entry.is_dir() or entry.is_symlink() else sorted(entry.rglob("*")):
            relative = path.relative_to(old).as_posix()
            if (path.is_dir() and not path.is_symlink()) or relative in ours:
                continue
            target = output_dir / relative
            if target.exists() or target.is_symlink():
                kept = target.with_name(f"{target.name}.user-{os.getpid()}")
                logger.warning("Keeping your file %s as %s: the new student has a file of that name", target, kept)
                target = kept
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
    shutil.rmtree(old)
