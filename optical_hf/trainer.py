"""``OTDistillationTrainer``: OPTICAL distillation for plain ``AutoModel`` students with ``transformers.Trainer``.

Modelled on TRL's distillation trainers: the teacher lives beside the student (prepared by the Accelerator for
device placement and mixed precision, never wrapped in DDP, never given to the optimizer), the options are one
``TrainingArguments`` subclass (:class:`optical_hf.OTDistillationConfig`, like TRL's ``GKDConfig``) and only
``compute_loss`` changes. The objective is :func:`optical_hf.losses.distillation_losses`, shared with the
sentence-transformers front end (:class:`optical_hf.OTDistillationLoss`); batches come from
:class:`optical_hf.collation.BitextCollator`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftConfig, get_peft_model
from sentence_transformers import SentenceTransformer
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from .callbacks import NonFiniteLossCallback
from .collation import BitextCollator, pooling_setup, pooling_weights, prompt_length
from .config import OTDistillationConfig
from .export import has_adapters, merged_copy, save_student, sentence_transformer_from
from .losses import distillation_losses
from .teacher_cache import distinct_texts, load_or_encode, teacher_fingerprint

__all__ = ["OTDistillationTrainer"]

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _side(inputs: dict[str, Any], side: str) -> dict[str, Any]:
    """One side (``"source"`` or ``"target"``) of a :class:`BitextCollator` batch, without the ``{side}_`` prefix."""
    prefix = f"{side}_"
    return {key[len(prefix):]: value for key, value in inputs.items() if key.startswith(prefix)}


def _pick(features: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: features[key] for key in keys if key in features}


def _as_config(args: TrainingArguments | None) -> OTDistillationConfig:
    """``args`` as an :class:`OTDistillationConfig`: plain ``TrainingArguments`` get the default OT options."""
    if args is None:
        return OTDistillationConfig(output_dir="optical-student")
    if isinstance(args, OTDistillationConfig):
        return args
    return OTDistillationConfig.from_training_arguments(args)


class OTDistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that distills a frozen teacher into an ``AutoModel`` student with OPTICAL.

    Args:
        model: the student, an ``AutoModel`` (e.g. ``xlm-roberta-base``) or a model id/path.
        teacher: the frozen English teacher: ``AutoModel``, ``SentenceTransformer``, or a model id/path
            (loaded as a SentenceTransformer). Token embeddings must have the student's size.
        args: an :class:`optical_hf.OTDistillationConfig`: the ``TrainingArguments``, the objective's
            :class:`optical_hf.OTLossConfig` fields, and this trainer's options (``max_length``, ``source_prompt``,
            ``target_prompt``, ``source_column``, ``target_column``, ``pooling``, ``cache_teacher``,
            ``teacher_cache_dir``). Plain ``TrainingArguments`` are accepted and get the defaults of the others.
            ``remove_unused_columns`` is forced to False (the collator needs the text columns).
        train_dataset / eval_dataset: bitext ``datasets.Dataset`` with ``args.source_column`` / ``args.target_column``.
        processing_class: the student's tokenizer (default: ``AutoTokenizer`` of ``model``).
        teacher_processing_class: the teacher's tokenizer (default: the teacher SentenceTransformer's, or
            ``AutoTokenizer`` of the teacher's ``name_or_path``).
        peft_config: optional peft config (e.g. ``LoraConfig``) to train adapters only.
        data_collator: default :class:`optical_hf.collation.BitextCollator` (a replacement must produce its keys).

    Sentence embeddings (``sentence_weight``, ``contrastive_weight``) are each model's own: the student's is
    ``args.pooling`` of its token states, a SentenceTransformer teacher's is its ``sentence_embedding`` (its own
    pooling and normalisation), an ``AutoModel`` teacher's is ``args.pooling`` too. With ``marginals="pooling"`` the
    OT weights of each side are those of the same pooling.

    With ``args.cache_teacher`` (default), the teacher runs once over the English side of ``train_dataset`` and
    ``eval_dataset`` before training and its token states (and sentence embeddings) are read from that cache at each
    step (fp16 on disk, see :mod:`optical_hf.teacher_cache`); this needs ``datasets.Dataset`` train/eval sets and the
    default collator, else the teacher runs online.

    Training stops with :class:`optical_hf.NonFiniteLossError` at the first step whose loss or gradients are NaN or
    infinite (:class:`optical_hf.callbacks.NonFiniteLossCallback`, installed by default), before the optimizer step.

    Example::

        from transformers import AutoModel
        from optical_hf import OTDistillationConfig, OTDistillationTrainer, load_bitext

        trainer = OTDistillationTrainer(
            model=AutoModel.from_pretrained("xlm-roberta-base"),
            teacher="sentence-transformers/all-mpnet-base-v2",
            args=OTDistillationConfig("optical-xlmr-sw", max_steps=1000, reg=0.1, sentence_weight=1.0),
            train_dataset=load_bitext("train.sw", "train.en"),
        )
        trainer.train()
        trainer.save_model()  # loads with AutoModel.from_pretrained and SentenceTransformer
    """

    # compute_loss returns a per-batch mean: let the Trainer divide by the gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PreTrainedModel | str,
        teacher: PreTrainedModel | SentenceTransformer | str,
        args: OTDistillationConfig | TrainingArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
        peft_config: PeftConfig | None = None,
        data_collator: Any = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(model, str):
            model = AutoModel.from_pretrained(model)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.name_or_path)
        if isinstance(teacher, str):
            teacher = SentenceTransformer(teacher, device="cpu")
        if teacher_processing_class is None:
            teacher_processing_class = (
                teacher.tokenizer if isinstance(teacher, SentenceTransformer)
                else AutoTokenizer.from_pretrained(teacher.name_or_path)
            )
        if peft_config is not None:
            model = get_peft_model(model, peft_config)
        args = _as_config(args)
        args.remove_unused_columns = False
        self.loss_config = args.loss_config
        self.teacher_is_sentence_transformer = isinstance(teacher, SentenceTransformer)
        self._pooling = {"source": (args.pooling, True), "target": (args.pooling, True)}
        if self.teacher_is_sentence_transformer and self.loss_config.marginals == "pooling":
            self._pooling["target"] = pooling_setup(teacher, "teacher")
        if data_collator is None:
            data_collator = BitextCollator(
                processing_class, teacher_processing_class, args.source_column, args.target_column, args.max_length,
                args.source_prompt, args.target_prompt, self.loss_config.exclude_special_tokens,
                self.loss_config.exclude_prompt,
            )
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, data_collator=data_collator, **kwargs,
        )
        self.add_callback(NonFiniteLossCallback)
        teacher.requires_grad_(False)
        teacher.eval()
        self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self._components: dict[str, dict[str, list[Tensor]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        if args.cache_teacher:
            self._cache_teacher_outputs()

    def _cache_teacher_outputs(self) -> None:
        """Encode the English side of the train and eval sets once (main process first) for the collator to look up."""
        evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        sets = [d for d in (self.train_dataset, *evals) if d is not None]
        if not (isinstance(self.data_collator, BitextCollator) and sets and all(isinstance(d, Dataset) for d in sets)):
            logger.info("Teacher outputs not cached (needs datasets.Dataset train/eval sets and the default "
                        "BitextCollator): the teacher runs at every step")
            return
        collator = self.data_collator
        tokenizer, column, prompt = collator.sides["target"]
        texts = distinct_texts(text for dataset in sets for text in dataset[column])
        fingerprint = teacher_fingerprint(
            self.accelerator.unwrap_model(self.teacher), tokenizer, texts, front_end="trainer", prompt=prompt or None,
            max_length=collator.max_length, prompt_length=prompt_length(tokenizer, prompt, collator.max_length),
            sentence_embedding=self.teacher_is_sentence_transformer,
        )
        with self.args.main_process_first(desc="teacher cache"):
            collator.teacher_cache = load_or_encode(
                texts, self._encode_teacher, prompt or None, collator.max_length, fingerprint,
                self.args.teacher_cache_dir,
            )

    def _encode_teacher(self, texts: list[str]) -> dict[str, Any]:
        """The teacher on English ``texts`` tokenized as in training: the features plus :meth:`_teacher_forward`."""
        features = self.data_collator.tokenize("target", texts)
        return {**features, **self._teacher_forward(features)}

    def _teacher_forward(self, features: dict[str, Any]) -> dict[str, Tensor]:
        """``token_embeddings`` ``(batch, m, dim)`` of the teacher and, for a SentenceTransformer, its own
        ``sentence_embedding`` ``(batch, dim)``."""
        device = self.accelerator.device
        features = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in features.items()}
        with torch.no_grad():
            if self.teacher_is_sentence_transformer:
                out = self.teacher(_pick(features, (*MODEL_INPUTS, "prompt_length")))
                return {"token_embeddings": out["token_embeddings"], "sentence_embedding": out["sentence_embedding"]}
            return {"token_embeddings": self.teacher(**_pick(features, MODEL_INPUTS)).last_hidden_state}

    def _teacher_outputs(self, target: dict[str, Any]) -> dict[str, Tensor]:
        """The teacher's outputs on the English side: looked up by the collator when cached, else a teacher forward."""
        if "token_embeddings" in target:
            return {key: target[key].float() for key in ("token_embeddings", "sentence_embedding") if key in target}
        return self._teacher_forward(target)

    def _pool(self, tokens: Tensor, features: dict[str, Any], side: str) -> Tensor:
        """``(batch, dim)``: ``(batch, n, dim)`` token states averaged with the side's pooling weights."""
        return torch.einsum("bn,bnd->bd", self._pooling_weights(features, side).to(tokens.dtype), tokens)

    def _pooling_weights(self, features: dict[str, Any], side: str) -> Tensor:
        mode, include_prompt = self._pooling[side]
        return pooling_weights(features["attention_mask"], mode, features.get("prompt_length"), include_prompt)

    def _marginal(self, features: dict[str, Any], side: str) -> Tensor:
        """``(batch, n)`` OT weights of one side: its pooling weights or the collator's content mask."""
        if self.loss_config.marginals == "pooling":
            return self._pooling_weights(features, side)
        return features["content_mask"]

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor | tuple[Tensor, dict]:
        source, target = _side(inputs, "source"), _side(inputs, "target")
        student_tokens = model(**_pick(source, MODEL_INPUTS)).last_hidden_state
        teacher = self._teacher_outputs(target)
        teacher_tokens, teacher_sentence = teacher["token_embeddings"], teacher.get("sentence_embedding")
        if teacher_sentence is None:
            teacher_sentence = self._pool(teacher_tokens, target, "target")
        losses = distillation_losses(
            student_tokens, self._marginal(source, "source"), teacher_tokens, self._marginal(target, "target"),
            self.loss_config, self._pool(student_tokens, source, "source"), teacher_sentence,
        )
        mode = "train" if model.training else "eval"
        for name, value in losses.items():
            self._components[mode][name].append(value.detach())
        loss = torch.stack(list(losses.values())).sum()
        return (loss, {}) if return_outputs else loss

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Tensor], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[Tensor, None, None]:
        """Evaluation computes the distillation loss only (reported as ``eval_loss``)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each loss component since the last log (``ot``, ``sentence``, ``contrastive``; rank-local)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._components[mode].items():
            if values:
                logs[f"{prefix}{name}"] = torch.stack(values).mean().item()
        self._components[mode].clear()
        super().log(logs, start_time)

    def student_as_sentence_transformer(self) -> SentenceTransformer:
        """The current student (adapters merged) as a SentenceTransformer with this trainer's pooling."""
        model = self.accelerator.unwrap_model(self.model)
        base = merged_copy(model) if has_adapters(model) else model
        return sentence_transformer_from(base, self.processing_class, self.args.pooling, self.args.max_length)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints keep the Trainer's format (resumable); a final save writes a complete student folder.

        The final folder loads with ``AutoModel.from_pretrained`` and ``SentenceTransformer``; LoRA adapters are
        merged into it and kept unmerged under ``adapter/``. It is written atomically (see
        :func:`optical_hf.export.save_student`).
        """
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        output_dir = Path(output_dir or self.args.output_dir)
        if self.args.should_save:
            save_student(
                self.student_as_sentence_transformer(), output_dir, adapter_model=self.accelerator.unwrap_model(self.model)
            )
        self.accelerator.wait_for_everyone()
