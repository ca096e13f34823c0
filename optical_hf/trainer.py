"""``OTDistillationTrainer``: OPTICAL distillation for plain ``AutoModel`` students with ``transformers.Trainer``.

Modelled on TRL's distillation trainers: the teacher lives beside the student (prepared as TRL prepares its
teacher/reference models: by the Accelerator for device placement and mixed precision, as a DeepSpeed engine under
DeepSpeed, an unsharded copy on each rank under FSDP; never wrapped in DDP, never given to the optimizer) and only
``compute_loss`` changes. The objective is :func:`optical_hf.losses.distillation_losses`, shared with the
sentence-transformers front end (:class:`optical_hf.losses.OTDistillationLoss`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftConfig, PeftModel, get_peft_model
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.evaluation import BaseEvaluator, SequentialEvaluator
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.trainer_utils import EvalLoopOutput

from .callbacks import NonFiniteLossCallback
from .export import has_adapters, merged_copy, save_student, sentence_transformer_from
from .hub import push_student
from .losses import OTLossConfig, content_mask, distillation_losses, pooling_weights, special_token_ids
from .model_card import StudentCardInfo, is_hub_repo_id
from .teacher_cache import TeacherCache, distinct_texts, load_or_encode, teacher_fingerprint

__all__ = ["BitextCollator", "OTDistillationTrainer", "mean_pool"]

logger = logging.getLogger(__name__)


def mean_pool(tokens: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``(batch, n, dim)`` token embeddings over real tokens: ``(batch, dim)``."""
    weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


def _prompt_length(tokenizer: PreTrainedTokenizerBase, prompt: str | None) -> int:
    """Leading positions a prompt takes, counting the leading special token (as sentence-transformers does)."""
    if not prompt:
        return 0
    return len(tokenizer(prompt.rstrip())["input_ids"]) - 1


class BitextCollator:
    """Tokenizes each side of a bitext batch with its own tokenizer.

    Args:
        student_tokenizer: tokenizer of the student (low-resource side, column ``source_column``).
        teacher_tokenizer: tokenizer of the teacher (English side, column ``target_column``).
        max_length: truncation length for both sides.
        source_prompt / target_prompt: optional prefixes (e.g. e5's ``"query: "``); excluded from the OT marginals.
        exclude_special_tokens: give special tokens (not ``[UNK]``) zero OT mass.
        teacher_cache: cached teacher outputs of the English texts (:class:`OTDistillationTrainer` builds it).

    Returns (``__call__``): ``{side}_input_ids``, ``{side}_attention_mask`` (and ``{side}_token_type_ids`` when the
    tokenizer makes them) ``(batch, n_side)``, plus ``{side}_content_mask`` ``(batch, n_side)`` bool, for
    ``side`` in ``("source", "target")``. With a ``teacher_cache`` holding every English text of the batch, the
    target side comes from the cache instead, with ``target_token_embeddings`` ``(batch, m, dim)`` fp16.
    """

    def __init__(
        self,
        student_tokenizer: PreTrainedTokenizerBase,
        teacher_tokenizer: PreTrainedTokenizerBase,
        source_column: str = "source",
        target_column: str = "target",
        max_length: int = 128,
        source_prompt: str | None = None,
        target_prompt: str | None = None,
        exclude_special_tokens: bool = True,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        self.sides = {
            "source": (student_tokenizer, source_column, source_prompt or ""),
            "target": (teacher_tokenizer, target_column, target_prompt or ""),
        }
        self.max_length = max_length
        self.exclude_special_tokens = exclude_special_tokens
        self.teacher_cache = teacher_cache

    def tokenize(self, side: str, texts: list[str]) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask`` (and ``token_type_ids``) ``(batch, n)`` of ``texts`` on ``side``."""
        tokenizer, _, prompt = self.sides[side]
        return dict(tokenizer(
            [prompt + text for text in texts], padding=True, truncation=True, max_length=self.max_length,
            return_tensors="pt",
        ))

    def _encode(self, side: str, texts: list[str]) -> dict[str, Tensor]:
        """The English side from the teacher cache when it holds every text of the batch, else tokenized."""
        if side == "target" and self.teacher_cache is not None:
            cached = self.teacher_cache.lookup(texts, self.sides[side][2], self.max_length)
            if cached is not None:
                return cached
        return self.tokenize(side, texts)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        for side, (tokenizer, column, prompt) in self.sides.items():
            if column not in rows[0]:
                raise KeyError(f"bitext rows have no column {column!r} (columns: {sorted(rows[0])})")
            encoded = self._encode(side, [row[column] for row in rows])
            special = special_token_ids(tokenizer) if self.exclude_special_tokens else []
            encoded["content_mask"] = content_mask(
                encoded["input_ids"], encoded["attention_mask"], special, _prompt_length(tokenizer, prompt)
            )
            batch.update({f"{side}_{key}": value for key, value in encoded.items()})
        return batch


def _model_inputs(inputs: dict[str, Tensor], side: str) -> dict[str, Tensor]:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {key: inputs[f"{side}_{key}"] for key in keys if f"{side}_{key}" in inputs}


class OTDistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that distills a frozen teacher into an ``AutoModel`` student with OPTICAL.

    Args:
        model: the student, an ``AutoModel`` (e.g. ``xlm-roberta-base``) or a model id/path.
        teacher: the frozen English teacher: ``AutoModel``, ``SentenceTransformer``, or a model id/path
            (loaded as a SentenceTransformer). Token embeddings must have the student's size.
        args: usual ``TrainingArguments``; ``remove_unused_columns`` is forced to False (the collator needs the
            text columns).
        train_dataset / eval_dataset: bitext ``datasets.Dataset`` with ``source_column`` / ``target_column``.
        processing_class: the student's tokenizer (default: ``AutoTokenizer`` of ``model``).
        teacher_processing_class: the teacher's tokenizer (default: the teacher SentenceTransformer's, or
            ``AutoTokenizer`` of the teacher's ``name_or_path``).
        loss_config: :class:`OTLossConfig` (epsilon, iterations, sentence-level term, ...).
        peft_config: optional peft config (e.g. ``LoraConfig``) to train adapters only.
        max_length, source_prompt, target_prompt, source_column, target_column: see :class:`BitextCollator`.
        pooling: pooling of the saved SentenceTransformer folder, of the sentence-level terms and, with
            ``loss_config.marginals="pooling"``, of the OT weights of both sides: ``"mean"`` or ``"cls"``.
        cache_teacher: run the teacher once over the English side of ``train_dataset`` and ``eval_dataset`` before
            training and read its token states from that cache at each step (fp16 on disk, see
            :mod:`optical_hf.teacher_cache`); False runs the teacher at every step (for teachers too large to
            cache). Needs ``datasets.Dataset`` train/eval sets and the default collator, else the teacher runs
            online.
        teacher_cache_dir: folder of the cache files (default ``~/.cache/optical_hf/teacher``).
        evaluator: sentence-transformers evaluator(s) (e.g. :class:`optical_hf.evaluation.CLIREvaluator`,
            ``MSEEvaluator``; a list runs them in sequence) run at each evaluation, after ``eval_loss``, on the student
            as a SentenceTransformer (:meth:`student_as_sentence_transformer`); their metrics join the evaluation
            metrics with the ``eval_`` prefix (usable as ``metric_for_best_model``). Evaluation needs an
            ``eval_dataset``.

    Training stops with :class:`optical_hf.NonFiniteLossError` at the first step whose loss or gradients are NaN or
    infinite (:class:`optical_hf.callbacks.NonFiniteLossCallback`, installed by default), before the optimizer step.

    Example::

        from transformers import AutoModel, TrainingArguments
        from optical_hf import OTDistillationTrainer, OTLossConfig, load_bitext

        trainer = OTDistillationTrainer(
            model=AutoModel.from_pretrained("xlm-roberta-base"),
            teacher="sentence-transformers/all-mpnet-base-v2",
            args=TrainingArguments("optical-xlmr-sw", max_steps=1000),
            train_dataset=load_bitext("train.sw", "train.en"),
            loss_config=OTLossConfig(reg=0.1),
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
        args: TrainingArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
        loss_config: OTLossConfig | None = None,
        peft_config: PeftConfig | None = None,
        max_length: int = 128,
        source_prompt: str | None = None,
        target_prompt: str | None = None,
        source_column: str = "source",
        target_column: str = "target",
        pooling: str = "mean",
        data_collator: Any = None,
        cache_teacher: bool = True,
        teacher_cache_dir: str | Path | None = None,
        evaluator: BaseEvaluator | list[BaseEvaluator] | None = None,
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
        if pooling not in ("mean", "cls"):
            raise ValueError(f"`pooling` must be 'mean' or 'cls', got {pooling!r}")
        if args is None:
            args = TrainingArguments(output_dir="optical-student")
        args.remove_unused_columns = False
        self.loss_config = loss_config or OTLossConfig()
        self.pooling = pooling
        self.max_length = max_length
        if data_collator is None:
            data_collator = BitextCollator(
                processing_class, teacher_processing_class, source_column, target_column, max_length,
                source_prompt, target_prompt, self.loss_config.exclude_special_tokens,
            )
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, data_collator=data_collator, **kwargs,
        )
        self.add_callback(NonFiniteLossCallback)
        self.evaluator = SequentialEvaluator(evaluator) if isinstance(evaluator, list) else evaluator
        self.teacher = self._prepare_teacher(teacher)
        self._components: dict[str, dict[str, list[Tensor]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        if cache_teacher and self._zero3:
            logger.info("Teacher outputs not cached under DeepSpeed ZeRO-3 (its forward gathers partitioned weights on "
                        "every rank at once): the teacher runs at every step")
        elif cache_teacher:
            self._cache_teacher_outputs(teacher_cache_dir)

    @property
    def _zero3(self) -> bool:
        """Whether DeepSpeed ZeRO-3 partitions the parameters across ranks."""
        return self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """The frozen teacher ready for the forward passes, as TRL prepares its teacher and reference models.

        DeepSpeed: an inference engine with the training's config (ZeRO-3 partitions it like the student; other
        stages keep a full copy per rank). FSDP: an unsharded copy on each rank's device (``prepare_model`` moves no
        model under FSDP; the teacher only runs forward, mostly once to fill the cache). Otherwise the Accelerator's
        device placement and mixed precision, without DDP.

        Not run by the tests: deepspeed is not a dependency, and accelerate's FSDP plugin refuses machines without
        GPU (``FullyShardedDataParallelPlugin``: "no available devices found"), so FSDP cannot run on 2 CPU processes.
        """
        teacher.requires_grad_(False)
        teacher.eval()
        if self.is_deepspeed_enabled:
            return _deepspeed_inference_engine(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            teacher.to(self.accelerator.device)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _cache_teacher_outputs(self, cache_dir: str | Path | None) -> None:
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
            max_length=collator.max_length,
        )
        with self.args.main_process_first(desc="teacher cache"):
            collator.teacher_cache = load_or_encode(
                texts, self._encode_teacher, prompt or None, collator.max_length, fingerprint, cache_dir
            )

    def _encode_teacher(self, texts: list[str]) -> dict[str, Tensor]:
        """The teacher on English ``texts`` tokenized as in training: ids, mask and ``token_embeddings``."""
        features = self.data_collator.tokenize("target", texts)
        device_features = {key: value.to(self.accelerator.device) for key, value in features.items()}
        return {**features, "token_embeddings": self._teacher_forward(device_features)}

    def _pool(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        return tokens[:, 0] if self.pooling == "cls" else mean_pool(tokens, attention_mask)

    def _marginal(self, inputs: dict[str, Tensor], side: str) -> Tensor:
        """``(batch, n)`` OT weights of one side: the pooling weights or the collator's content mask."""
        if self.loss_config.marginals == "pooling":
            return pooling_weights(inputs[f"{side}_attention_mask"], self.pooling)
        return inputs[f"{side}_content_mask"]

    def _teacher_forward(self, features: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            if isinstance(self.accelerator.unwrap_model(self.teacher), SentenceTransformer):
                return self.teacher(features)["token_embeddings"]
            return self.teacher(**features).last_hidden_state

    def _teacher_tokens(self, inputs: dict[str, Tensor]) -> Tensor:
        """``(batch, m, dim)`` teacher token states: looked up by the collator when cached, else a teacher forward."""
        if "target_token_embeddings" in inputs:
            return inputs["target_token_embeddings"].float()
        return self._teacher_forward(_model_inputs(inputs, "target"))

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor | tuple[Tensor, dict]:
        student_tokens = model(**_model_inputs(inputs, "source")).last_hidden_state
        teacher_tokens = self._teacher_tokens(inputs)
        losses = distillation_losses(
            student_tokens, self._marginal(inputs, "source"), teacher_tokens, self._marginal(inputs, "target"),
            self.loss_config,
            self._pool(student_tokens, inputs["source_attention_mask"]),
            self._pool(teacher_tokens, inputs["target_attention_mask"]),
        )
        mode = "train" if model.training else "eval"
        for name, value in losses.items():
            self._components[mode][name].append(value.detach())
        loss = torch.stack(list(losses.values())).sum()
        return (loss, {}) if return_outputs else loss

    def evaluation_loop(
        self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """The distillation loss loop, then ``evaluator`` (if any) on the student, its metrics prefixed like the loss."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.evaluator is None:
            return output
        output_path = str(Path(self.args.output_dir) / "eval") if self.is_world_process_zero() else None
        metrics = self.evaluator(
            self.student_as_sentence_transformer(), output_path=output_path, epoch=self.state.epoch,
            steps=self.state.global_step,
        )
        if not isinstance(metrics, dict):
            metrics = {"evaluator": metrics}
        output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in metrics.items()})
        return output

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

    def _full_student(self) -> nn.Module:
        """The unwrapped student with all its weights, on every rank.

        Under FSDP or DeepSpeed ZeRO-3 the parameters are sharded: the shards are gathered (``get_state_dict``, a
        collective that every rank must call) into a new copy of the student, sent from the main process to the others.
        """
        model = self.accelerator.unwrap_model(self.model)
        if not (self.is_fsdp_enabled or self._zero3):
            return model
        state_dict = [self.accelerator.get_state_dict(self.model)]  # full on the main process only
        torch.distributed.broadcast_object_list(state_dict, src=0)
        return _unsharded_copy(model, state_dict[0]).to(self.accelerator.device)

    def student_as_sentence_transformer(self) -> SentenceTransformer:
        """The current student (adapters merged) as a SentenceTransformer with this trainer's pooling.

        Under FSDP or DeepSpeed ZeRO-3 every rank must call it (the sharded weights are gathered).
        """
        return self._as_sentence_transformer(self._full_student())

    def _as_sentence_transformer(self, model: nn.Module) -> SentenceTransformer:
        base = merged_copy(model) if has_adapters(model) else model
        return sentence_transformer_from(base, self.processing_class, self.pooling, self.max_length)

    card_info: StudentCardInfo | None = None
    """Model card of the final save (language, teacher, data, metrics ...); without it the card says what the
    trainer knows: the base model and teacher (when loaded from the Hub), the OT configuration and the prompts."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints keep the Trainer's format (resumable); a final save writes a complete student folder.

        The final folder loads with ``AutoModel.from_pretrained`` and ``SentenceTransformer``; LoRA adapters are
        merged into it and kept unmerged under ``adapter/``. It holds the OPTICAL model card and ``optical_hf.json``
        (from :attr:`card_info`), so ``optical-hf push`` can publish it, and is written atomically (see
        :func:`optical_hf.export.save_student`). Under FSDP or DeepSpeed ZeRO-3 the sharded weights are gathered
        first (every rank calls ``save_model``, as with ``Trainer.save_model``).
        """
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        output_dir = Path(output_dir or self.args.output_dir)
        student = self._full_student()
        if self.args.should_save:
            save_student(
                self._as_sentence_transformer(student), output_dir, adapter_model=student,
                card=self.card_info or self._known_card_info(),
            )
        self.accelerator.wait_for_everyone()

    def push_to_hub(
        self, commit_message: str | None = None, blocking: bool = True, token: str | None = None,
        revision: str | None = None, private: bool | None = None, **kwargs: Any,
    ) -> str | None:
        """Save the final student folder into ``args.output_dir`` and publish that folder with
        :func:`optical_hf.hub.push_student` (never the Trainer's checkpoint layout or its generic card).

        The repo is ``args.hub_model_id``, or, as in ``Trainer``, the name of ``output_dir`` in the token's namespace;
        ``revision`` (default ``args.hub_revision``) is the branch, ``private`` (default ``args.hub_private_repo``) the
        visibility of a new repo. ``blocking`` must be True; other keyword arguments are refused.

        Returns:
            The commit URL (None on processes other than the main one).
        """
        if not blocking or kwargs:
            raise ValueError(
                f"OTDistillationTrainer.push_to_hub pushes the final student folder synchronously: blocking=False and "
                f"{sorted(kwargs)} are not supported"
            )
        self.save_model()
        if not self.is_world_process_zero():
            return None
        return push_student(
            self.args.output_dir, self.args.hub_model_id or Path(self.args.output_dir).absolute().name,
            private=private if private is not None else self.args.hub_private_repo,
            token=token if token is not None else self.args.hub_token,
            revision=revision if revision is not None else self.args.hub_revision,
            commit_message=commit_message,
        )

    def _known_card_info(self) -> StudentCardInfo:
        """Card info from what the trainer knows: Hub ids of the student's base model and the teacher, OT options."""
        collator = self.data_collator if isinstance(self.data_collator, BitextCollator) else None
        teacher = self.accelerator.unwrap_model(self.teacher)
        return StudentCardInfo(
            teacher=_hub_model_id(teacher),
            base_model=_hub_model_id(self.accelerator.unwrap_model(self.model)),
            ot=dataclasses.asdict(self.loss_config),
            training={"front_end": "trainer", "steps": self.state.global_step, "pooling": self.pooling,
                      "max_length": self.max_length},
            query_prompt=(collator.sides["source"][2] or None) if collator else None,
        )


def _hub_model_id(model: nn.Module) -> str | None:
    """The Hub id ``model`` was loaded from: sentence-transformers records it; for a transformers model, its
    ``name_or_path`` when that is spelled like a Hub id and is no local folder."""
    if isinstance(model, SentenceTransformer):
        return model.model_card_data.base_model
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    name = getattr(model, "name_or_path", "") or ""
    return name if is_hub_repo_id(name) and not Path(name).expanduser().exists() else None



def _unsharded_copy(model: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """A new instance of ``model``'s architecture (a ``PreTrainedModel`` or a ``PeftModel`` around one) holding the
    full ``state_dict`` (keys as in ``model.state_dict()``)."""
    if isinstance(model, PeftModel):
        base = model.get_base_model()
        unsharded = get_peft_model(type(base)(base.config), model.peft_config[model.active_adapter])
    else:
        unsharded = type(model)(model.config)
    unsharded.load_state_dict(state_dict)
    return unsharded


def _deepspeed_inference_engine(model: nn.Module, accelerator: Any) -> nn.Module:
    """``model`` wrapped by ``deepspeed.initialize`` with the training's DeepSpeed config, for inference only.

    As TRL's ``prepare_deepspeed``: ZeRO-3 keeps stage 3 (the model is partitioned) with bucket sizes from the
    model's hidden size (the Trainer fills the config's ``"auto"`` values from the student only); other stages
    become stage 0 (no partitioning).
    """
    import deepspeed  # only reached with DeepSpeed enabled, which requires it

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        hidden = (model.get_sentence_embedding_dimension() if isinstance(model, SentenceTransformer)
                  else model.config.hidden_size)
        zero.update(reduce_bucket_size=hidden * hidden, stage3_param_persistence_threshold=10 * hidden,
                    stage3_prefetch_bucket_size=int(0.9 * hidden * hidden))
    else:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
