"""Search with a distilled student: :func:`retrieve`, dense or MaxSim, in the shape of sentence-transformers'
``util.semantic_search`` (and PyLate's ``retrieve``): for each query, a list of ``{"corpus_id", "score"}`` best first.

A student folder saved as the pair (``export="pair"``) is the whole retriever: its ``encode_query`` runs the student
and its ``encode_document`` the teacher, so ``retrieve(model, queries, documents)`` needs nothing else. With a folder
holding the student alone, pass the teacher as ``document_model``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import semantic_search

from .late_interaction import DEFAULT_TOKENS, TokenIndex, build_index, encode_token_states, maxsim_topk
from .vocabulary import SCORINGS, check_choice

__all__ = ["retrieve"]


def retrieve(
    model: SentenceTransformer,
    queries: Sequence[str],
    corpus: Sequence[str] | torch.Tensor | TokenIndex,
    top_k: int = 10,
    *,
    scoring: str | None = None,
    document_model: SentenceTransformer | None = None,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    batch_size: int = 64,
) -> list[list[dict[str, Any]]]:
    """The ``top_k`` documents of ``corpus`` for each query, best first.

    Args:
        model: encodes the queries (``encode_query``, with its stored query prompt unless ``query_prompt``).
        queries: the query texts.
        corpus: the documents: texts (encoded here by ``document_model``, default ``model``, with
            ``encode_document``), ``(num_docs, dim)`` document embeddings (dense), or a
            :class:`~optical_hf.late_interaction.TokenIndex` (MaxSim, its token selection).
        top_k: documents per query.
        scoring: ``"dense"`` (cosine of sentence embeddings, ``util.semantic_search``) or ``"maxsim"`` (late
            interaction: the query's tokens against each document's); default: ``"maxsim"`` for a ``TokenIndex``,
            else ``"dense"``.
        document_model: encodes texts of ``corpus`` (default ``model``: a pair folder's teacher).

    Returns:
        ``[[{"corpus_id": int, "score": float}, ...], ...]``: one list per query, ``corpus_id`` the document's
        position in ``corpus`` (for a ``TokenIndex``, also ``"id"``, its stored id).
    """
    scoring = check_choice(scoring or ("maxsim" if isinstance(corpus, TokenIndex) else "dense"), SCORINGS, "scoring")
    document_model = document_model or model
    query_kwargs = {} if query_prompt is None else {"prompt": query_prompt}
    if scoring == "dense":
        if isinstance(corpus, TokenIndex):
            raise ValueError("retrieve: a TokenIndex holds token vectors; dense scoring needs texts or embeddings")
        documents = corpus if isinstance(corpus, torch.Tensor) else document_model.encode_document(
            list(corpus), convert_to_tensor=True, batch_size=batch_size,
            **({} if document_prompt is None else {"prompt": document_prompt}))
        query_embeddings = model.encode_query(list(queries), convert_to_tensor=True, batch_size=batch_size,
                                              **query_kwargs)
        return semantic_search(query_embeddings, documents.to(query_embeddings.device), top_k=top_k)
    if isinstance(corpus, torch.Tensor):
        raise ValueError("retrieve: MaxSim needs document texts or a TokenIndex, not sentence embeddings")
    index = corpus if isinstance(corpus, TokenIndex) else build_index(
        document_model, list(corpus), prompt=document_prompt, batch_size=batch_size)
    tokens = index.built_by.get("tokens", DEFAULT_TOKENS)
    states = encode_token_states(model, list(queries), side="query", prompt=query_prompt, tokens=tokens,
                                 batch_size=batch_size)
    scores, positions = maxsim_topk(states, index, top_k=top_k)
    return [[{"corpus_id": int(position), "score": float(score), "id": index.ids[int(position)]}
             for score, position in zip(row_scores.tolist(), row_positions.tolist())]
            for row_scores, row_positions in zip(scores, positions)]
