"""The names optical_hf's options choose from, declared once (torch-free, so parsing flags loads no model library):
poolings, scorings, MaxSim token selections, the default truncation length, a run's :class:`Prompts`, and the
method's :data:`CITATION` (for losses and model cards).

Each concept has one validator, :func:`check_choice`, which raises an :class:`optical_hf.OpticalInputError` naming the
flag or field at fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import OpticalInputError

__all__ = ["ALIGNMENT_RULES", "ALPHA_SCHEDULES", "CITATION", "DEFAULT_MAX_LENGTH", "EXPORTS", "RECIPE_TRAINING", "HYBRID_GRANULARITIES", "POOLINGS", "SCORINGS", "TOKEN_SELECTIONS", "Prompts", "check_choice"]

CITATION = """@inproceedings{huang2023optical,
  title={Improving Cross-lingual Information Retrieval on Low-Resource Languages via Optimal Transport Distillation},
  author={Huang, Zhiqi and Yu, Puxuan and Allan, James},
  booktitle={Proceedings of the Sixteenth ACM International Conference on Web Search and Data Mining (WSDM '23)},
  year={2023},
  doi={10.1145/3539597.3570468}
}"""
"""BibTeX of the OPTICAL paper."""
POOLINGS = ("mean", "cls")
"""Poolings of an ``AutoModel`` student or teacher (a SentenceTransformer keeps its own ``Pooling`` module)."""
SCORINGS = ("dense", "maxsim")
"""How a student is searched: ``"dense"`` (cosine of sentence embeddings) or ``"maxsim"`` (late interaction)."""
TOKEN_SELECTIONS = ("all", "content")
"""Tokens taking part in MaxSim: every real token, or only content tokens (no special, no prompt tokens)."""
ALPHA_SCHEDULES = ("constant", "linear", "cosine", "step")
"""How the monolingual proportion of hybrid batches moves over training (:class:`optical_hf.hybrid.AlphaSchedule`)."""
HYBRID_GRANULARITIES = ("batch", "entry")
"""Whether hybrid batches draw the monolingual kind per batch or per entry."""
ALIGNMENT_RULES = ("mutual-argmax", "threshold")
"""How a word plan becomes word links (:func:`optical_hf.code_switch.align`)."""
EXPORTS = ("pair", "student")
"""What a student folder holds: ``"pair"`` (one SentenceTransformer whose ``encode_query`` is the student and
``encode_document`` the teacher, each with its prompt) or ``"student"`` (the student alone)."""
DEFAULT_MAX_LENGTH = 128
"""Tokens kept per sentence unless a model's position limit is smaller (both front ends and the CLI)."""
RECIPE_TRAINING = {"learning_rate": 1e-4, "per_device_train_batch_size": 16, "warmup_steps": 0.1, "logging_steps": 10}
"""The recipe's training hyperparameters, the defaults of both ``optical-hf distill`` and :class:`OTDistillationConfig`
(``warmup_steps`` below 1 is a fraction of the steps in transformers 5)."""


def check_choice(value: str, choices: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``choices``, else an :class:`OpticalInputError` naming ``name`` (a flag such as
    ``--scoring`` or a field such as ``OTDistillationConfig.pooling``)."""
    if value not in choices:
        raise OpticalInputError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Prompts:
    """The prompts of a run (``""``: none).

    Attributes:
        query: the student's, on the low-resource side of the bitext and on queries (saved as its ``"query"``
            prompt; the ``source`` column's).
        teacher: the teacher's on the English side of the bitext (the ``target`` column's).
        document: the teacher's on documents at search time.
    """

    query: str = ""
    teacher: str = ""
    document: str = ""

    def columns(self) -> dict[str, str]:
        """The prompt of each bitext column that has one: ``{"source": query, "target": teacher}``."""
        return {column: prompt for column, prompt in (("source", self.query), ("target", self.teacher)) if prompt}
