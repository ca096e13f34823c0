"""Writing a trained student as one complete, loadable folder.

The folder loads with ``SentenceTransformer(path)`` and ``AutoModel.from_pretrained(path)``: LoRA adapters are
merged into the weights (and also kept, unmerged, under ``adapter/``). The folder is staged next to its destination
and swapped in with renames, so an interrupted save leaves either the previous folder or the new one, never a
half-written one.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from sentence_transformers import SentenceTransformer
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .model_card import StudentCardInfo, write_model_card

__all__ = ["has_adapters", "merged_copy", "save_student", "sentence_transformer_from"]

ADAPTER_DIR = "adapter"


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds LoRA/peft adapter layers (peft-wrapped or injected by ``add_adapter``)."""
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its adapters merged into the base weights and the adapter layers removed.

    Handles both a :class:`peft.PeftModel` and adapters injected with ``model.add_adapter(LoraConfig(...))``
    (transformers' and sentence-transformers' integration, which has no merge of its own).
    """
    model = copy.deepcopy(model)
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    for module in model.modules():
        if getattr(module, "_hf_peft_config_loaded", False):
            module._hf_peft_config_loaded = False
            del module.peft_config
    return model


def _save_adapter(model: nn.Module, folder: Path) -> None:
    """Save the (unmerged) adapter of ``model`` with peft's own format under ``folder``."""
    for module in model.modules():
        if isinstance(module, PeftModel) or getattr(module, "_hf_peft_config_loaded", False):
            module.save_pretrained(folder)
            return


def sentence_transformer_from(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pooling: str = "mean", max_seq_length: int | None = None
) -> SentenceTransformer:
    """Wrap a plain ``AutoModel`` student (adapters merged) and its tokenizer as a SentenceTransformer.

    Saves both into a temporary folder and builds ``Transformer`` + ``Pooling`` modules from it, so the result
    has exactly the weights of ``model``.
    """
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        transformer = Transformer(tmp, max_seq_length=max_seq_length)
    pooling_module = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
    return SentenceTransformer(modules=[transformer, pooling_module], device=str(model.device))


def save_student(
    model: SentenceTransformer,
    output_dir: str | os.PathLike,
    adapter_model: nn.Module | None = None,
    card: StudentCardInfo | None = None,
) -> Path:
    """Write ``model`` (a SentenceTransformer student, possibly with adapters) to ``output_dir`` atomically.

    Adapters are merged into the saved weights and also saved unmerged under ``output_dir/adapter`` (taken from
    ``adapter_model`` when the adapters live outside ``model``, e.g. a Trainer's peft-wrapped student). With ``card``,
    the OPTICAL model card (README.md) and its ``optical_hf.json`` are written into the folder too. Existing
    ``checkpoint-*`` sub-folders of ``output_dir`` (a Trainer's resumable state) are carried over untouched.

    Returns:
        The folder written.
    """
    output_dir = Path(output_dir).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        adapter_model = adapter_model if adapter_model is not None else model
        (merged_copy(model) if has_adapters(model) else model).save(str(staging))
        if has_adapters(adapter_model):
            _save_adapter(adapter_model, staging / ADAPTER_DIR)
        if card is not None:
            write_model_card(staging, card)
        _swap_in(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def _swap_in(staging: Path, output_dir: Path) -> None:
    """Replace ``output_dir`` by ``staging`` with renames, then move the old folder's checkpoints across.

    At every instant the previous content survives in ``output_dir`` or in ``.NAME.old-PID`` beside it.
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
    for checkpoint in old.glob("checkpoint-*"):
        checkpoint.rename(output_dir / checkpoint.name)
    shutil.rmtree(old)
