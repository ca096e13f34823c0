"""``OTDistillationConfig``: the training arguments of :class:`optical_hf.OTDistillationTrainer`.

As TRL does for its trainers (``GKDConfig`` extends the Trainer's arguments, ``GKDTrainer(args=GKDConfig(...))``), one
dataclass holds every option of a run: ``transformers.TrainingArguments``, the objective's :class:`OTLossConfig`
fields (inherited, not re-declared) and the trainer's own options (tokenization, prompts, pooling, teacher cache).
``HfArgumentParser((OTDistillationConfig,))`` turns all of them into command-line flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from .errors import OpticalInputError
from .arguments import HybridBatchArguments
from .options import OTLossConfig
from .vocabulary import DEFAULT_MAX_LENGTH, POOLINGS, RECIPE_TRAINING, check_choice

__all__ = ["OTDistillationConfig", "TeacherCacheArguments"]



@dataclass
class TeacherCacheArguments:
    """Whether to cache the teacher's outputs, and where: the recipe's flags and :class:`OTDistillationConfig`'s."""

    cache_teacher: bool = field(default=True, metadata={
        "help": "Run the frozen teacher once over the English side of the train and eval sets and read its outputs "
                "from that cache (fp16 on disk) at each step; --cache_teacher false runs it at every step (for "
                "teachers too large to cache)."})
    teacher_cache_dir: str | None = field(default=None, metadata={
        "help": "Folder of the teacher cache files (default: $XDG_CACHE_HOME/optical_hf/teacher)."})


@dataclass
class OTDistillationConfig(OTLossConfig, HybridBatchArguments, TeacherCacheArguments, TrainingArguments):
    """``TrainingArguments`` + the :class:`OTLossConfig` fields + the options of
    :class:`optical_hf.OTDistillationTrainer` (declared here only, not as constructor arguments).

    Example::

        OTDistillationConfig("optical-xlmr-sw", max_steps=1000, reg=0.1, sentence_weight=1.0, query_prompt="query: ")
    """

    # the recipe's training defaults, those of optical-hf distill (one source: vocabulary.RECIPE_TRAINING)
    learning_rate: float = field(default=RECIPE_TRAINING["learning_rate"], metadata={
        "help": "The initial learning rate for the optimizer (the recipe's default)."})
    per_device_train_batch_size: int = field(default=RECIPE_TRAINING["per_device_train_batch_size"], metadata={
        "help": "The batch size per device for training (the recipe's default)."})
    warmup_steps: float = field(default=RECIPE_TRAINING["warmup_steps"], metadata={
        "help": "Linear warm-up: steps, or a fraction of the training steps below 1 (the recipe's default)."})
    logging_steps: float = field(default=RECIPE_TRAINING["logging_steps"], metadata={
        "help": "Log every X update steps, or a fraction of the training steps below 1 (the recipe's default)."})
    max_length: int = field(default=DEFAULT_MAX_LENGTH, metadata={"help": "Truncation length of both sides (tokens)."})
    query_prompt: str | None = field(default=None, metadata={
        "help": "The student's query prompt: prefix of the low-resource sentences (e.g. 'query: ' for e5 students), "
                "saved as its 'query' prompt (Prompts.query)."})
    teacher_prompt: str | None = field(default=None, metadata={
        "help": "Prefix of the English sentences given to the teacher (e.g. 'query: ' for e5 teachers; "
                "Prompts.teacher)."})
    source_column: str = field(default="source", metadata={"help": "Dataset column of the low-resource sentences."})
    target_column: str = field(default="target", metadata={"help": "Dataset column of the English sentences."})
    pooling: Literal["mean", "cls"] = field(default="mean", metadata={
        "help": "Pooling of an AutoModel student: its sentence embedding in the sentence-level terms, its OT weights "
                "with marginals='pooling', and the pooling of the saved SentenceTransformer folder (a "
                "SentenceTransformer student keeps its own Pooling)."})

    def __post_init__(self) -> None:
        TrainingArguments.__post_init__(self)
        OTLossConfig.__post_init__(self)
        HybridBatchArguments.__post_init__(self)
        check_choice(self.pooling, POOLINGS, "OTDistillationConfig.pooling")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise OpticalInputError(f"OTDistillationConfig.max_length must be an integer >= 1, got {self.max_length!r}")

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **options: object) -> OTDistillationConfig:
        """An ``OTDistillationConfig`` with the ``TrainingArguments`` fields of ``args`` (any subclass, e.g.
        sentence-transformers'), the given ``options`` and the defaults for the rest."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
        return cls(**values, **options)
