"""Cross-lingual retrieval and bitext-mining evaluation, on sentence-transformers' building blocks.

Two protocols (``shared/README.md``):

* CLIR: queries in a low-resource language are encoded by the student, English documents by the frozen English teacher,
  and documents are ranked by cosine similarity (:class:`CLIREvaluator`, a sentence-transformers
  ``InformationRetrievalEvaluator``; :func:`evaluate_clir` runs it once). On AfriQA this is the closed "gold-pool"
  setup of :func:`optical_hf.corpora.load_afriqa_gold`, not AfriQA's official open-retrieval task. The translation
  oracle encodes the human English translations of the queries with the teacher (``use_translations=True``); the
  zero-shot floor is the teacher (or untrained student) on the native queries.
* Bitext mining (FLORES): each sentence retrieves its translation among all candidate translations, P@1 both ways
  (:class:`BitextRetrievalEvaluator`; :func:`bitext_retrieval` runs it once).

Ranking is ``sentence_transformers.util.semantic_search`` (:func:`retrieve`); ranking metrics are computed by
``pytrec_eval`` (trec_eval, :func:`compute_metrics`), never by hand-written formulas.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pytrec_eval
import torch
from sentence_transformers.base.evaluation import BaseEvaluator
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.util import cos_sim, semantic_search

from optical_hf.corpora import RetrievalData
from optical_hf.errors import OpticalInputError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]
"""A ranking: ``qid -> {docid: score}`` (higher score = better)."""

#: Reported metric name -> trec_eval measure. ``mrr@10`` is ``recip_rank`` on the run cut to its top 10 documents.
TREC_MEASURES: dict[str, str] = {
    "mrr@10": "recip_rank",
    "ndcg@10": "ndcg_cut_10",
    "map": "map",
    "recall@1": "recall_1",
    "recall@10": "recall_10",
    "recall@100": "recall_100",
}
MRR_CUTOFF = 10


def retrieve(
    query_embeddings: torch.Tensor | np.ndarray,
    doc_embeddings: torch.Tensor | np.ndarray,
    query_ids: Sequence[str] | None = None,
    doc_ids: Sequence[str] | None = None,
    *,
    top_k: int = 100,
    query_chunk_size: int = 100,
) -> Run:
    """Exact dense retrieval by cosine similarity with ``sentence_transformers.util.semantic_search``.

    Scores are computed in float32 on ``doc_embeddings``' device, ``query_chunk_size`` queries at a time.

    Args:
        query_embeddings: ``(num_queries, dim)``.
        doc_embeddings: ``(num_docs, dim)``.
        query_ids: ``num_queries`` ids (default ``"0", "1", ...``).
        doc_ids: ``num_docs`` ids (default ``"0", "1", ...``).
        top_k: documents kept per query (capped at ``num_docs``).
        query_chunk_size: queries scored per matrix product.

    Returns:
        ``{qid: {docid: cosine}}`` with the ``min(top_k, num_docs)`` best documents of each query, best first.
    """
    queries, docs = torch.as_tensor(query_embeddings).float(), torch.as_tensor(doc_embeddings).float()
    if queries.ndim != 2 or docs.ndim != 2 or queries.shape[1] != docs.shape[1]:
        raise ValueError(
            f"retrieve: expected (num_queries, dim) and (num_docs, dim) embeddings, got {tuple(queries.shape)} "
            f"and {tuple(docs.shape)}"
        )
    query_ids = [str(i) for i in range(len(queries))] if query_ids is None else list(query_ids)
    doc_ids = [str(i) for i in range(len(docs))] if doc_ids is None else list(doc_ids)
    if len(query_ids) != len(queries) or len(doc_ids) != len(docs):
        raise ValueError(
            f"retrieve: {len(query_ids)} query ids for {len(queries)} query embeddings, "
            f"{len(doc_ids)} doc ids for {len(docs)} doc embeddings"
        )
    if top_k < 1:
        raise ValueError(f"retrieve: top_k must be >= 1, got {top_k}")
    hits = semantic_search(queries, docs, query_chunk_size=query_chunk_size, top_k=top_k, score_function=cos_sim)
    return {
        qid: {doc_ids[hit["corpus_id"]]: hit["score"] for hit in query_hits} for qid, query_hits in zip(query_ids, hits)
    }


def _trec_order(ranking: Mapping[str, float]) -> list[tuple[str, float]]:
    """Documents in trec_eval's order: score descending, ties broken by docid descending."""
    return sorted(ranking.items(), key=lambda item: (item[1], item[0]), reverse=True)


def per_query_metrics(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]]:
    """Ranking metrics of ``run`` against ``qrels`` for each query, computed by ``pytrec_eval``.

    Every query of ``qrels`` with at least one relevant (relevance > 0) document counts; a query missing from ``run``
    scores 0. ``mrr@10`` is trec_eval's ``recip_rank`` on the run cut to its top 10; ``map`` and ``recall@100`` are
    bounded by the depth of ``run`` (100 documents for :func:`retrieve`'s default). Paired significance tests
    between two systems compare these values query by query.

    Returns:
        ``{qid: {"mrr@10", "ndcg@10", "map", "recall@1", "recall@10", "recall@100"}}``, queries in ``qrels`` order.
    """
    judged = {
        qid: {docid: int(relevance) for docid, relevance in judgements.items()}
        for qid, judgements in qrels.items()
        if any(relevance > 0 for relevance in judgements.values())
    }
    if not judged:
        raise ValueError("compute_metrics: no query has a relevant document in qrels")
    full_run = {qid: {docid: float(score) for docid, score in run.get(qid, {}).items()} for qid in judged}
    top_run = {qid: dict(_trec_order(ranking)[:MRR_CUTOFF]) for qid, ranking in full_run.items()}

    mrr_measure = TREC_MEASURES["mrr@10"]
    other_measures = {measure for name, measure in TREC_MEASURES.items() if name != "mrr@10"}
    per_query_top = pytrec_eval.RelevanceEvaluator(judged, {mrr_measure}).evaluate(top_run)
    per_query_full = pytrec_eval.RelevanceEvaluator(judged, other_measures).evaluate(full_run)
    return {
        qid: {name: (per_query_top if measure == mrr_measure else per_query_full).get(qid, {}).get(measure, 0.0)
              for name, measure in TREC_MEASURES.items()}
        for qid in judged
    }


def first_relevant_ranks(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]
) -> dict[str, int]:
    """``{qid: rank}``: the 1-based rank of the first relevant document of each judged query in ``run`` (trec_eval's
    order), ``len(run[qid]) + 1`` when none was retrieved (the rank is then only known to be beyond the run's depth)."""
    ranks = {}
    for qid, judgements in qrels.items():
        relevant = {docid for docid, relevance in judgements.items() if relevance > 0}
        if not relevant:
            continue
        ranking = _trec_order(run.get(qid, {}))
        ranks[qid] = next((k for k, (docid, _) in enumerate(ranking, 1) if docid in relevant), len(ranking) + 1)
    return ranks


def compute_metrics(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """:func:`per_query_metrics` averaged over the judged queries.

    Returns:
        ``{"mrr@10", "ndcg@10", "map", "recall@1", "recall@10", "recall@100"}`` -> mean over queries.
    """
    return mean_metrics(per_query_metrics(qrels, run))


def mean_metrics(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The mean over queries of :func:`per_query_metrics`' values."""
    return {name: sum(values[name] for values in per_query.values()) / len(per_query) for name in TREC_MEASURES}


def search_timing(
    index_bytes: int, num_queries: int, began: float, encoded: float, searched: float
) -> dict[str, float]:
    """The search cost of one evaluation, from ``time.perf_counter()`` stamps taken before encoding the queries,
    after encoding them and after ranking: ``index_bytes`` (the document index in memory), ``encode_ms_per_query``
    and ``search_ms_per_query`` (wall time on this machine)."""
    return {"index_bytes": index_bytes, "encode_ms_per_query": 1000 * (encoded - began) / num_queries,
            "search_ms_per_query": 1000 * (searched - encoded) / num_queries}


def _query_texts(data: RetrievalData, use_translations: bool) -> tuple[list[str], list[str]]:
    """``(qids, texts)``: native queries, or their English translations for the oracle."""
    qids = list(data.queries)
    if not use_translations:
        return qids, [data.queries[qid] for qid in qids]
    missing = [qid for qid in qids if qid not in data.translations]
    if missing:
        raise ValueError(
            f"use_translations=True but {len(missing)} of {len(qids)} queries have no English translation, "
            f"e.g. {missing[:3]}"
        )
    return qids, [data.translations[qid] for qid in qids]


def _check_corpus(data: RetrievalData) -> None:
    if not data.queries or not data.corpus:
        raise ValueError(f"RetrievalData has {len(data.queries)} queries and {len(data.corpus)} documents; need both")


def _append_csv(output_path: str, csv_file: str, epoch: float, steps: int, metrics: dict[str, float]) -> None:
    """Append one ``epoch, steps, metrics...`` row to ``output_path/csv_file`` (header written on creation)."""
    os.makedirs(output_path, exist_ok=True)
    csv_path = os.path.join(output_path, csv_file)
    is_new = not os.path.isfile(csv_path)
    with open(csv_path, mode="a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if is_new:
            writer.writerow(["epoch", "steps", *metrics])
        writer.writerow([epoch, steps, *metrics.values()])


def _csv_name(kind: str, name: str) -> str:
    return f"{kind}_evaluation{'_' + name if name else ''}_results.csv"


def _when(epoch: float, steps: int) -> str:
    if epoch == -1:
        return ""
    return f" after epoch {epoch}" if steps == -1 else f" in epoch {epoch} after {steps} steps"


def _report(
    evaluator: BaseEvaluator, kind: str, metrics: dict[str, float], model: SentenceTransformer,
    output_path: str | None, epoch: float, steps: int,
) -> dict[str, float]:
    """Log ``metrics``, append them to ``evaluator.csv_file`` (when ``write_csv`` and ``output_path``), prefix them
    with ``evaluator.name`` and store them in ``model``'s model card data; return the prefixed metrics."""
    where = f" on {evaluator.name}" if evaluator.name else ""
    logger.info("%s evaluation%s%s: %s", kind, where, _when(epoch, steps),
                ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
    if evaluator.write_csv and output_path is not None:
        _append_csv(output_path, evaluator.csv_file, epoch, steps, metrics)
    metrics = evaluator.prefix_name_to_metrics(metrics, evaluator.name)
    evaluator.store_metrics_in_model_card_data(model, metrics, epoch, steps)
    return metrics


def run_from_hits(hits: Sequence[Sequence[dict[str, Any]]], query_ids: Sequence[str]) -> Run:
    """A search index's hits (:data:`optical_hf.faiss_index.Hits`) as a run ``{qid: {passage id: score}}``."""
    return {qid: {hit["id"]: hit["score"] for hit in row} for qid, row in zip(query_ids, hits)}


def check_search_index(index: Any, evaluator: CLIREvaluator, kind: str, tokens: str | None = None) -> Any:
    """``index`` if it is a ``kind`` search index of exactly the evaluator's documents, built by its ``doc_model``
    with its document prompt (and token selection ``tokens``); else an :class:`OpticalInputError` saying what
    differs (:func:`optical_hf.late_interaction.check_index`)."""
    from .late_interaction import check_index

    where = f"{type(evaluator).__name__} {evaluator.name!r}: the {type(index).__name__}"
    if index.kind != kind:
        raise OpticalInputError(f"{where} is a {index.kind} index; this evaluator scores {kind}")
    ids = getattr(index, "ids", None)  # a Qdrant collection is checked by its size
    if (sorted(ids) != sorted(evaluator.corpus_ids) if ids is not None
            else index.num_passages != len(evaluator.corpus_ids)):
        stray = sorted(set(ids or ()) ^ set(evaluator.corpus_ids))[:3]
        raise OpticalInputError(f"{where}'s {index.num_passages} passage ids are not the corpus's "
                                f"{len(evaluator.corpus_ids)} document ids" + (f" (e.g. {stray})" if ids else ""))
    check_index(index, evaluator.doc_model, prompt=evaluator.corpus_prompt, tokens=tokens, where=where)
    return index


class CLIREvaluator(InformationRetrievalEvaluator):
    """Sentence-transformers ``InformationRetrievalEvaluator`` for cross-lingual retrieval: queries encoded by the
    model being evaluated (the student), the corpus by a frozen ``doc_model`` (the teacher).

    The corpus is encoded by ``doc_model`` (``encode_document``) once, at the first call, and cached in
    :attr:`corpus_embeddings` (or given precomputed); each call encodes the queries with the evaluated model
    (``encode_query``), ranks the ``top_k`` documents by cosine with ``semantic_search`` (:func:`retrieve`) and scores
    them with ``pytrec_eval`` (:func:`compute_metrics`). Metric keys are prefixed by ``name``
    (``"{name}_mrr@10"``, ...); the primary metric is ``mrr@10``. Metrics are stored in the model card data and, when
    ``output_path`` is given, appended to ``clir_evaluation_{name}_results.csv``. Queries without a relevant document
    are skipped, as in the parent class. Index memory and query latency of the last call are kept in
    :attr:`last_timing` (:func:`search_timing`), its per-query metrics in :attr:`last_per_query`
    (:func:`per_query_metrics`) and the rank of each query's first relevant document in :attr:`last_ranks`
    (:func:`first_relevant_ranks`).

    Args:
        data: the retrieval task (e.g. :func:`optical_hf.corpora.load_afriqa_gold`); graded qrels are kept for nDCG.
        doc_model: the frozen document encoder (teacher).
        query_prompt: prefix prepended to every query (default: the evaluated model's ``"query"`` prompt, if any).
        doc_prompt: prefix prepended to every document (default: ``doc_model``'s ``"document"`` prompt, if any).
        batch_size: encoding batch size.
        top_k: documents retrieved per query.
        name: metric-key prefix (e.g. ``"afriqa-hau-dev"``).
        show_progress_bar: show encoding progress bars.
        write_csv: append results to a CSV file under ``output_path``.
        use_translations: the queries are their English translations (``data.translations``): with the teacher as
            the evaluated model this is the translation oracle (upper bound).
        corpus_embeddings: ``(len(data.corpus), dim)`` embeddings of the documents by ``doc_model``, in
            ``data.corpus`` order (e.g. cached on disk by the caller); default: encoded at the first call.
        index: a dense search index of exactly ``data.corpus``'s documents built by ``doc_model``
            (:class:`~optical_hf.faiss_index.FaissDenseIndex`, :class:`~optical_hf.qdrant_index.QdrantIndex`):
            queries are searched there instead of by ``semantic_search``.
    """

    def __init__(
        self,
        data: RetrievalData,
        doc_model: SentenceTransformer,
        *,
        query_prompt: str | None = None,
        doc_prompt: str | None = None,
        batch_size: int = 64,
        top_k: int = 100,
        name: str = "clir",
        show_progress_bar: bool = False,
        write_csv: bool = True,
        use_translations: bool = False,
        corpus_embeddings: torch.Tensor | None = None,
        index: Any = None,
    ):
        _check_corpus(data)
        if corpus_embeddings is not None and (
            corpus_embeddings.ndim != 2 or len(corpus_embeddings) != len(data.corpus)
        ):
            raise ValueError(f"CLIREvaluator {name!r}: corpus_embeddings of shape {tuple(corpus_embeddings.shape)} "
                             f"for {len(data.corpus)} documents; expected ({len(data.corpus)}, dim)")
        qids, texts = _query_texts(data, use_translations)
        relevant = {qid: {docid for docid, grade in data.qrels.get(qid, {}).items() if grade > 0} for qid in qids}
        super().__init__(
            queries=dict(zip(qids, texts)), corpus=data.corpus, relevant_docs=relevant, batch_size=batch_size,
            name=name, show_progress_bar=show_progress_bar, write_csv=write_csv, score_functions={"cosine": cos_sim},
            main_score_function="cosine", query_prompt=query_prompt, corpus_prompt=doc_prompt,
        )
        if not self.queries_ids:
            raise ValueError(f"CLIREvaluator {name!r}: none of the {len(qids)} queries has a relevant document in qrels")
        self.doc_model = doc_model
        self.qrels = {qid: data.qrels[qid] for qid in self.queries_ids}
        self.top_k = top_k
        self.csv_file = _csv_name("clir", name)
        self.csv_headers = ["epoch", "steps", *TREC_MEASURES]
        self.primary_metric = "mrr@10"
        self._corpus_embeddings = corpus_embeddings
        self._index = None if index is None else check_search_index(index, self, "dense")
        self.last_timing: dict[str, float] = {}
        self.last_per_query: dict[str, dict[str, float]] = {}
        self.last_ranks: dict[str, int] = {}

    @property
    def corpus_embeddings(self) -> torch.Tensor:
        """``(len(corpus), dim)`` embeddings of the corpus by ``doc_model``, computed on first access."""
        if self._corpus_embeddings is None:
            logger.info("Encoding the %d documents with the document model (once)", len(self.corpus))
            self._corpus_embeddings = self.embed_inputs(
                self.doc_model, self.corpus, encode_fn_name="document", prompt=self.corpus_prompt
            )
        return self._corpus_embeddings

    def compute_all_metrics(self, model: SentenceTransformer) -> dict[str, float]:
        """Unprefixed :func:`compute_metrics` of ``model``'s queries against the cached teacher corpus embeddings (or
        the search index)."""
        corpus = self.corpus_embeddings if self._index is None else None
        began = time.perf_counter()
        query_embeddings = self.embed_inputs(model, self.queries, encode_fn_name="query", prompt=self.query_prompt)
        encoded = time.perf_counter()
        if self._index is None:
            run = retrieve(query_embeddings, corpus, self.queries_ids, self.corpus_ids, top_k=self.top_k)
            size = corpus.nelement() * corpus.element_size()
        else:
            run = run_from_hits(self._index.search(query_embeddings.cpu(), self.top_k), self.queries_ids)
            size = getattr(self._index, "memory_bytes", 0)
        self.last_timing = search_timing(size, len(self.queries), began, encoded, time.perf_counter())
        self.last_per_query = per_query_metrics(self.qrels, run)
        self.last_ranks = first_relevant_ranks(self.qrels, run)
        return mean_metrics(self.last_per_query)

    def __call__(
        self, model: SentenceTransformer, output_path: str | None = None, epoch: float = -1, steps: int = -1
    ) -> dict[str, float]:
        return _report(self, "clir", self.compute_all_metrics(model), model, output_path, epoch, steps)

    def get_config_dict(self) -> dict[str, Any]:
        return {"queries": len(self.queries), "documents": len(self.corpus), "top_k": self.top_k,
                **super().get_config_dict()}


def evaluate_clir(
    query_model: SentenceTransformer,
    doc_model: SentenceTransformer,
    data: RetrievalData,
    *,
    query_prompt: str | None = None,
    doc_prompt: str | None = None,
    batch_size: int = 64,
    top_k: int = 100,
    use_translations: bool = False,
    show_progress_bar: bool = True,
    index: Any = None,
) -> dict[str, float]:
    """One :class:`CLIREvaluator` run: ``query_model`` encodes the queries, ``doc_model`` the corpus (or ``index``, a
    dense search index of it, searches them).

    Returns:
        ``{"mrr@10", "ndcg@10", "map", "recall@1", "recall@10", "recall@100"}`` averaged over queries (unprefixed).
    """
    evaluator = CLIREvaluator(
        data, doc_model, query_prompt=query_prompt, doc_prompt=doc_prompt, batch_size=batch_size, top_k=top_k,
        name="", show_progress_bar=show_progress_bar, write_csv=False, use_translations=use_translations, index=index,
    )
    return evaluator(query_model)


def _bitext_precision(
    source_embeddings: torch.Tensor, target_embeddings: torch.Tensor, sources: Sequence[str], targets: Sequence[str]
) -> dict[str, float]:
    """P@1 both ways for aligned ``(n, dim)`` embeddings; a hit is a retrieved sentence equal to the gold one."""
    src2tgt = retrieve(source_embeddings, target_embeddings, top_k=1)
    tgt2src = retrieve(target_embeddings, source_embeddings, top_k=1)
    hits_src2tgt = sum(targets[int(next(iter(src2tgt[str(i)])))] == targets[i] for i in range(len(sources)))
    hits_tgt2src = sum(sources[int(next(iter(tgt2src[str(i)])))] == sources[i] for i in range(len(targets)))
    p_src2tgt, p_tgt2src = hits_src2tgt / len(sources), hits_tgt2src / len(targets)
    return {"p@1_src2tgt": p_src2tgt, "p@1_tgt2src": p_tgt2src, "p@1": (p_src2tgt + p_tgt2src) / 2}


class BitextRetrievalEvaluator(BaseEvaluator):
    """Sentence-transformers evaluator of bitext mining (FLORES check of ``shared/README.md``): P@1 of retrieving each
    sentence's translation, both ways.

    ``sources[i]`` (encoded by the evaluated model) and ``targets[i]`` (encoded by the fixed ``target_model``, the
    teacher, once at the first call and cached) are translations; each source retrieves, by cosine, its best match
    among all targets and vice versa. A retrieved sentence counts as correct when its text equals the gold one (so
    duplicate sentences are not penalised).

    Returns ``{"p@1_src2tgt", "p@1_tgt2src", "p@1"}`` (``p@1`` the mean of both directions) with keys prefixed by
    ``name``; primary metric ``p@1``. Metrics are stored in the model card data and, when ``output_path`` is given,
    appended to ``bitext_retrieval_evaluation_{name}_results.csv``.
    """

    def __init__(
        self,
        sources: Sequence[str],
        targets: Sequence[str],
        target_model: SentenceTransformer,
        *,
        query_prompt: str | None = None,
        teacher_prompt: str | None = None,
        batch_size: int = 64,
        name: str = "bitext",
        show_progress_bar: bool = False,
        write_csv: bool = True,
    ):
        if len(sources) != len(targets) or not sources:
            raise ValueError(
                f"bitext retrieval needs aligned, non-empty sources and targets, got {len(sources)} and {len(targets)}"
            )
        super().__init__()
        self.sources, self.targets = list(sources), list(targets)
        self.target_model = target_model
        self.query_prompt, self.teacher_prompt = query_prompt, teacher_prompt
        self.batch_size = batch_size
        self.name = name
        self.show_progress_bar = show_progress_bar
        self.write_csv = write_csv
        self.csv_file = _csv_name("bitext_retrieval", name)
        self.primary_metric = "p@1"
        self._target_embeddings: torch.Tensor | None = None

    def _encode(self, model: SentenceTransformer, texts: list[str], prompt: str | None, side: str) -> torch.Tensor:
        """``(len(texts), dim)`` embeddings of ``texts`` by ``model.encode_query`` (sources) or ``encode_document``
        (targets), so that a pair folder routes them to the student and the teacher, each prefixed by ``prompt``
        only (``None``: none, not the model's stored prompt)."""
        encode = model.encode_query if side == "query" else model.encode_document
        return encode(texts, prompt=prompt or "", batch_size=self.batch_size, show_progress_bar=self.show_progress_bar,
                      convert_to_tensor=True)

    @property
    def target_embeddings(self) -> torch.Tensor:
        """``(len(targets), dim)`` embeddings of the targets by ``target_model``, computed on first access."""
        if self._target_embeddings is None:
            logger.info("Encoding the %d targets with the target model (once)", len(self.targets))
            self._target_embeddings = self._encode(self.target_model, self.targets, self.teacher_prompt, "document")
        return self._target_embeddings

    def __call__(
        self, model: SentenceTransformer, output_path: str | None = None, epoch: float = -1, steps: int = -1
    ) -> dict[str, float]:
        source_embeddings = self._encode(model, self.sources, self.query_prompt, "query")
        metrics = _bitext_precision(source_embeddings, self.target_embeddings, self.sources, self.targets)
        return _report(self, "bitext_retrieval", metrics, model, output_path, epoch, steps)

    def get_config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {"pairs": len(self.sources)}
        prompts = {"query_prompt": self.query_prompt, "teacher_prompt": self.teacher_prompt}
        config.update({key: value for key, value in prompts.items() if value})
        return config


def bitext_retrieval(
    source_model: SentenceTransformer,
    target_model: SentenceTransformer,
    sources: Sequence[str],
    targets: Sequence[str],
    *,
    query_prompt: str | None = None,
    teacher_prompt: str | None = None,
    batch_size: int = 64,
    show_progress_bar: bool = False,
) -> dict[str, float]:
    """One :class:`BitextRetrievalEvaluator` run: ``source_model`` encodes ``sources``, ``target_model`` ``targets``.

    Returns:
        ``{"p@1_src2tgt", "p@1_tgt2src", "p@1"}`` (unprefixed), ``p@1`` being the mean of both directions.
    """
    evaluator = BitextRetrievalEvaluator(
        sources, targets, target_model, query_prompt=query_prompt, teacher_prompt=teacher_prompt,
        batch_size=batch_size, name="", show_progress_bar=show_progress_bar, write_csv=False,
    )
    return evaluator(source_model)


def format_metrics_table(rows: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """A markdown table with one row per system and one column per metric (union, in first-seen order).

    Args:
        rows: ``system name -> {metric: value}``; a metric a system lacks is shown as ``-``.
        digits: decimals shown.

    Returns:
        The table, lines joined by ``"\\n"`` (no trailing newline).
    """
    columns = list(dict.fromkeys(metric for metrics in rows.values() for metric in metrics))
    lines = ["| system | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for system, metrics in rows.items():
        cells = [f"{metrics[column]:.{digits}f}" if column in metrics else "-" for column in columns]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
