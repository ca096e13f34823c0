"""Search beyond one machine: a Qdrant collection as a search index, MaxSim through Qdrant's multivector
``MAX_SIM`` comparator (cosine: ``sum_i max_j cos(q_i, d_j)``, the score of
:class:`~optical_hf.late_interaction.TokenIndex`) or one dense vector per passage.

The collection records what built it in its metadata (``{"optical_hf": {"format", "kind", "built_by"}}``) so that
:func:`optical_hf.late_interaction.check_index` can refuse another teacher; each point's payload holds the passage id
(and its text when given). The same code runs on ``QdrantClient(":memory:")`` (local mode, the tests), a local path,
a server or a cluster (``QdrantClient(url=...)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .errors import OpticalInputError

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

    from .faiss_index import Hits
    from .late_interaction import TokenIndex

__all__ = ["QdrantIndex"]

METADATA_KEY, COLLECTION_FORMAT = "optical_hf", 1


class QdrantIndex:
    """An existing Qdrant collection written by :meth:`from_token_index` or :meth:`from_embeddings`.

    Args:
        client: any ``QdrantClient``.
        collection: the collection's name; one without optical_hf metadata is an :class:`OpticalInputError`.
    """

    def __init__(self, client: QdrantClient, collection: str):
        if not client.collection_exists(collection):
            raise OpticalInputError(f"Qdrant collection {collection!r} does not exist")
        info = client.get_collection(collection)
        metadata = (info.config.metadata or {}).get(METADATA_KEY)
        if not metadata or metadata.get("format") != COLLECTION_FORMAT:
            raise OpticalInputError(f"Qdrant collection {collection!r} was not written by optical_hf (no "
                                    f"{METADATA_KEY!r} metadata of format {COLLECTION_FORMAT})")
        self.client, self.collection = client, collection
        self.kind: str = metadata["kind"]
        self.built_by: dict[str, Any] = metadata["built_by"]
        self.dim: int = info.config.params.vectors.size

    @property
    def num_passages(self) -> int:
        return self.client.count(self.collection, exact=True).count

    @classmethod
    def from_token_index(cls, client: QdrantClient, collection: str, token_index: TokenIndex,
                         texts: Sequence[str] | None = None, *, batch_size: int = 64,
                         overwrite: bool = False) -> QdrantIndex:
        """Write ``token_index``'s passages as multivectors (one point per passage, its tokens as fp32 vectors)."""
        vectors = (token_index.vectors[start:end].float().numpy()
                   for start, end in zip(token_index.offsets[:-1].tolist(), token_index.offsets[1:].tolist()))
        return cls._write(client, collection, "maxsim", token_index.dim, token_index.built_by, token_index.ids,
                          vectors, texts, batch_size, overwrite)

    @classmethod
    def from_embeddings(cls, client: QdrantClient, collection: str, embeddings: Tensor | np.ndarray,
                        ids: Sequence[str] | None = None, texts: Sequence[str] | None = None, *,
                        built_by: dict[str, Any] | None = None, batch_size: int = 256,
                        overwrite: bool = False) -> QdrantIndex:
        """Write ``(num_passages, dim)`` sentence embeddings, one point each (cosine distance)."""
        embeddings = torch.as_tensor(embeddings).float()
        ids = [str(i) for i in range(len(embeddings))] if ids is None else [str(i) for i in ids]
        return cls._write(client, collection, "dense", embeddings.shape[1], built_by or {}, ids,
                          (row.numpy() for row in embeddings), texts, batch_size, overwrite)

    @classmethod
    def _write(cls, client: QdrantClient, collection: str, kind: str, dim: int, built_by: dict[str, Any],
               ids: list[str], vectors: Any, texts: Sequence[str] | None, batch_size: int,
               overwrite: bool) -> QdrantIndex:
        from qdrant_client import models

        if texts is not None and len(texts) != len(ids):
            raise OpticalInputError(f"Qdrant index: {len(texts)} texts for {len(ids)} passages")
        if client.collection_exists(collection):
            if not overwrite:
                raise OpticalInputError(f"Qdrant collection {collection!r} exists; pass overwrite=True to replace it")
            client.delete_collection(collection)
        multivector = models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
        client.create_collection(
            collection,
            vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE,
                                               multivector_config=multivector if kind == "maxsim" else None),
            metadata={METADATA_KEY: {"format": COLLECTION_FORMAT, "kind": kind, "built_by": built_by}},
        )
        points = (models.PointStruct(id=position, vector=vector.tolist(),
                                     payload={"id": pid, **({} if texts is None else {"text": texts[position]})})
                  for position, (pid, vector) in enumerate(zip(ids, vectors)))
        client.upload_points(collection, points, batch_size=batch_size, wait=True)
        return cls(client, collection)

    def search(self, queries: Sequence[Tensor] | Tensor, top_k: int = 10) -> Hits:
        """The ``top_k`` passages of each query: ``(n_tokens_i, dim)`` token states per query (MaxSim) or an
        ``(n_q, dim)`` embedding matrix (dense). ``corpus_id`` is the passage's position when it was written."""
        from qdrant_client import models

        requests = [models.QueryRequest(query=torch.as_tensor(query).float().tolist(), limit=top_k,
                                        with_payload=["id"]) for query in queries]
        responses = self.client.query_batch_points(self.collection, requests)
        return [[{"corpus_id": int(point.id), "score": float(point.score), "id": point.payload["id"]}
                 for point in response.points] for response in responses]
