"""Late-interaction (ColBERT-style MaxSim) cross-lingual retrieval: the student's query token states against the
teacher's passage token states.

``score(q, d) = sum_i max_j cos(q_i, d_j)`` over the query's tokens ``q_i`` (student, with its query prompt) and the
passage's tokens ``d_j`` (teacher, with its document prompt). Passages are encoded once into a :class:`TokenIndex`
(every token vector L2-normalised and stored in fp16, plus per-passage offsets); :func:`maxsim_topk` ranks them
exactly on CPU, converting one chunk of the index to float32 at a time; :class:`MaxSimCLIREvaluator` is the
sentence-transformers evaluator (``optical-hf evaluate --scoring maxsim``).

Which tokens take part is an option on each side (:data:`TOKEN_SELECTIONS`): ``"all"`` (every real token, special
and prompt tokens included) or ``"content"`` (without special tokens and prompt tokens,
:func:`optical_hf.collation.content_mask`); the default is ``"content"`` (:data:`DEFAULT_TOKENS`; why: docs/guide.md,
"Design choices", row "MaxSim tokens").

The search is an exact scan of the fp16 index (why no late-interaction library: docs/guide.md, "Design choices", row
"MaxSim search"). It suits the evaluation sets here, up to tens of thousands of passages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .collation import content_mask, special_token_ids
from .errors import OpticalInputError
from .fingerprint import hash_tensor, model_fingerprint
from .evaluation import (
    CLIREvaluator, Run, check_search_index, first_relevant_ranks, mean_metrics, per_query_metrics, run_from_hits,
    search_timing,
)
from .vocabulary import TOKEN_SELECTIONS, check_choice

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from .corpora import RetrievalData
    from .faiss_index import Hits

logger = logging.getLogger(__name__)

DEFAULT_TOKENS = "content"
"""The default token selection on both sides (why: docs/guide.md, "Design choices", row "MaxSim tokens")."""
SIDES = ("query", "document")
"""Which encoder of a model :func:`encode_token_states` runs (``encode_query`` or ``encode_document``)."""
INDEX_FORMAT = 4
"""Version of :meth:`TokenIndex.save`'s layout (3: one file; 4: a folder of :data:`TOKENS_FILE` and
:data:`METADATA_FILE`, which :func:`optical_hf.faiss_index.load_search_index` reads like a FAISS index's folder)."""
TOKENS_FILE, METADATA_FILE = "tokens.pt", "index.json"
"""The files of a saved :class:`TokenIndex` folder (``index.json`` is also a FAISS index folder's metadata file)."""
ENCODE_BLOCK = 1024
"""Texts encoded per ``encode`` call, so that only one block's padded token states are alive at a time."""


def _check_tokens(tokens: str, name: str) -> None:
    check_choice(tokens, TOKEN_SELECTIONS, name)


@dataclass
class TokenIndex:
    """Passage token vectors for MaxSim: L2-normalised, fp16, concatenated, every value finite.

    Attributes:
        vectors: ``(total_tokens, dim)`` fp16; passage ``i`` is ``vectors[offsets[i]:offsets[i + 1]]``.
        offsets: ``(num_passages + 1,)`` int64, starting at 0, strictly increasing (no passage is empty).
        ids: ``num_passages`` passage ids.
        built_by: what encoded the passages (:func:`build_index` fills it): ``{"model": name or path,
            "fingerprint": model_fingerprint, "prompt": document prompt, "tokens": token selection}``; ``{}`` for an
            index made from token states directly. :func:`check_index` compares it with the model in use.
    """

    vectors: Tensor
    offsets: Tensor
    ids: list[str]
    built_by: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.dtype != torch.float16 or self.vectors.ndim != 2:
            raise ValueError(f"TokenIndex.vectors must be (total_tokens, dim) fp16, got {self.vectors.dtype} "
                             f"{tuple(self.vectors.shape)}")
        offsets = self.offsets
        if (offsets.ndim != 1 or len(offsets) != len(self.ids) + 1 or offsets[0] != 0
                or offsets[-1] != len(self.vectors) or bool((offsets.diff() <= 0).any())):
            raise ValueError(f"TokenIndex.offsets must be (num_passages + 1,) from 0 to {len(self.vectors)} with no "
                             f"empty passage, got {offsets.tolist()[:10]}... for {len(self.ids)} ids")
        bad = ~torch.isfinite(self.vectors).all(dim=1)
        if bool(bad.any()):
            passages = torch.searchsorted(offsets, bad.nonzero()[:, 0], right=True) - 1
            names = [self.ids[i] for i in passages.unique().tolist()]
            raise ValueError(f"TokenIndex: {int(bad.sum())} token vector(s) are NaN or infinite, in passage(s) "
                             f"{names[:3]}{' ...' if len(names) > 3 else ''}")

    @classmethod
    def from_token_states(cls, states: Sequence[Tensor], ids: Sequence[str] | None = None) -> TokenIndex:
        """Index per-passage token states ``(n_tokens_i, dim)`` (any float dtype): normalised, then stored in fp16.

        ``ids`` default to ``"0", "1", ...``; a passage without tokens, or with a NaN or infinite state, is an error
        naming it.
        """
        ids = [str(i) for i in range(len(states))] if ids is None else list(ids)
        if len(ids) != len(states) or not states:
            raise ValueError(f"TokenIndex: {len(ids)} ids for {len(states)} passages (need one id per passage, >= 1)")
        empty = [pid for pid, state in zip(ids, states) if len(state) == 0]
        if empty:
            raise ValueError(f"TokenIndex: passage(s) {empty[:3]} have no tokens")
        lengths = torch.tensor([len(state) for state in states])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        vectors = torch.empty(int(offsets[-1]), states[0].shape[-1], dtype=torch.float16)
        for start, end, state in zip(offsets[:-1].tolist(), offsets[1:].tolist(), states):
            vectors[start:end] = _normalise(state)  # one passage in fp32 at a time
        return cls(vectors, offsets, ids)

    kind: ClassVar[str] = "maxsim"

    @property
    def num_passages(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(self, queries: Sequence[Tensor], top_k: int = 10, **chunking: int) -> Hits:
        """Exact MaxSim (:func:`maxsim_topk`) of per-query token states ``(n_tokens_i, dim)``, in the shape of every
        search index (:data:`optical_hf.faiss_index.Hits`); ``chunking``: ``query_chunk_size``, ``token_chunk_size``."""
        scores, positions = maxsim_topk(queries, self, top_k=top_k, **chunking)
        return hits(scores.tolist(), positions.tolist(), self.ids)

    def add(self, states: Sequence[Tensor], ids: Sequence[str]) -> None:
        """Append passages given their token states ``(n_tokens_i, dim)`` (normalised and stored in fp16); an id
        already in the index is an error naming it."""
        added = TokenIndex.from_token_states(states, ids)
        taken = sorted(set(added.ids) & set(self.ids))
        if taken or added.dim != self.dim:
            raise OpticalInputError(f"TokenIndex.add: ids {taken[:3]} are already indexed" if taken else
                                    f"TokenIndex.add: token dim {added.dim}, the index {self.dim}")
        self.vectors = torch.cat([self.vectors, added.vectors])
        self.offsets = torch.cat([self.offsets, added.offsets[1:] + self.offsets[-1]])
        self.ids = self.ids + added.ids

    def remove(self, ids: Sequence[str]) -> None:
        """Drop the passages ``ids`` (an id not in the index, or removing every passage, is an error)."""
        drop = set(ids)
        unknown = sorted(drop - set(self.ids))
        if unknown or len(drop) >= self.num_passages:
            raise OpticalInputError(f"TokenIndex.remove: ids {unknown[:3]} are not in the index" if unknown else
                                    "TokenIndex.remove: cannot remove every passage")
        keep = torch.tensor([pid not in drop for pid in self.ids])
        lengths = self.offsets.diff()
        self.vectors = self.vectors[torch.repeat_interleave(keep, lengths)]
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths[keep].cumsum(0)])
        self.ids = [pid for pid in self.ids if pid not in drop]

    def pooled(self, factor: float) -> TokenIndex:
        """A smaller index by token pooling (Clavié, Chaffin & Adams 2024, arXiv 2409.14683): each passage's ``n``
        tokens are grouped by Ward hierarchical clustering into ``ceil(n / factor)`` clusters (scipy), and each
        cluster is replaced by its mean, renormalised. Ids are kept; ``built_by`` records ``pool_factor``.
        ``factor`` >= 1 (1: a copy)."""
        from scipy.cluster.hierarchy import fcluster, linkage

        if not factor >= 1:
            raise OpticalInputError(f"TokenIndex.pooled: factor must be >= 1, got {factor}")
        passages = []
        for start, end in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist()):
            tokens = self.vectors[start:end].float()
            clusters = math.ceil(len(tokens) / factor)
            if clusters < len(tokens):
                labels = torch.from_numpy(fcluster(linkage(tokens.numpy(), method="ward"), clusters,
                                                   criterion="maxclust")).long() - 1
                sums = torch.zeros(int(labels.max()) + 1, tokens.shape[1]).index_add_(0, labels, tokens)
                tokens = sums[torch.bincount(labels) > 0]  # a mean's direction is its sum's; renormalised below
            passages.append(tokens.half())  # fp16 until from_token_states normalises: half the peak memory
        index = TokenIndex.from_token_states(passages, self.ids)
        index.built_by = {**self.built_by, "pool_factor": factor} if self.built_by else {}
        return index

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the index tensors: ``total_tokens * dim * 2`` (fp16) + ``8 * (num_passages + 1)`` (offsets)."""
        return sum(tensor.nelement() * tensor.element_size() for tensor in (self.vectors, self.offsets))

    def checksum(self) -> str:
        """blake2b of the vectors, offsets and ids: :meth:`load` recomputes it to detect a damaged file."""
        hasher = hashlib.blake2b(digest_size=16)
        hash_tensor(hasher, "vectors", self.vectors)
        hash_tensor(hasher, "offsets", self.offsets)
        hasher.update("\n".join(self.ids).encode("utf-8"))
        return hasher.hexdigest()

    def save(self, folder: str | Path) -> None:
        """Write the index as a folder that can sit beside the model: :data:`TOKENS_FILE` (the fp16 vectors and the
        offsets, ``torch.save``) and :data:`METADATA_FILE` (format, kind, dim, sizes, ids, what built it and the
        checksum). The folder is created if needed; its two files are replaced (each written aside, then renamed
        over the old one: an index mapped from them, ``load(mmap=True)``, stays valid), nothing else is touched."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        metadata = {"format": INDEX_FORMAT, "engine": "exact", "kind": self.kind, "dim": self.dim,
                    "num_passages": self.num_passages, "num_tokens": len(self.vectors), "built_by": self.built_by,
                    "checksum": self.checksum(), "ids": self.ids}
        tokens, meta = folder / f"{TOKENS_FILE}.tmp", folder / f"{METADATA_FILE}.tmp"
        torch.save({"vectors": self.vectors, "offsets": self.offsets}, tokens)
        meta.write_text(json.dumps(metadata, ensure_ascii=False), encoding="utf-8")
        tokens.replace(folder / TOKENS_FILE)
        meta.replace(folder / METADATA_FILE)

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = False) -> TokenIndex:
        """Read a folder written by :meth:`save`. ``mmap=True`` maps :data:`TOKENS_FILE` instead of reading it (pages
        are read when a search touches them: an index larger than memory). A folder that is not one, a missing key,
        or a checksum or values that are wrong (a damaged file) is an :class:`OpticalInputError` naming it."""
        folder = Path(folder)
        try:
            metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
            state = torch.load(folder / TOKENS_FILE, weights_only=True, mmap=mmap)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
            raise OpticalInputError(f"{folder}: not a TokenIndex folder ({type(err).__name__}: {err})") from err
        if not isinstance(metadata, dict) or metadata.get("format") != INDEX_FORMAT or metadata.get("engine") != "exact":
            raise OpticalInputError(f"{folder}: not a TokenIndex folder of format {INDEX_FORMAT} (written by "
                                    "TokenIndex.save); build the index again")
        missing = [key for key in ("ids", "built_by", "checksum") if key not in metadata] + [
            key for key in ("vectors", "offsets") if not isinstance(state, dict) or key not in state]
        if missing:
            raise OpticalInputError(f"{folder}: the TokenIndex lacks {', '.join(missing)}; build the index again")
        try:
            index = cls(state["vectors"], state["offsets"], list(metadata["ids"]), dict(metadata["built_by"]))
        except (TypeError, ValueError) as err:
            raise OpticalInputError(f"{folder}: damaged TokenIndex ({' '.join(str(err).split())}); build it again") from err
        if index.checksum() != metadata["checksum"]:
            raise OpticalInputError(f"{folder}: the TokenIndex checksum does not match its content (a damaged file); "
                                    "build the index again")
        return index


def hits(scores: Sequence[Sequence[float]], positions: Sequence[Sequence[int]], ids: Sequence[str]) -> Hits:
    """Per-query ``scores`` and passage ``positions`` (best first) as :data:`optical_hf.faiss_index.Hits`; a negative
    position (FAISS's "no result") is left out."""
    return [[{"corpus_id": int(p), "score": float(s), "id": ids[int(p)]} for s, p in zip(row_s, row_p) if p >= 0]
            for row_s, row_p in zip(scores, positions)]


def check_index(index: Any, model: SentenceTransformer, *, prompt: str | None, tokens: str | None,
                where: str = "the index") -> None:
    """Raise :class:`OpticalInputError` saying what differs when ``index`` (any search index: a
    :class:`TokenIndex`, a FAISS or Qdrant index) was not built by ``model`` (its
    :func:`~optical_hf.fingerprint.model_fingerprint`) with the document ``prompt`` and token selection ``tokens``
    (``None`` for a dense index) in use now. An index without ``built_by`` (made from vectors directly) is not
    checked."""
    if not index.built_by:
        return
    expected = {"fingerprint": model_fingerprint(model), "prompt": prompt, "tokens": tokens}
    differs = [f"{key} {index.built_by.get(key)!r} (in use: {value!r})" for key, value in expected.items()
               if index.built_by.get(key) != value]
    dim = model.get_embedding_dimension()
    if dim is not None and index.dim != dim:
        differs.append(f"dim {index.dim} (in use: {dim})")
    if differs:
        raise OpticalInputError(f"{where} was built by {index.built_by.get('model')!r} with other settings than the "
                                f"document model in use: {'; '.join(differs)}; build the index again with it")


def _normalise(states: Tensor) -> Tensor:
    """``(n, dim)`` rows L2-normalised in float32."""
    return torch.nn.functional.normalize(states.float(), dim=-1)


def pad_queries(states: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-query token states ``(n_tokens_i, dim)`` as ``(n_q, q_len, dim)`` L2-normalised float32 (zero padding)
    and a ``(n_q, q_len)`` bool mask of the real tokens."""
    empty = [i for i, state in enumerate(states) if len(state) == 0]
    if empty or not states:
        raise ValueError(f"pad_queries: need >= 1 query, each with tokens; queries {empty[:3]} have none")
    padded = torch.nn.utils.rnn.pad_sequence([_normalise(state) for state in states], batch_first=True)
    lengths = torch.tensor([len(state) for state in states])
    return padded, torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)


def _chunk_maxima(
    queries: Tensor, index: TokenIndex, start: int, end: int, query_chunk_size: int
) -> tuple[Tensor, int]:
    """Per-passage max similarity of every query token over the index tokens ``[start, end)`` (a segment max by
    passage), the chunk converted to float32 once and scored ``query_chunk_size`` queries at a time.

    Args:
        queries: ``(n_q, q_len, dim)`` normalised float32.

    Returns:
        ``(n_q * q_len, n_passages_touched)`` float32 maxima and the index of the first passage touched.
    """
    passage_of_token = torch.searchsorted(index.offsets, torch.arange(start, end), right=True) - 1
    first = int(passage_of_token[0])
    local = passage_of_token - first
    chunk = index.vectors[start:end].float().T  # (dim, end - start): only this chunk in float32
    maxima = []
    for q in range(0, len(queries), query_chunk_size):
        sims = queries[q:q + query_chunk_size].flatten(0, 1) @ chunk  # (chunk_queries * q_len, end - start)
        part = torch.full((len(sims), int(local[-1]) + 1), -torch.inf)
        maxima.append(part.scatter_reduce_(1, local.expand(len(sims), -1), sims, reduce="amax"))
    return torch.cat(maxima), first


def maxsim_topk(
    query_states: Sequence[Tensor],
    index: TokenIndex,
    *,
    top_k: int = 100,
    query_chunk_size: int = 64,
    token_chunk_size: int = 8192,
) -> tuple[Tensor, Tensor]:
    """Exact MaxSim top-k of each query over the passages of ``index``, on CPU.

    The index is scanned ``token_chunk_size`` tokens at a time (a chunk may split a passage: its running max is carried
    to the next chunk), each chunk converted to float32 once and scored against ``query_chunk_size`` queries at a time
    (similarities ``(query_chunk_size * q_len, token_chunk_size)``); a running top-k is kept per query.

    Args:
        query_states: per-query token states ``(n_tokens_i, dim)``, normalised here.
        index: the passages.
        top_k: passages kept per query (capped at ``index.num_passages``).
        query_chunk_size: queries per similarity product.
        token_chunk_size: index tokens converted to float32 per step.

    Returns:
        ``(scores, passage_indices)``, both ``(n_q, min(top_k, num_passages))``, best first per row.
    """
    if top_k < 1 or query_chunk_size < 1 or token_chunk_size < 1:
        raise ValueError(f"maxsim_topk: top_k, query_chunk_size, token_chunk_size must be >= 1, got {top_k}, "
                         f"{query_chunk_size}, {token_chunk_size}")
    queries, mask = pad_queries(query_states)
    if queries.shape[-1] != index.vectors.shape[1]:
        raise ValueError(f"maxsim_topk: query tokens have dim {queries.shape[-1]}, the index {index.vectors.shape[1]}")
    n_q, q_len, _ = queries.shape
    k = min(top_k, index.num_passages)
    best_scores, best_ids = torch.full((n_q, 0), -torch.inf), torch.zeros((n_q, 0), dtype=torch.long)
    carry = None  # (n_q * q_len,) running max of the passage split by the previous chunk's end
    with torch.inference_mode():
        for start in range(0, len(index.vectors), token_chunk_size):
            end = min(start + token_chunk_size, len(index.vectors))
            maxima, first = _chunk_maxima(queries, index, start, end, query_chunk_size)
            if carry is not None:
                maxima[:, 0] = torch.maximum(maxima[:, 0], carry)
            last_complete = bool(index.offsets[first + maxima.shape[1]] == end)
            carry = None if last_complete else maxima[:, -1]
            maxima = maxima if last_complete else maxima[:, :-1]
            # (n_q, passages completed in this chunk): the sum over real query tokens
            scores = (maxima.view(n_q, q_len, maxima.shape[1]) * mask.unsqueeze(-1)).sum(1)
            ids = torch.arange(first, first + scores.shape[1]).expand(n_q, -1)
            best_scores, best_ids = torch.cat([best_scores, scores], 1), torch.cat([best_ids, ids], 1)
            best_scores, order = best_scores.topk(min(k, best_scores.shape[1]), dim=1)
            best_ids = best_ids.gather(1, order)
    return best_scores, best_ids


def maxsim_retrieve(
    query_states: Sequence[Tensor], index: TokenIndex, query_ids: Sequence[str] | None = None, *, top_k: int = 100,
    **chunking: int,
) -> Run:
    """:func:`maxsim_topk` as a run ``{qid: {passage_id: score}}`` (``query_ids`` default ``"0", "1", ...``);
    ``chunking``: ``query_chunk_size``, ``token_chunk_size``."""
    query_ids = [str(i) for i in range(len(query_states))] if query_ids is None else list(query_ids)
    if len(query_ids) != len(query_states):
        raise ValueError(f"maxsim_retrieve: {len(query_ids)} query ids for {len(query_states)} queries")
    return run_from_hits(index.search(query_states, top_k, **chunking), query_ids)


def encode_token_states(
    model: SentenceTransformer,
    texts: Sequence[str],
    *,
    side: str,
    prompt: str | None = None,
    tokens: str = DEFAULT_TOKENS,
    batch_size: int = 64,
    show_progress_bar: bool = False,
) -> list[Tensor]:
    """Token states of ``texts`` by ``model`` (``encode_query`` or ``encode_document``, so the model's own
    ``"query"``/``"document"`` prompt applies unless ``prompt`` is given), ``ENCODE_BLOCK`` texts per call.

    Args:
        side: ``"query"`` or ``"document"``.
        tokens: ``"content"`` tokens only (default) or ``"all"`` real tokens (:data:`TOKEN_SELECTIONS`).

    Returns:
        One ``(n_tokens_i, dim)`` float32 CPU tensor per text (unnormalised).
    """
    if side not in SIDES:
        raise OpticalInputError(f"encode_token_states: side must be one of {SIDES}, got {side!r}")
    _check_tokens(tokens, f"{side} tokens")
    encode = model.encode_query if side == "query" else model.encode_document
    special = special_token_ids(model.tokenizer) if tokens == "content" else []
    states: list[Tensor] = []
    for start in range(0, len(texts), ENCODE_BLOCK):
        outputs = encode(list(texts[start:start + ENCODE_BLOCK]), prompt=prompt, batch_size=batch_size,
                         show_progress_bar=show_progress_bar, output_value=None)
        states.extend(_selected_tokens(output, tokens, special) for output in outputs)
    return states


def _selected_tokens(output: dict[str, Any], tokens: str, special: list[int]) -> Tensor:
    """``(n, dim)`` float32 token states of one ``encode(output_value=None)`` item, padding (and, for ``"content"``,
    special and prompt tokens) removed."""
    if "attention_mask" not in output:
        raise OpticalInputError("MaxSim needs padded token states with an attention_mask; load the model without "
                                "flattened (unpadded) inputs")
    attention = output["attention_mask"].unsqueeze(0)
    keep = attention.bool()
    if tokens == "content":
        keep = content_mask(output["input_ids"].unsqueeze(0), attention, special, output.get("prompt_length"))
    return output["token_embeddings"][keep[0]].float().cpu()


def build_index(
    model: SentenceTransformer, passages: Sequence[str], ids: Sequence[str] | None = None, *,
    prompt: str | None = None, tokens: str = DEFAULT_TOKENS, batch_size: int = 64, show_progress_bar: bool = False,
) -> TokenIndex:
    """:class:`TokenIndex` of ``passages`` encoded by ``model`` (the teacher, ``encode_document``), fp16 block by
    block (only ``ENCODE_BLOCK`` passages' float32 token states are alive at a time)."""
    if not passages:
        raise OpticalInputError("build_index: the corpus is empty (no passage to index)")
    blocks = [
        TokenIndex.from_token_states(encode_token_states(
            model, passages[start:start + ENCODE_BLOCK], side="document", prompt=prompt, tokens=tokens,
            batch_size=batch_size, show_progress_bar=show_progress_bar,
        ))
        for start in range(0, len(passages), ENCODE_BLOCK)
    ]
    lengths = torch.cat([block.offsets.diff() for block in blocks])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = [str(i) for i in range(len(passages))] if ids is None else list(ids)
    return TokenIndex(torch.cat([block.vectors for block in blocks]), offsets, ids, built_by(model, prompt, tokens))


def built_by(model: SentenceTransformer, prompt: str | None, tokens: str | None) -> dict[str, Any]:
    """What a search index records about the model that encoded its passages (:func:`check_index` compares it):
    ``{"model": name or path, "fingerprint", "prompt": document prompt, "tokens": token selection or None (dense)}``."""
    return {"model": str(getattr(model, "model_card_data", None) and model.model_card_data.base_model
                         or getattr(model[0], "name_or_path", None) or type(model).__name__),
            "fingerprint": model_fingerprint(model), "prompt": prompt, "tokens": tokens}


class MaxSimCLIREvaluator(CLIREvaluator):
    """:class:`optical_hf.evaluation.CLIREvaluator` with late-interaction scoring: the evaluated model's (student's)
    query token states against the ``doc_model``'s (teacher's) passage token states, ranked by MaxSim.

    The teacher's :class:`TokenIndex` is built once, at the first call, and cached in :attr:`index` (or given
    prebuilt); each call encodes the queries, ranks the ``top_k`` passages exactly (:func:`maxsim_topk`) and scores
    them with ``pytrec_eval``.
    Metric keys, CSV file (``clir_evaluation_{name}_results.csv``), model-card storage and primary metric
    (``mrr@10``) are CLIREvaluator's. Index memory and query latency are logged at each call and kept in
    :attr:`last_timing` (``index_bytes``, ``encode_ms_per_query``, ``search_ms_per_query``).

    Args:
        data, doc_model, query_prompt, doc_prompt, batch_size, top_k, name, show_progress_bar, write_csv,
            use_translations: as for CLIREvaluator.
        query_tokens / doc_tokens: tokens taking part on each side, ``"content"`` (default, :data:`DEFAULT_TOKENS`)
            or ``"all"`` (:data:`TOKEN_SELECTIONS`).
        query_chunk_size / token_chunk_size: chunking of :func:`maxsim_topk`.
        index: a prebuilt index of exactly ``data.corpus``'s documents (e.g. :meth:`TokenIndex.load`), built by
            ``doc_model`` with ``doc_tokens``; default: built at the first call.
    """

    def __init__(
        self,
        data: RetrievalData,
        doc_model: SentenceTransformer,
        *,
        query_tokens: str = DEFAULT_TOKENS,
        doc_tokens: str = DEFAULT_TOKENS,
        query_chunk_size: int = 64,
        token_chunk_size: int = 8192,
        name: str = "clir-maxsim",
        index: TokenIndex | None = None,
        **kwargs: Any,
    ):
        _check_tokens(query_tokens, "query_tokens")
        _check_tokens(doc_tokens, "doc_tokens")
        super().__init__(data, doc_model, name=name, **kwargs)
        self._index = None if index is None else check_search_index(index, self, "maxsim", doc_tokens)
        self.query_tokens, self.doc_tokens = query_tokens, doc_tokens
        self.chunking = {"query_chunk_size": query_chunk_size, "token_chunk_size": token_chunk_size}

    @property
    def index(self) -> Any:
        """The teacher's token index of the corpus (exact, built on first access) or the search index given."""
        if self._index is None:
            logger.info("Encoding the token states of the %d documents with the document model (once)",
                        len(self.corpus))
            self._index = build_index(self.doc_model, self.corpus, self.corpus_ids, prompt=self.corpus_prompt,
                                      tokens=self.doc_tokens, batch_size=self.batch_size,
                                      show_progress_bar=self.show_progress_bar)
        return self._index

    def compute_all_metrics(self, model: SentenceTransformer) -> dict[str, float]:
        """Unprefixed :func:`optical_hf.evaluation.compute_metrics` of ``model``'s queries ranked by MaxSim."""
        index = self.index
        began = time.perf_counter()
        states = encode_token_states(model, self.queries, side="query", prompt=self.query_prompt,
                                     tokens=self.query_tokens, batch_size=self.batch_size,
                                     show_progress_bar=self.show_progress_bar)
        encoded = time.perf_counter()
        exact = {"query_chunk_size", "token_chunk_size"} if isinstance(index, TokenIndex) else set()
        run = run_from_hits(index.search(states, self.top_k, **{k: v for k, v in self.chunking.items() if k in exact}),
                            self.queries_ids)
        size = getattr(index, "memory_bytes", 0)
        self.last_timing = search_timing(size, len(states), began, encoded, time.perf_counter())
        logger.info("MaxSim (%s): index of %d passages, %.1f MiB; %.2f ms/query encoding, %.2f ms/query search",
                    type(index).__name__, index.num_passages, size / 2**20,
                    self.last_timing["encode_ms_per_query"], self.last_timing["search_ms_per_query"])
        self.last_per_query = per_query_metrics(self.qrels, run)
        self.last_ranks = first_relevant_ranks(self.qrels, run)
        return mean_metrics(self.last_per_query)

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "scoring": "maxsim", "query_tokens": self.query_tokens,
                "doc_tokens": self.doc_tokens}


def evaluate_clir_maxsim(
    query_model: SentenceTransformer, doc_model: SentenceTransformer, data: RetrievalData, **kwargs: Any
) -> dict[str, float]:
    """One :class:`MaxSimCLIREvaluator` run (the late-interaction :func:`optical_hf.evaluation.evaluate_clir`);
    ``kwargs`` are the evaluator's (``query_prompt``, ``doc_prompt``, ``query_tokens``, ``top_k``, ...).

    Returns:
        ``{"mrr@10", "ndcg@10", "map", "recall@1", "recall@10", "recall@100"}`` averaged over queries (unprefixed).
    """
    evaluator = MaxSimCLIREvaluator(data, doc_model, name="", write_csv=False, **kwargs)
    return evaluator(query_model)


def bitext_retrieval_maxsim(
    source_model: SentenceTransformer,
    target_model: SentenceTransformer,
    sources: Sequence[str],
    targets: Sequence[str],
    *,
    query_prompt: str | None = None,
    teacher_prompt: str | None = None,
    tokens: str = DEFAULT_TOKENS,
    batch_size: int = 64,
    show_progress_bar: bool = False,
) -> dict[str, float]:
    """Bitext retrieval by MaxSim: each source's tokens (``source_model.encode_query``) against the token index of
    all targets (``target_model.encode_document``); P@1 of finding its own translation.

    MaxSim is one-sided (query tokens look for their best document token), so only the source-to-target direction is
    scored: ``{"p@1_src2tgt", "p@1"}`` (the same value), the keys of
    :func:`optical_hf.evaluation.bitext_retrieval`'s dense scores.
    """
    if len(sources) != len(targets) or not sources:
        raise ValueError(f"bitext retrieval needs aligned, non-empty sources and targets, got {len(sources)} and "
                         f"{len(targets)}")
    # each side's prompt only (None: none), as the dense bitext scores do
    index = build_index(target_model, targets, prompt=teacher_prompt or "", tokens=tokens, batch_size=batch_size,
                        show_progress_bar=show_progress_bar)
    states = encode_token_states(source_model, sources, side="query", prompt=query_prompt or "", tokens=tokens,
                                 batch_size=batch_size, show_progress_bar=show_progress_bar)
    _, best = maxsim_topk(states, index, top_k=1)
    precision = float((best[:, 0] == torch.arange(len(sources))).float().mean())
    return {"p@1_src2tgt": precision, "p@1": precision}

