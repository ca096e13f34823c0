"""Search at scale on one machine with FAISS: a dense index of sentence embeddings and an approximate MaxSim index of
token vectors, each saved as a folder (``index.faiss`` + ``index.json``) with the metadata of what built it.

Approximate MaxSim is the ColBERTv1 scheme (Khattab & Zaharia 2020): every passage token goes into one FAISS index
(default ``IVF<nlist>,PQ<m>np``: an inverted file of residual product-quantised codes, ``m`` bytes per token), with
token ids in passage order so that ``offsets`` map a token to its passage. A query's tokens each fetch their
``token_k`` nearest passage tokens (``nprobe`` lists probed); the passages they belong to are the candidates, ranked by
the sum over query tokens of the best similarity each found in the passage, and the best ``candidates`` of them are
scored by MaxSim over all their tokens: the exact fp16 tokens of the
:class:`~optical_hf.late_interaction.TokenIndex` kept beside the codes (default), or the tokens decoded from the codes
(``keep_exact=False``: no fp16 copy, a worse ranking). With every list probed and every candidate kept, the result
equals the exact scan of the ``TokenIndex`` (which stays the reference and the right choice for small corpora). FAISS has the approximate token search and the codes but no late-interaction
search, so the candidate step and the re-ranking are written here.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .errors import OpticalInputError
from .late_interaction import METADATA_FILE, DEFAULT_TOKENS, TokenIndex, build_index, built_by, hits
from .qdrant_index import QdrantIndex

if TYPE_CHECKING:
    import faiss
    from qdrant_client import QdrantClient

__all__ = ["FaissDenseIndex", "FaissMaxSimIndex", "Hits", "build_search_index", "default_factory", "load_search_index"]

Hits = list[list[dict[str, Any]]]
"""One list per query, best first, of ``{"corpus_id": position, "score": float, "id": stored passage id}`` (the
shape of ``sentence_transformers.util.semantic_search``, plus the stored id)."""
INDEX_FILE, EXACT_FOLDER = "index.faiss", "exact"
FOLDER_FORMAT = 2
"""Version of the folder layout written by :meth:`FaissDenseIndex.save` and :meth:`FaissMaxSimIndex.save` (2: the
exact tokens kept for re-ranking are a :class:`~optical_hf.late_interaction.TokenIndex` folder, ``exact/``)."""
FLAT_UP_TO = 50_000
"""Dense default: an exact ``Flat`` index up to this many passages, HNSW above."""
TRAIN_PER_LIST = 64
"""Training vectors per inverted list drawn by :meth:`FaissMaxSimIndex.from_token_index` (FAISS asks for >= 39)."""
MIN_TRAIN = 16_384
"""At least this many training vectors (all there are, if fewer): a product quantiser's 256 centroids per
sub-vector ask for >= 9,984."""


def _faiss() -> Any:
    import faiss  # imported on use: ``import optical_hf`` stays light

    return faiss


def default_factory(kind: str, count: int, dim: int) -> str:
    """The FAISS factory string used when the user names none, by corpus size.

    Dense (``count`` passages): ``"Flat"`` (exact) up to :data:`FLAT_UP_TO`, else ``"HNSW32"``. MaxSim (``count``
    tokens): ``"Flat"`` (exact) below :data:`MIN_TRAIN` tokens, else ``"IVF<nlist>,PQ<m>np"`` with ``nlist`` the power of two nearest ``sqrt(count)`` (at most
    ``count / TRAIN_PER_LIST``; FAISS's guideline is 4-16 times more lists, but training and assigning every token
    to them is the cost of building on a CPU) and ``m`` 32 code bytes per token (16 when ``dim`` is not a multiple
    of 32).
    """
    if kind == "dense":
        return "Flat" if count <= FLAT_UP_TO else "HNSW32"
    if count < MIN_TRAIN:  # too few tokens to train a quantiser: exact
        return "Flat"
    nlist = 2 ** round(math.log2(max(math.sqrt(count), 1)))
    nlist = max(1, min(nlist, count // TRAIN_PER_LIST))
    m = 32 if dim % 32 == 0 else 16
    if dim % m:
        raise OpticalInputError(f"default_factory: dim {dim} is not a multiple of 16; pass factory= explicitly")
    return f"IVF{nlist},PQ{m}np"


def _matrix(vectors: Tensor | np.ndarray, normalise: bool = True) -> np.ndarray:
    """``(n, dim)`` rows as contiguous float32, L2-normalised unless already (inner product = cosine)."""
    array = torch.as_tensor(vectors).float()
    return np.ascontiguousarray((torch.nn.functional.normalize(array, dim=-1) if normalise else array).numpy())


def _set_search_parameters(index: Any, nprobe: int | None, ef_search: int | None) -> None:
    faiss = _faiss()
    if nprobe is not None and _ivf(index) is not None:
        _ivf(index).nprobe = nprobe
    if ef_search is not None and isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = ef_search


def _ivf(index: Any) -> Any:
    try:
        return _faiss().extract_index_ivf(index)
    except RuntimeError:
        return None


@dataclass
class _FaissIndex:
    """What both FAISS indexes share: the index, the passage ids in position order, what built them
    (``built_by``, as :class:`~optical_hf.late_interaction.TokenIndex`'s) and the search parameters."""

    index: faiss.Index
    ids: list[str]
    built_by: dict[str, Any] = field(default_factory=dict)
    factory: str = ""
    nprobe: int = 16
    """Inverted lists probed per search vector (IVF factories)."""
    ef_search: int = 128
    """Candidate-list size of an HNSW search (HNSW factories)."""

    kind: ClassVar[str]

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def num_passages(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def memory_bytes(self) -> int:
        """Bytes of the serialised FAISS index (codes, lists, graph), what it holds in memory to within a few %;
        computed once, and again after :meth:`FaissMaxSimIndex.add`."""
        return int(_faiss().serialize_index(self.index).nbytes)

    def _metadata(self) -> dict[str, Any]:
        return {"format": FOLDER_FORMAT, "engine": "faiss", "kind": self.kind, "factory": self.factory, "dim": self.dim,
                "ids": self.ids, "built_by": self.built_by, "nprobe": self.nprobe, "ef_search": self.ef_search}

    def save(self, folder: str | Path) -> None:
        """Write ``index.faiss`` and ``index.json`` (kind, factory, ids, what built it, search parameters) to
        ``folder`` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(self.index, str(folder / INDEX_FILE))
        (folder / METADATA_FILE).write_text(json.dumps(self._metadata(), ensure_ascii=False), encoding="utf-8")

    def _queries(self, vectors: Tensor | np.ndarray) -> np.ndarray:
        """``(n, dim)`` normalised float32 query vectors; another ``dim`` than the index's is an error."""
        matrix = _matrix(vectors)
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise OpticalInputError(f"{type(self).__name__}: query vectors of shape {tuple(matrix.shape)}, the index "
                                    f"holds dim {self.dim} (built by {self.built_by.get('model', 'another model')})")
        return matrix


@dataclass
class FaissDenseIndex(_FaissIndex):
    """Dense search: cosine of L2-normalised sentence embeddings by FAISS inner product."""

    kind: ClassVar[str] = "dense"

    @classmethod
    def from_embeddings(cls, embeddings: Tensor | np.ndarray, ids: Sequence[str] | None = None, *,
                        factory: str | None = None, built_by: dict[str, Any] | None = None) -> FaissDenseIndex:
        """Index ``(num_passages, dim)`` embeddings (normalised here) with ``factory`` (default:
        :func:`default_factory`); ``ids`` default to ``"0", "1", ...``."""
        vectors = _matrix(embeddings)
        ids = _ids(ids, len(vectors))
        factory = factory or default_factory("dense", len(vectors), vectors.shape[1])
        index = _faiss().index_factory(vectors.shape[1], factory, _faiss().METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.add(vectors)
        return cls(index, ids, dict(built_by or {}), factory)

    def search(self, queries: Tensor | np.ndarray, top_k: int = 10) -> Hits:
        """The ``top_k`` passages of each ``(n_q, dim)`` query embedding."""
        _set_search_parameters(self.index, self.nprobe, self.ef_search)
        scores, positions = self.index.search(self._queries(queries), min(top_k, self.num_passages))
        return hits(scores.tolist(), positions.tolist(), self.ids)


@dataclass
class FaissMaxSimIndex(_FaissIndex):
    """Approximate MaxSim: candidate passages from approximate nearest-token search, then MaxSim on the candidates
    over their exact fp16 tokens (``exact`` kept) or their tokens decoded from the codes (the module docstring).

    Attributes:
        offsets: ``(num_passages + 1,)`` int64: passage ``i`` holds tokens ``offsets[i]:offsets[i + 1]``.
        token_k: nearest passage tokens fetched per query token.
        candidates: passages re-ranked by MaxSim per query.
        exact: the exact token index the candidates are re-ranked with (``TokenIndex``, fp16); ``None``: re-rank
            over the tokens decoded from the codes, which needs no fp16 copy but ranks worse (product-quantised
            similarities are noisy, and the max over a passage's tokens favours the noise: measured in
            ``benchmarks/results/search.md``).
    """

    offsets: Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))
    token_k: int = 64
    candidates: int = 256
    exact: TokenIndex | None = None

    kind: ClassVar[str] = "maxsim"

    @classmethod
    def from_token_index(cls, token_index: TokenIndex, *, factory: str | None = None, keep_exact: bool = True,
                         seed: int = 0, block: int = 65_536) -> FaissMaxSimIndex:
        """Train ``factory`` (default: :func:`default_factory`) on a seeded sample of ``token_index``'s vectors
        (:data:`TRAIN_PER_LIST` per inverted list, at most all) and add every token, ``block`` at a time; ids and
        ``built_by`` are the token index's, kept for exact re-ranking unless ``keep_exact=False``."""
        faiss = _faiss()
        total, dim = token_index.vectors.shape
        factory = factory or default_factory("maxsim", total, dim)
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            lists = _ivf(index).nlist if _ivf(index) is not None else 1
            size = max(TRAIN_PER_LIST * lists, MIN_TRAIN)
            sample = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:size]
            index.train(_matrix(token_index.vectors[sample.sort().values], normalise=False))
        if _ivf(index) is not None and not keep_exact:
            _ivf(index).make_direct_map()  # token id -> its code, for decoding the candidates' tokens
        _add_tokens(index, token_index.vectors, block)
        return cls(index, list(token_index.ids), dict(token_index.built_by), factory,
                   offsets=token_index.offsets.clone(), exact=token_index if keep_exact else None)

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.ids) + 1 or int(self.offsets[-1]) != self.index.ntotal:
            raise OpticalInputError(f"FaissMaxSimIndex: offsets end at {int(self.offsets[-1])} for "
                                    f"{len(self.offsets) - 1} passages; the FAISS index holds {self.index.ntotal} "
                                    f"tokens of {len(self.ids)} ids")

    def _metadata(self) -> dict[str, Any]:
        return {**super()._metadata(), "offsets": self.offsets.tolist(), "token_k": self.token_k,
                "candidates": self.candidates, "exact": self.exact is not None}

    def save(self, folder: str | Path) -> None:
        """:meth:`_FaissIndex.save`, plus the exact token index (``exact/``, :meth:`TokenIndex.save`) if kept."""
        super().save(folder)
        if self.exact is not None:
            self.exact.save(Path(folder) / EXACT_FOLDER)

    @functools.cached_property
    def memory_bytes(self) -> int:
        """The FAISS index's bytes plus the exact fp16 tokens' if kept."""
        return super().memory_bytes + (0 if self.exact is None else self.exact.memory_bytes)

    def add(self, tokens: TokenIndex, block: int = 65_536) -> None:
        """Append the passages of ``tokens`` (a :class:`~optical_hf.late_interaction.TokenIndex`, e.g. one chunk of a
        corpus too large to hold as one), encoded by the quantiser trained at :meth:`from_token_index`, ``block``
        tokens at a time; to the exact tokens too when kept (the ``TokenIndex`` given to :meth:`from_token_index`,
        which therefore grows with it). Built chunk by chunk with ``keep_exact=False``, the
        index never holds more fp16 tokens than one chunk's. An id already indexed, another dim, or tokens built
        otherwise (``built_by``: teacher, prompt, token selection, pooling) is an error."""
        taken = sorted(set(tokens.ids).intersection(self.ids))
        if taken or tokens.dim != self.dim or tokens.built_by != self.built_by:
            raise OpticalInputError(
                f"FaissMaxSimIndex.add: ids {taken[:3]} are already indexed" if taken else
                f"FaissMaxSimIndex.add: token dim {tokens.dim}, the index {self.dim}" if tokens.dim != self.dim else
                f"FaissMaxSimIndex.add: tokens built by {tokens.built_by}, the index by {self.built_by}")
        _add_tokens(self.index, tokens.vectors, block)
        if self.exact is not None:
            self.exact.add([tokens.vectors[s:e] for s, e in zip(tokens.offsets[:-1], tokens.offsets[1:])], tokens.ids)
        self.offsets = torch.cat([self.offsets, tokens.offsets[1:] + self.offsets[-1]])
        self.ids = self.ids + list(tokens.ids)
        self.__dict__.pop("memory_bytes", None)  # measured again on next use

    def search(self, queries: Sequence[Tensor], top_k: int = 10) -> Hits:
        """The ``top_k`` passages of each query, given its ``(n_tokens_i, dim)`` token states (normalised here); fewer
        when the token search found fewer passages (raise ``token_k`` or ``nprobe``)."""
        _set_search_parameters(self.index, self.nprobe, self.ef_search)
        lengths = [len(q) for q in queries]
        if not queries or min(lengths) == 0:
            raise ValueError("FaissMaxSimIndex.search: need >= 1 query, each with tokens")
        tokens = self._queries(torch.cat([torch.as_tensor(q) for q in queries]))
        similarities, token_ids = self.index.search(tokens, min(self.token_k, self.index.ntotal))
        passages = np.searchsorted(self.offsets.numpy(), token_ids, side="right") - 1
        hits, start = [], 0
        for length in lengths:
            rows = slice(start, start + length)
            hits.append(self._rerank(tokens[rows], similarities[rows], token_ids[rows], passages[rows], top_k))
            start += length
        return hits

    def _rerank(self, query: np.ndarray, similarities: np.ndarray, token_ids: np.ndarray, passages: np.ndarray,
                top_k: int) -> list[dict[str, Any]]:
        """MaxSim of one query (``(q_len, dim)``) over its best candidates.

        ``similarities``/``token_ids``/``passages``: ``(q_len, token_k)`` from the token search (id -1: none).
        """
        found = token_ids >= 0
        candidates, column = np.unique(passages[found], return_inverse=True)
        # approximate score per candidate: each query token's best similarity found in it, summed
        best = np.zeros((len(query), len(candidates)), dtype=np.float32)
        rows = np.nonzero(found)[0]
        np.maximum.at(best, (rows, column), np.maximum(similarities[found], 0))
        keep = candidates[np.argsort(-best.sum(0), kind="stable")[:self.candidates]]
        starts, ends = self.offsets[keep].numpy(), self.offsets[keep + 1].numpy()
        token_range = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
        if self.exact is not None:
            decoded = self.exact.vectors[torch.from_numpy(token_range)].float().numpy()
        else:  # unit norm, as encoded
            decoded = _matrix(self.index.reconstruct_batch(token_range.astype(np.int64)))
        owner = torch.from_numpy(np.repeat(np.arange(len(keep)), ends - starts))
        sims = torch.from_numpy(query) @ torch.from_numpy(decoded).T  # (q_len, candidate tokens)
        maxima = torch.full((len(query), len(keep)), -torch.inf).scatter_reduce_(
            1, owner.expand(len(query), -1), sims, reduce="amax")
        scores, order = maxima.sum(0).topk(min(top_k, len(keep)))
        return hits([scores.tolist()], [keep[order.numpy()].tolist()], self.ids)[0]


def _add_tokens(index: Any, vectors: Tensor, block: int) -> None:
    """Add ``(n, dim)`` normalised fp16 token vectors to ``index``, ``block`` rows at a time in float32."""
    for start in range(0, len(vectors), block):
        index.add(_matrix(vectors[start:start + block], normalise=False))  # stored normalised


def _ids(ids: Sequence[str] | None, count: int) -> list[str]:
    ids = [str(i) for i in range(count)] if ids is None else [str(i) for i in ids]
    if len(ids) != count or len(set(ids)) != count:
        raise OpticalInputError(f"index: need {count} distinct passage ids, got {len(ids)} ({len(set(ids))} distinct)")
    return ids


def load_search_index(folder: str | Path, mmap: bool = False) -> TokenIndex | FaissDenseIndex | FaissMaxSimIndex:
    """Read a folder written by any index's ``save``: an exact :class:`~optical_hf.late_interaction.TokenIndex` or a
    FAISS index of the kind it records, with its ids, metadata and search parameters. ``mmap``: map the exact fp16
    tokens (a ``TokenIndex``, or those a FAISS MaxSim index re-ranks with) instead of reading them. A folder that is
    not one (missing file, other format) is an :class:`OpticalInputError` naming it."""
    folder = Path(folder)
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise OpticalInputError(f"{folder}: not a saved search index ({type(err).__name__}: {err})") from err
    if isinstance(metadata, dict) and metadata.get("engine") == "exact":
        return TokenIndex.load(folder, mmap=mmap)
    if (not isinstance(metadata, dict) or metadata.get("engine") != "faiss" or metadata.get("format") != FOLDER_FORMAT
            or metadata.get("kind") not in ("dense", "maxsim")):
        raise OpticalInputError(f"{folder}: {METADATA_FILE} is not format {FOLDER_FORMAT} of a FAISS dense or maxsim "
                                "index, nor a TokenIndex; build the index again")
    required = ("ids", "built_by", "factory", "nprobe", "ef_search",
                *(("offsets", "token_k", "candidates", "exact") if metadata["kind"] == "maxsim" else ()))
    missing = [key for key in required if key not in metadata]
    if missing:
        raise OpticalInputError(f"{folder}: {METADATA_FILE} lacks {', '.join(missing)}; save the index again")
    try:
        index = _faiss().read_index(str(folder / INDEX_FILE))
    except (OSError, RuntimeError) as err:
        raise OpticalInputError(f"{folder}: no readable {INDEX_FILE} ({type(err).__name__}: {err})") from err
    common = {"built_by": metadata["built_by"], "factory": metadata["factory"], "nprobe": metadata["nprobe"],
              "ef_search": metadata["ef_search"]}
    if metadata["kind"] == "dense":
        return FaissDenseIndex(index, metadata["ids"], **common)
    exact = TokenIndex.load(folder / EXACT_FOLDER, mmap=mmap) if metadata["exact"] else None
    return FaissMaxSimIndex(index, metadata["ids"], **common, offsets=torch.tensor(metadata["offsets"]),
                            token_k=metadata["token_k"], candidates=metadata["candidates"], exact=exact)


def build_search_index(
    model: Any, texts: Sequence[str], ids: Sequence[str] | None = None, *, scoring: str, prompt: str | None = None,
    tokens: str | None = None, factory: str | None = None, batch_size: int = 64, show_progress_bar: bool = False,
    qdrant: tuple[QdrantClient, str] | None = None,
) -> FaissDenseIndex | FaissMaxSimIndex | QdrantIndex:
    """Encode ``texts`` with ``model`` (the teacher or a pair folder: ``encode_document``, its document prompt unless
    ``prompt``) and index them: sentence embeddings for ``scoring="dense"``, token vectors (``tokens`` selection,
    default ``"content"``) for ``"maxsim"``. The engine is FAISS ``factory`` (default: :func:`default_factory`), or,
    with ``qdrant=(client, collection)``, a new Qdrant collection (:class:`~optical_hf.qdrant_index.QdrantIndex`,
    with the texts as payload; ``factory`` does not apply). The index records what built it
    (:func:`optical_hf.late_interaction.built_by`)."""
    if qdrant is not None and factory is not None:
        raise OpticalInputError("build_search_index: factory is a FAISS option; a Qdrant collection takes none")
    if scoring == "maxsim":
        token_index = build_index(model, texts, ids, prompt=prompt, tokens=tokens or DEFAULT_TOKENS,
                                  batch_size=batch_size, show_progress_bar=show_progress_bar)
        if qdrant is not None:
            return QdrantIndex.from_token_index(*qdrant, token_index, texts=list(texts))
        return FaissMaxSimIndex.from_token_index(token_index, factory=factory)
    embeddings = model.encode_document(list(texts), convert_to_tensor=True, batch_size=batch_size,
                                       show_progress_bar=show_progress_bar, **({} if prompt is None else {"prompt": prompt}))
    if qdrant is not None:
        return QdrantIndex.from_embeddings(*qdrant, embeddings.cpu(), ids, texts=list(texts),
                                           built_by=built_by(model, prompt, None))
    return FaissDenseIndex.from_embeddings(embeddings.cpu(), ids, factory=factory,
                                           built_by=built_by(model, prompt, None))
