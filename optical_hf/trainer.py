"""``OTDistillationTrainer``: OPTICAL distillation for plain ``AutoModel`` students with ``transformers.Trainer``.

Modelled on TRL's distillation trainers: the teacher lives beside the student (prepared as TRL prepares its
teacher/reference models: by the Accelerator for device placement and mixed precision, as a DeepSpeed engine under
DeepSpeed, an unsharded copy on each rank under FSDP; never wrapped in DDP, never given to the optimizer), the options
are one ``TrainingArguments`` subclass (:class:`optical_hf.OTDistillationConfig`, like TRL's ``GKDConfig``) and only
``compute_loss`` changes. Both front ends train one objective through one core: the student runs as its
sentence-transformers pipeline (its transformer, trained by this Trainer, then its own ``Pooling``, ``Normalize``
...), and :meth:`optical_hf.OTDistillationLoss.compute_loss_from_outputs` computes the loss; batches come from the
same :class:`optical_hf.OTDistillationDataCollator` and the teacher cache from the same
:func:`optical_hf.build_teacher_cache` as with sentence-transformers' trainer.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftConfig, PeftModel, get_peft_model
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.evaluation import BaseEvaluator, SequentialEvaluator
from sentence_transformers.util import is_sentence_transformer_model
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.trainer_utils import EvalLoopOutput

from .callbacks import NonFiniteLossCallback
from .collation import OTDistillationDataCollator
from .config import OTDistillationConfig
from .errors import OpticalInputError
from .export import (
    has_adapters, merged_copy, save_student, sentence_transformer_from, transformer_module, with_transformer_model,
)
from .hub import push_student
from .hybrid import hybrid_batches
from .losses import OTDistillationLoss
from .model_card import StudentCardInfo, is_hub_repo_id
from .teacher_cache import build_teacher_cache

__all__ = ["OTDistillationTrainer"]

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _column(inputs: dict[str, Any], column: str) -> dict[str, Any]:
    """The features of one text column of an :class:`OTDistillationDataCollator` batch, without the ``{column}_``
    prefix (as sentence-transformers' ``collect_features`` splits a batch)."""
    prefix = f"{column}_"
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
        model: the student: an ``AutoModel`` (e.g. ``xlm-roberta-base``), a ``SentenceTransformer`` (its own modules
            are kept: its transformer is trained, its ``Pooling`` gives its sentence embedding and OT weights, and the
            saved folder keeps its pooling, normalisation and ``max_seq_length``), or a model id/path (loaded as a
            SentenceTransformer when it has a ``modules.json``).
        teacher: the frozen English teacher: ``AutoModel``, ``SentenceTransformer``, or a model id/path
            (loaded as a SentenceTransformer). Token embeddings must have the student's size.
        args: an :class:`optical_hf.OTDistillationConfig`: the ``TrainingArguments``, the objective's
            :class:`optical_hf.OTLossConfig` fields, and this trainer's options (``max_length``, ``query_prompt``,
            ``teacher_prompt``, ``source_column``, ``target_column``, ``pooling``, ``cache_teacher``,
            ``teacher_cache_dir``). Plain ``TrainingArguments`` are accepted and get the defaults of the others.
            ``remove_unused_columns`` is forced to False (the collator needs the text columns).
        train_dataset / eval_dataset: bitext ``datasets.Dataset`` with ``args.source_column`` / ``args.target_column``.
        processing_class: the student's tokenizer (default: ``AutoTokenizer`` of ``model``).
        teacher_processing_class: the tokenizer of an ``AutoModel`` teacher (default: ``AutoTokenizer`` of its
            ``name_or_path``); a SentenceTransformer teacher has its own.
        peft_config: optional peft config (e.g. ``LoraConfig``) to train adapters only.
        data_collator: default :class:`optical_hf.OTDistillationDataCollator` over the source and target columns,
            with ``args.query_prompt`` / ``args.teacher_prompt``, the same collator as the sentence-transformers
            front end (a replacement must produce its keys).
        evaluator: sentence-transformers evaluator(s) (e.g. :class:`optical_hf.evaluation.CLIREvaluator`,
            ``MSEEvaluator``; a list runs them in sequence) run at each evaluation, after ``eval_loss``, on the student
            as a SentenceTransformer (:meth:`student_as_sentence_transformer`); their metrics join the evaluation
            metrics with the ``eval_`` prefix (usable as ``metric_for_best_model``). Evaluation needs an
            ``eval_dataset``.

    One objective for both front ends: the student runs as its sentence-transformers pipeline (a SentenceTransformer
    student's own modules; an ``AutoModel`` student gets ``Transformer`` + ``Pooling(args.pooling)``, the folder it is
    saved as) and :meth:`optical_hf.OTDistillationLoss.compute_loss_from_outputs` computes the loss, so its sentence
    embedding (``sentence_weight``, ``contrastive_weight``) and its OT weights (``marginals="pooling"``) are those of
    its pooling and normalisation, exactly as with sentence-transformers' trainer. An ``AutoModel`` teacher runs as a
    frozen ``Transformer`` + ``Pooling(args.pooling)`` around it; a SentenceTransformer teacher as itself. Loss components
    (``ot``, ``contrastive`` ...) are logged as their mean since the last log over all processes.

    With ``args.cache_teacher`` (default), the teacher runs once over the English side of ``train_dataset`` and
    ``eval_dataset`` before training (:func:`optical_hf.build_teacher_cache`) and its token states (and sentence
    embeddings) are read from that cache at each step (fp16 on disk, see :mod:`optical_hf.teacher_cache`); this needs
    ``datasets.Dataset`` train/eval sets and the default collator, else the teacher runs online.

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
        model: PreTrainedModel | SentenceTransformer | str,
        teacher: PreTrainedModel | SentenceTransformer | str,
        args: OTDistillationConfig | TrainingArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
        peft_config: PeftConfig | None = None,
        data_collator: Any = None,
        evaluator: BaseEvaluator | list[BaseEvaluator] | None = None,
        **kwargs: Any,
    ) -> None:
        args = _as_config(args)
        args.remove_unused_columns = False
        if isinstance(model, str):
            model = (SentenceTransformer(model, device="cpu") if is_sentence_transformer_model(model)
                     else AutoModel.from_pretrained(model))
        if isinstance(model, SentenceTransformer):  # keep its own modules; train its transformer's weights
            self.student_pipeline, model = model, _transformer_model(model)
        else:
            self.student_pipeline = _pipeline_around(model, processing_class, args)
        processing_class = processing_class or self.student_pipeline.tokenizer
        self._teacher_hub_id = _hub_model_id(teacher) if not isinstance(teacher, str) else (
            teacher if is_hub_repo_id(teacher) and not Path(teacher).expanduser().exists() else None)
        if isinstance(teacher, str):
            teacher = SentenceTransformer(teacher, device="cpu")
        if not isinstance(teacher, SentenceTransformer):
            teacher = _pipeline_around(teacher, teacher_processing_class, args)
        teacher.max_seq_length = args.max_length  # the English side's truncation, cached or not
        if peft_config is not None:
            model = get_peft_model(model, peft_config)
            self.student_pipeline[0].model = model
        # The one objective of both front ends; the Trainer runs the transformer, the loss everything after it. The
        # loss reads its options from these arguments (an OTLossConfig): one owner of the values.
        self.loss = OTDistillationLoss(self.student_pipeline, teacher, config=args)
        self._student_head = nn.Sequential(*list(self.student_pipeline.children())[1:]).to(args.device)
        self._columns = (args.source_column, args.target_column)
        if data_collator is None:
            prompts = {column: prompt for column, prompt in zip(self._columns, (args.query_prompt, args.teacher_prompt))
                       if prompt}
            data_collator = OTDistillationDataCollator(self.student_pipeline.preprocess, prompts=prompts,
                                                       max_length=args.max_length,
                                                       teacher_preprocess_fn=teacher.preprocess)
        train_dataset, eval_dataset = self._bitext_columns(train_dataset), self._bitext_columns(eval_dataset)
        self._hybrid = None
        if args.hybrid_alpha is not None:
            if not isinstance(train_dataset, Dataset):
                raise OpticalInputError("OTDistillationTrainer: hybrid_alpha needs one bitext Dataset as train_dataset")
            self._hybrid = hybrid_batches(train_dataset, args, *self._columns)
            train_dataset = self._hybrid.dataset
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, data_collator=data_collator, **kwargs,
        )
        self.add_callback(NonFiniteLossCallback)
        if self._hybrid is not None:
            self._hybrid.callback.install(self)
        self.evaluator = SequentialEvaluator(evaluator) if isinstance(evaluator, list) else evaluator
        self.teacher = self.loss.teacher = self._prepare_teacher(teacher)
        self._components: dict[str, dict[str, Tensor]] = {"train": {}, "eval": {}}
        if args.cache_teacher and self._zero3:
            logger.info("Teacher outputs not cached under DeepSpeed ZeRO-3 (its forward gathers partitioned weights on "
                        "every rank at once): the teacher runs at every step")
        elif args.cache_teacher:
            self._cache_teacher_outputs()

    def get_train_dataloader(self) -> DataLoader:
        """The Trainer's loader, or with hybrid batches one over :class:`optical_hf.hybrid.HybridBatchSampler` (the
        Trainer has no batch-sampler option: its own loader takes a per-sample sampler)."""
        if self._hybrid is None:
            return super().get_train_dataloader()
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = self._hybrid.batch_sampler(self.train_dataset, batch_size=self._train_batch_size,
                                             drop_last=self.args.dataloader_drop_last, seed=seed)
        return self.accelerator.prepare(DataLoader(
            self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory))

    def _bitext_columns(self, dataset: Any) -> Any:
        """A bitext ``Dataset`` (or a dict of them) reduced to its source and target columns, in that order: the
        collator reads columns by position (the second is the teacher's)."""
        if isinstance(dataset, dict):
            return {name: self._bitext_columns(split) for name, split in dataset.items()}
        if not isinstance(dataset, Dataset):
            return dataset
        missing = [column for column in self._columns if column not in dataset.column_names]
        if missing:
            raise OpticalInputError(f"OTDistillationTrainer: the bitext has no column {missing[0]!r} (columns: "
                                    f"{dataset.column_names}); set source_column / target_column")
        return dataset.select_columns(list(self._columns))

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

    def _cache_teacher_outputs(self) -> None:
        """Encode the English side of the train and eval sets once (main process first) with
        :func:`optical_hf.build_teacher_cache`, as the sentence-transformers front end does, for the collator."""
        evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        sets = [d for d in (self.train_dataset, *evals) if d is not None]
        if not (isinstance(self.data_collator, OTDistillationDataCollator) and sets
                and all(isinstance(d, Dataset) for d in sets)):
            logger.info("Teacher outputs not cached (needs datasets.Dataset train/eval sets and the default "
                        "OTDistillationDataCollator): the teacher runs at every step")
            return
        target = self._columns[1]
        with self.args.main_process_first(desc="teacher cache"):
            self.data_collator.teacher_cache = build_teacher_cache(
                self.accelerator.unwrap_model(self.teacher), [text for d in sets for text in d[target]],
                prompt=self.args.teacher_prompt, cache_dir=self.args.teacher_cache_dir,
            )

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor | tuple[Tensor, dict]:
        """The student's transformer (``model``, as the Trainer wrapped it) on the low-resource column, the rest of its
        pipeline (pooling, normalisation ...) on its token states, then
        :meth:`OTDistillationLoss.compute_loss_from_outputs`: the objective of the sentence-transformers front end."""
        source, target = (_column(inputs, column) for column in self._columns)
        tokens = model(**_pick(source, MODEL_INPUTS)).last_hidden_state
        student_out = self._student_head({**source, "token_embeddings": tokens})
        losses = self.loss.compute_loss_from_outputs(source, student_out, target)
        self._track(losses, "train" if model.training else "eval")
        loss = torch.stack(list(losses.values())).sum()
        return (loss, {}) if return_outputs else loss

    def _track(self, losses: dict[str, Tensor], mode: str) -> None:
        """Add each loss component (detached) and one step to the ``mode`` accumulators that :meth:`log` reports."""
        sums = self._components[mode]
        for name, value in losses.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
        sums["steps"] = sums.get("steps", 0) + 1

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
        """Add the mean of each loss component (``ot``, ``contrastive``, ...) since the last log, summed over the
        processes as sentence-transformers' trainer does (every process calls ``log``)."""
        mode = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
        sums = self._components[mode] if mode else {}
        if "steps" in sums:
            names = sorted(name for name in sums if name != "steps")
            totals = torch.stack([torch.as_tensor(sums[name], dtype=torch.float32, device=self.args.device)
                                  for name in (*names, "steps")])
            totals = self.accelerator.reduce(totals, reduction="sum")  # the tensor itself in a single process
            prefix = "eval_" if mode == "eval" else ""
            logs = {**logs, **{f"{prefix}{name}": round((totals[i] / totals[-1]).item(), 4)
                               for i, name in enumerate(names)}}
            sums.clear()
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
        """The current student (adapters merged) as a SentenceTransformer: a student given as one keeps its own
        modules (pooling, normalisation, ``max_seq_length``, prompts) with the trained weights; a plain ``AutoModel``
        student gets ``Transformer`` + ``Pooling(args.pooling)`` with ``max_seq_length=args.max_length``.

        Under FSDP or DeepSpeed ZeRO-3 every rank must call it (the sharded weights are gathered).
        """
        return self._as_sentence_transformer(self._full_student())

    def _as_sentence_transformer(self, model: nn.Module) -> SentenceTransformer:
        base = merged_copy(model) if has_adapters(model) else model
        return with_transformer_model(self.student_pipeline, base)

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
        return StudentCardInfo(
            teacher=self._teacher_hub_id,
            base_model=_hub_model_id(self.accelerator.unwrap_model(self.model)),
            ot=self.args.to_dict(),
            training={"front_end": "trainer", "steps": self.state.global_step, "pooling": self.args.pooling,
                      "max_length": self.args.max_length},
            query_prompt=self.args.query_prompt or None,
        )


def _pipeline_around(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, args: OTDistillationConfig
) -> SentenceTransformer:
    """``Transformer`` + ``Pooling(args.pooling)`` holding ``model`` itself (not a copy): how an ``AutoModel`` student
    or teacher runs, and the folder a student is saved as. ``tokenizer`` defaults to ``AutoTokenizer`` of the model."""
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model.name_or_path)
    return with_transformer_model(sentence_transformer_from(model, tokenizer, args.pooling, args.max_length), model)


def _transformer_model(student: SentenceTransformer) -> PreTrainedModel:
    """The ``auto_model`` of a SentenceTransformer student's first module, which the trainer trains."""
    return transformer_module(student, "OTDistillationTrainer").auto_model


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
