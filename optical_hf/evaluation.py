"""Cross-lingual retrieval and bitext-mining evaluation.

Two protocols (``shared/README.md``):

* CLIR: queries in a low-resource language are encoded by the student, English documents by the frozen English teacher,
  and documents are ranked by cosine similarity (:func:`evaluate_clir`, :class:`CLIREvaluator`). On AfriQA this is the
  closed "gold-pool" setup of :func:`optical_hf.corpora.load_afriqa_gold`, not AfriQA's official open-retrieval task.
  The translation oracle encodes the human English translations of the queries with the teacher
  (``use_translations=True``); the zero-shot floor is the teacher (or untrained student) on the native queries.
* Bitext mining (FLORES): each sentence retrieves its translation among all candidate translations, P@1 both ways
  (:func:`bitext_retrieval`, :class:`BitextRetrievalEvaluator`).

Ranking metrics are computed by ``pytrec_eval`` (trec_eval), never by hand-written formulas.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pytrec_eval
import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator
from tqdm.auto import tqdm

from optical_hf.corpora import RetrievalData

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
#: Upper bound on the number of query-document scores held at once by :func:`retrieve` (128 MiB in float32).
MAX_SCORES_PER_CHUNK = 2**25


def retrieve(
    query_embeddings: torch.Tensor | np.ndarray,
    doc_embeddings: torch.Tensor | np.ndarray,
    query_ids: Sequence[str] | None = None,
    doc_ids: Sequence[str] | None = None,
    *,
    top_k: int = 100,
    query_chunk_size: int | None = None,
    show_progress_bar: bool = False,
) -> Run:
    """Exact dense retrieval by cosine similarity.

    Embeddings are L2-normalised, then scored by matrix product on ``doc_embeddings``' device, ``query_chunk_size``
    queries at a time so that at most about ``MAX_SCORES_PER_CHUNK`` scores are held at once (the default).

    Args:
        query_embeddings: ``(num_queries, dim)``.
        doc_embeddings: ``(num_docs, dim)``.
        query_ids: ``num_queries`` ids (default ``"0", "1", ...``).
        doc_ids: ``num_docs`` ids (default ``"0", "1", ...``).
        top_k: documents kept per query (capped at ``num_docs``).
        query_chunk_size: queries scored per matrix product (default: derived from ``MAX_SCORES_PER_CHUNK``).
        show_progress_bar: show a tqdm bar over query chunks.

    Returns:
        ``{qid: {docid: cosine}}`` with the ``min(top_k, num_docs)`` best documents of each query.
    """
    queries, docs = torch.as_tensor(query_embeddings), torch.as_tensor(doc_embeddings)
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
    if len(docs) == 0:
        return {qid: {} for qid in query_ids}

    docs = F.normalize(docs, dim=-1)
    k = min(top_k, len(docs))
    chunk_size = query_chunk_size or max(1, MAX_SCORES_PER_CHUNK // len(docs))
    run: Run = {}
    for start in tqdm(
        range(0, len(queries), chunk_size), desc="Retrieving", disable=not show_progress_bar, leave=False
    ):
        chunk = F.normalize(queries[start : start + chunk_size].to(device=docs.device, dtype=docs.dtype), dim=-1)
        scores, indices = torch.topk(chunk @ docs.T, k=k, dim=1)
        for qid, row_scores, row_indices in zip(
            query_ids[start : start + chunk_size], scores.float().tolist(), indices.tolist()
        ):
            run[qid] = {doc_ids[index]: score for index, score in zip(row_indices, row_scores)}
    return run


def _trec_order(ranking: Mapping[str, float]) -> list[tuple[str, float]]:
    """Documents in trec_eval's order: score descending, ties broken by docid descending."""
    return sorted(ranking.items(), key=lambda item: (item[1], item[0]), reverse=True)


def compute_metrics(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Ranking metrics of ``run`` against ``qrels``, averaged over queries, computed by ``pytrec_eval``.

    Every query of ``qrels`` with at least one relevant (relevance > 0) document counts; a query missing from ``run``
    scores 0. ``mrr@10`` is trec_eval's ``recip_rank`` on the run cut to its top 10; ``map`` and ``recall@100`` are
    bounded by the depth of ``run`` (100 documents for :func:`retrieve`'s default).

    Returns:
        ``{"mrr@10", "ndcg@10", "map", "recall@1", "recall@10", "recall@100"}`` -> mean over queries.
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

    metrics: dict[str, float] = {}
    for name, measure in TREC_MEASURES.items():
        per_query = per_query_top if measure == mrr_measure else per_query_full
        metrics[name] = sum(per_query.get(qid, {}).get(measure, 0.0) for qid in judged) / len(judged)
    return metrics


def _encode(
    model: SentenceTransformer, texts: Sequence[str], prompt: str | None, batch_size: int, show_progress_bar: bool
) -> torch.Tensor:
    """``(len(texts), dim)`` L2-normalised embeddings of ``texts``, each prefixed by ``prompt`` when given."""
    return model.encode(
        list(texts),
        prompt=prompt,
        batch_size=batch_size,
        show_progress_bar=show_progress_bar,
        convert_to_tensor=True,
        normalize_embeddings=True,
    )


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
) -> dict[str, float]:
    """Cross-lingual retrieval quality of ``query_model`` against documents encoded by ``doc_model``.

    Queries (``len(data.queries)``) are encoded by ``query_model`` (the student), the corpus (``len(data.corpus)``
    documents) by ``doc_model`` (the frozen English teacher); the ``top_k`` documents by cosine are scored with
    :func:`compute_metrics`. Nothing is cached: use :class:`CLIREvaluator` to evaluate repeatedly against one corpus.

    Args:
        query_prompt: prefix prepended to every query (e.g. ``"query: "`` for e5 models); none by default.
        doc_prompt: prefix prepended to every document (e.g. ``"passage: "``); none by default.
        use_translations: encode the queries' English translations (``data.translations``) instead of the native
            queries: with the teacher as ``query_model`` this is the translation oracle (upper bound).

    Returns:
        ``{"mrr@10", "ndcg@10", "map", "recall@1", "recall@10", "recall@100"}`` averaged over queries.
    """
    _check_corpus(data)
    qids, texts = _query_texts(data, use_translations)
    doc_ids = list(data.corpus)
    doc_texts = [data.corpus[docid] for docid in doc_ids]
    doc_embeddings = _encode(doc_model, doc_texts, doc_prompt, batch_size, show_progress_bar)
    query_embeddings = _encode(query_model, texts, query_prompt, batch_size, show_progress_bar)
    run = retrieve(query_embeddings, doc_embeddings, qids, doc_ids, top_k=top_k)
    return compute_metrics({qid: data.qrels.get(qid, {}) for qid in qids}, run)


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


class _FrozenSideEvaluator(SentenceEvaluator):
    """Plumbing shared by the evaluators: a frozen model (the teacher) encodes one side once and caches it; each call
    encodes the other side with the model being evaluated (the student), then logs, writes CSV and stores the metrics
    in the model card data under keys prefixed by ``name``."""

    kind = ""

    def __init__(
        self, frozen_model: SentenceTransformer, frozen_texts: Sequence[str], frozen_prompt: str | None, *,
        batch_size: int, name: str, show_progress_bar: bool, write_csv: bool, primary_metric: str,
    ):
        super().__init__()
        self.frozen_model = frozen_model
        self.frozen_texts = list(frozen_texts)
        self.frozen_prompt = frozen_prompt
        self.batch_size = batch_size
        self.name = name
        self.show_progress_bar = show_progress_bar
        self.write_csv = write_csv
        self.csv_file = _csv_name(self.kind, name)
        self.primary_metric = primary_metric
        self._frozen_embeddings: torch.Tensor | None = None

    @property
    def frozen_embeddings(self) -> torch.Tensor:
        """``(len(frozen_texts), dim)`` normalised embeddings by the frozen model, computed on first access."""
        if self._frozen_embeddings is None:
            logger.info("Encoding the %d fixed texts of %s with the frozen model (once)", len(self.frozen_texts), self.name)
            self._frozen_embeddings = _encode(
                self.frozen_model, self.frozen_texts, self.frozen_prompt, self.batch_size, self.show_progress_bar
            )
        return self._frozen_embeddings

    def _encode_evaluated(self, model: SentenceTransformer, texts: Sequence[str], prompt: str | None) -> torch.Tensor:
        return _encode(model, texts, prompt, self.batch_size, self.show_progress_bar)

    def _report(
        self, metrics: dict[str, float], model: SentenceTransformer, output_path: str | None, epoch: float, steps: int
    ) -> dict[str, float]:
        logger.info("%s evaluation on %s%s: %s", self.kind, self.name, _when(epoch, steps),
                    ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
        if self.write_csv and output_path is not None:
            _append_csv(output_path, self.csv_file, epoch, steps, metrics)
        metrics = self.prefix_name_to_metrics(metrics, self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics


class CLIREvaluator(_FrozenSideEvaluator):
    """Sentence-transformers evaluator of cross-lingual retrieval: student-encoded queries, teacher-encoded corpus.

    The corpus is encoded by ``doc_model`` once (at the first call) and cached, since the teacher is frozen; each call
    encodes ``data.queries`` with the model being evaluated, retrieves the top ``top_k`` documents by cosine and returns
    :func:`compute_metrics` with keys prefixed by ``name`` (``"{name}_mrr@10"``, ...). The primary metric is
    ``mrr@10``; metrics are stored in the model card data and, when ``output_path`` is given, appended to
    ``clir_evaluation_{name}_results.csv``.

    Args:
        data: the retrieval task (e.g. :func:`optical_hf.corpora.load_afriqa_gold`).
        doc_model: the frozen document encoder (teacher).
        query_prompt: prefix prepended to every query; none by default.
        doc_prompt: prefix prepended to every document; none by default.
        batch_size: encoding batch size.
        top_k: documents retrieved per query.
        name: metric-key prefix (e.g. ``"afriqa-hau-dev"``).
        show_progress_bar: show encoding progress bars.
        write_csv: append results to a CSV file under ``output_path``.
    """

    kind = "clir"

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
    ):
        _check_corpus(data)
        self.data = data
        self.query_prompt = query_prompt
        self.top_k = top_k
        self._doc_ids = list(data.corpus)
        super().__init__(
            doc_model, [data.corpus[docid] for docid in self._doc_ids], doc_prompt, batch_size=batch_size, name=name,
            show_progress_bar=show_progress_bar, write_csv=write_csv, primary_metric="mrr@10",
        )

    def __call__(
        self, model: SentenceTransformer, output_path: str | None = None, epoch: float = -1, steps: int = -1
    ) -> dict[str, float]:
        doc_embeddings = self.frozen_embeddings
        qids = list(self.data.queries)
        query_embeddings = self._encode_evaluated(model, [self.data.queries[qid] for qid in qids], self.query_prompt)
        run = retrieve(query_embeddings, doc_embeddings, qids, self._doc_ids, top_k=self.top_k)
        metrics = compute_metrics({qid: self.data.qrels.get(qid, {}) for qid in qids}, run)
        return self._report(metrics, model, output_path, epoch, steps)

    def get_config_dict(self) -> dict[str, Any]:
        config = {"queries": len(self.data.queries), "documents": len(self.data.corpus), "top_k": self.top_k}
        prompts = {"query_prompt": self.query_prompt, "doc_prompt": self.frozen_prompt}
        config.update({key: value for key, value in prompts.items() if value})
        return config


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


def _check_bitext(sources: Sequence[str], targets: Sequence[str]) -> None:
    if len(sources) != len(targets) or not sources:
        raise ValueError(
            f"bitext retrieval needs aligned, non-empty sources and targets, got {len(sources)} and {len(targets)}"
        )


def bitext_retrieval(
    source_model: SentenceTransformer,
    target_model: SentenceTransformer,
    sources: Sequence[str],
    targets: Sequence[str],
    *,
    source_prompt: str | None = None,
    target_prompt: str | None = None,
    batch_size: int = 64,
    show_progress_bar: bool = False,
) -> dict[str, float]:
    """Bitext mining (FLORES check of ``shared/README.md``): P@1 of retrieving each sentence's translation.

    ``sources[i]`` (encoded by ``source_model``) and ``targets[i]`` (encoded by ``target_model``) are translations;
    each source retrieves, by cosine, its best match among all ``len(targets)`` targets and vice versa. A retrieved
    sentence counts as correct when its text equals the gold one (so duplicate sentences are not penalised).

    Returns:
        ``{"p@1_src2tgt", "p@1_tgt2src", "p@1"}``, ``p@1`` being the mean of both directions.
    """
    _check_bitext(sources, targets)
    source_embeddings = _encode(source_model, sources, source_prompt, batch_size, show_progress_bar)
    target_embeddings = _encode(target_model, targets, target_prompt, batch_size, show_progress_bar)
    return _bitext_precision(source_embeddings, target_embeddings, sources, targets)


class BitextRetrievalEvaluator(_FrozenSideEvaluator):
    """Sentence-transformers evaluator of bitext mining: the evaluated model encodes ``sources``, a fixed
    ``target_model`` (teacher) encodes ``targets`` once (cached at the first call).

    Returns :func:`bitext_retrieval`'s metrics with keys prefixed by ``name``; primary metric ``p@1``. Metrics are
    stored in the model card data and, when ``output_path`` is given, appended to
    ``bitext_retrieval_evaluation_{name}_results.csv``.
    """

    kind = "bitext_retrieval"

    def __init__(
        self,
        sources: Sequence[str],
        targets: Sequence[str],
        target_model: SentenceTransformer,
        *,
        source_prompt: str | None = None,
        target_prompt: str | None = None,
        batch_size: int = 64,
        name: str = "bitext",
        show_progress_bar: bool = False,
        write_csv: bool = True,
    ):
        _check_bitext(sources, targets)
        self.sources = list(sources)
        self.source_prompt = source_prompt
        super().__init__(
            target_model, targets, target_prompt, batch_size=batch_size, name=name,
            show_progress_bar=show_progress_bar, write_csv=write_csv, primary_metric="p@1",
        )

    def __call__(
        self, model: SentenceTransformer, output_path: str | None = None, epoch: float = -1, steps: int = -1
    ) -> dict[str, float]:
        target_embeddings = self.frozen_embeddings
        source_embeddings = self._encode_evaluated(model, self.sources, self.source_prompt)
        metrics = _bitext_precision(source_embeddings, target_embeddings, self.sources, self.frozen_texts)
        return self._report(metrics, model, output_path, epoch, steps)

    def get_config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {"pairs": len(self.sources)}
        prompts = {"source_prompt": self.source_prompt, "target_prompt": self.frozen_prompt}
        config.update({key: value for key, value in prompts.items() if value})
        return config


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
