"""Search with a distilled student: :func:`retrieve`, dense or MaxSim, in the shape of sentence-transformers'
``util.semantic_search`` (and PyLate's ``retrieve``): for each query, a list of ``{"corpus_id", "score"}`` best first.

A student folder saved as the pair (``export="pair"``) is the whole retriever: its ``encode_query`` runs the student
and its ``encode_document`` the teacher, so ``retrieve(model, queries, documents)`` needs nothing else. With a folder
holding the student alone, pass the teacher as ``document_model``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import semantic_search

from .late_interaction import DEFAULT_TOKENS, build_index, check_index, encode_token_states
from .vocabulary import SCORINGS, check_choice

if TYPE_CHECKING:
    from .faiss_index import Hits

__all__ = ["retrieve"]


def retrieve(
    model: SentenceTransformer,
    queries: Sequence[str],
    corpus: Sequence[str] | torch.Tensor | Any,
    top_k: int = 10,
    *,
    scoring: str | None = None,
    document_model: SentenceTransformer | None = None,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    batch_size: int = 64,
) -> Hits:
    """The ``top_k`` documents of ``corpus`` for each query, best first.

    Args:
        model: encodes the queries (``encode_query``, with its stored query prompt unless ``query_prompt``).
        queries: the query texts.
        corpus: the documents: texts (encoded here by ``document_model``, default ``model``, with
            ``encode_document``), ``(num_docs, dim)`` document embeddings (dense), or a search index: a
            :class:`~optical_hf.late_interaction.TokenIndex` (exact MaxSim), a
            :class:`~optical_hf.faiss_index.FaissDenseIndex` or :class:`~optical_hf.faiss_index.FaissMaxSimIndex`,
            a :class:`~optical_hf.qdrant_index.QdrantIndex` (its ``kind`` sets the scoring; queries are encoded
            with the token selection it was built with).
        top_k: documents per query.
        scoring: ``"dense"`` (cosine of sentence embeddings, ``util.semantic_search``) or ``"maxsim"`` (late
            interaction: the query's tokens against each document's); default: the index's kind, else ``"dense"``.
        document_model: encodes texts of ``corpus`` (default ``model``: a pair folder's teacher).

    Returns:
        ``[[{"corpus_id": int, "score": float}, ...], ...]``: one list per query, ``corpus_id`` the document's
        position in ``corpus`` (for a search index, also ``"id"``, its stored id).
    """
    index = corpus if hasattr(corpus, "kind") and hasattr(corpus, "search") else None
    scoring = check_choice(scoring or (index.kind if index is not None else "dense"), SCORINGS, "scoring")
    if index is not None and index.kind != scoring:
        raise ValueError(f"retrieve: a {type(index).__name__} of kind {index.kind!r} cannot be scored {scoring!r}")
    document_model = document_model or model
    if index is not None:
        check_index(index, document_model, prompt=document_prompt, tokens=index.built_by.get("tokens"),
                    where=f"retrieve: the {type(index).__name__}")
    query_kwargs = {} if query_prompt is None else {"prompt": query_prompt}
    if scoring == "dense":
        query_embeddings = model.encode_query(list(queries), convert_to_tensor=True, batch_size=batch_size,
                                              **query_kwargs)
        if index is not None:
            return index.search(query_embeddings.cpu(), top_k)
        documents = corpus if isinstance(corpus, torch.Tensor) else document_model.encode_document(
            list(corpus), convert_to_tensor=True, batch_size=batch_size,
            **({} if document_prompt is None else {"prompt": document_prompt}))
        return semantic_search(query_embeddings, documents.to(query_embeddings.device), top_k=top_k)
    if isinstance(corpus, torch.Tensor):
        raise ValueError("retrieve: MaxSim needs document texts or a token index, not sentence embeddings")
    index = index or build_index(document_model, list(corpus), prompt=document_prompt, batch_size=batch_size)
    tokens = index.built_by.get("tokens") or DEFAULT_TOKENS
    states = encode_token_states(model, list(queries), side="query", prompt=query_prompt, tokens=tokens,
                                 batch_size=batch_size)
    return index.search(states, top_k)
