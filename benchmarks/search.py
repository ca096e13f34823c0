#!/usr/bin/env python
"""Search-at-scale benchmark: the approximate indexes (FAISS, Qdrant) against the exact scans, in one run.

**Real corpus.** The AfriQA gold pool of ``quality.py`` (``shared/README.md`` protocol; the e5 teacher's passages,
cached by ``quality.py``) and the ``--lang`` ``--split`` questions encoded by ``--student`` (default: the untrained
multilingual-e5-small with ``"query: "``, the floor; any trained student folder works). For every mode: recall@10
and @100 of its top 100 against the exact scan's (the overlap of the two top-k sets), MRR@10 against the qrels,
build seconds, index bytes and per-query search latency (p50, p95; one query at a time, query encoding excluded).
Modes: dense exact (``util.semantic_search``), FAISS HNSW32 and IVF-Flat, Qdrant (local mode: a Python scan, so its
latency is not a server's); MaxSim exact (:class:`~optical_hf.late_interaction.TokenIndex`), FAISS at
``--factories`` and the search settings of ``--sweep``, Qdrant local mode.

**Scale.** Synthetic passages with the real corpus's statistics (token counts drawn from the real passages, each
token a real passage token plus Gaussian noise of ``--noise`` times its norm, renormalised) at each ``--sizes``
passage count, drawn and indexed ``--scale-chunk`` passages at a time (never held whole), searched by the real queries
with one FAISS MaxSim index (the library's default, or the compact one of ``--scale-pool-factor``, ``--scale-pq`` and
``--scale-decoded``): build seconds, bytes per passage, latency, and up to ``--scale-exact-up-to`` passages the exact
scan's latency and recall@100 against it.

Writes ``OUTPUT_DIR/OUTPUT_NAME.json``, ``.md`` and ``.png`` (default ``search``)::

    python benchmarks/search.py                      # hau dev, sizes 3110 10000 30000
    python benchmarks/search.py --output-name search_codes --sizes --skip-qdrant-maxsim \
        --decoded-factories IVF512,PQ64np IVF512,PQ192np --pool-factors 2   # re-ranking over codes, token pooling
    python benchmarks/search.py --sizes 30000 100000 --scale-pool-factor 2 --scale-pq 64 --scale-decoded  # compact
    python benchmarks/search.py --sizes 100000 300000 --scale-exact-up-to 0 ...   # memory and latency only
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import quality  # the AfriQA data, the e5 setting and the cached teacher passages: one source with quality.py
import torch
from common import machine_info
from qdrant_client import QdrantClient
from sentence_transformers.util import semantic_search

from optical_hf import FaissDenseIndex, FaissMaxSimIndex, QdrantIndex, TokenIndex, load_bitext
from optical_hf.corpora import ENGLISH_FLORES, load_flores, passage_id
from optical_hf.evaluation import mean_metrics, per_query_metrics, run_from_hits
from optical_hf.faiss_index import default_factory
from optical_hf.late_interaction import encode_token_states

logger = logging.getLogger("benchmarks.search")
TOP_K = 100


def timed_search(index: Any, queries: Any, top_k: int = TOP_K) -> tuple[list[list[dict[str, Any]]], list[float]]:
    """Hits of each query searched alone, and each search's milliseconds."""
    hits, latency = [], []
    for query in queries:
        began = time.perf_counter()
        hits += index.search(query.unsqueeze(0) if query.ndim == 1 else [query], top_k)
        latency.append(1000 * (time.perf_counter() - began))
    return hits, latency


def compare(name: str, hits: list, latency: list[float], exact: list, qids: list[str], qrels: dict,
            **extra: Any) -> dict[str, Any]:
    """One row: recall@10/@100 of ``hits`` against ``exact`` (top-k overlap), MRR@10 by qrels, latency p50/p95."""
    def overlap(k: int) -> float:
        return statistics.fmean(len({h["id"] for h in a[:k]} & {h["id"] for h in e[:k]}) / len(e[:k])
                                for a, e in zip(hits, exact))
    metrics = mean_metrics(per_query_metrics(qrels, run_from_hits(hits, qids)))
    latency = sorted(latency)
    return {"mode": name, "recall@10_vs_exact": overlap(10), "recall@100_vs_exact": overlap(100),
            "mrr@10": metrics["mrr@10"], "p50_ms": latency[len(latency) // 2],
            "p95_ms": latency[min(len(latency) - 1, int(0.95 * len(latency)))], **extra}


def built(make: Any) -> tuple[Any, float]:
    began = time.perf_counter()
    return make(), time.perf_counter() - began


def real_corpus(
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], TokenIndex, list[torch.Tensor]]:
    """The gold-pool rows and the ``--real-sizes`` rows (:func:`real_scale`); also the exact token index and the query
    token states, for the scale part."""
    setting = quality.make_settings(["e5"], args.e5_path)["e5"]
    data = quality.split_retrieval(args.data_dir, args.lang, args.split)
    pool = real_pool(args.data_dir, data.corpus) if args.real_sizes else {}  # read and checked before any model loads
    if max(args.real_sizes, default=0) > len(pool):
        raise SystemExit(f"--real-sizes {max(args.real_sizes)}: the real pool holds {len(pool)} passages")
    teacher = quality.load_model(setting.model_path, "cpu", args.doc_max_length)
    student = teacher if args.student is None else quality.load_model(args.student, "cpu", 128)
    qids = [qid for qid in data.queries if any(g > 0 for g in data.qrels.get(qid, {}).values())]
    texts = [data.queries[qid] for qid in qids]
    qrels = {qid: data.qrels[qid] for qid in qids}
    cache = {"max_length": args.doc_max_length, "batch_size": 32, "cache_dir": args.cache_dir}
    embeddings = quality.doc_index(teacher, setting, data.corpus, scoring="dense", **cache)
    tokens = quality.doc_index(teacher, setting, data.corpus, scoring="maxsim-content", **cache)
    ids = list(data.corpus)
    dense_queries = student.encode_query(texts, prompt=setting.query_prompt, convert_to_tensor=True,
                                         normalize_embeddings=True).cpu()
    token_queries = encode_token_states(student, texts, side="query", prompt=setting.query_prompt, tokens="content")
    rows = []

    exact_dense, latency = [], []
    for query in dense_queries:
        start = time.perf_counter()
        exact_dense += semantic_search(query.unsqueeze(0), embeddings, top_k=TOP_K)
        latency.append(1000 * (time.perf_counter() - start))
    exact_dense = [[{**h, "id": ids[h["corpus_id"]]} for h in row] for row in exact_dense]
    rows.append(compare("dense exact (semantic_search)", exact_dense, latency, exact_dense, qids, qrels,
                        kind="dense", build_s=0.0, index_bytes=embeddings.nelement() * 4))
    nlist = 2 ** round(np.log2(np.sqrt(len(ids))))
    for factory in ("HNSW32", f"IVF{nlist},Flat"):
        index, seconds = built(lambda f=factory: FaissDenseIndex.from_embeddings(embeddings, ids, factory=f))
        hits, latency = timed_search(index, dense_queries)
        rows.append(compare(f"dense FAISS {factory}", hits, latency, exact_dense, qids, qrels, kind="dense",
                            build_s=seconds, index_bytes=index.memory_bytes, nprobe=index.nprobe))
    client = QdrantClient(":memory:")
    index, seconds = built(lambda: QdrantIndex.from_embeddings(client, "dense", embeddings, ids))
    hits, latency = timed_search(index, dense_queries)
    rows.append(compare("dense Qdrant (local mode)", hits, latency, exact_dense, qids, qrels, kind="dense",
                        build_s=seconds))

    exact_maxsim, latency = timed_search(tokens, token_queries)
    rows.append(compare("maxsim exact (TokenIndex, fp16)", exact_maxsim, latency, exact_maxsim, qids, qrels,
                        kind="maxsim", build_s=0.0, index_bytes=tokens.memory_bytes))
    default = default_factory("maxsim", len(tokens.vectors), tokens.dim)
    for factor in [1.0, *args.pool_factors]:  # token pooling (TokenIndex.pooled): fewer tokens per passage
        corpus, suffix = (tokens, "") if factor == 1 else (tokens.pooled(factor), f", tokens pooled x{factor:g}")
        if factor != 1:
            hits, latency = timed_search(corpus, token_queries)
            rows.append(compare(f"maxsim exact (TokenIndex, fp16){suffix}", hits, latency, exact_maxsim, qids,
                                qrels, kind="maxsim", build_s=0.0, index_bytes=corpus.memory_bytes))
        runs = [(default, True), (default, False), *((f, True) for f in args.factories)] if factor == 1 else []
        for factory, keep_exact in runs + [(f, False) for f in args.decoded_factories]:
            logger.info("Building FAISS %s over %d tokens", factory, len(corpus.vectors))
            index, seconds = built(lambda f=factory, k=keep_exact, c=corpus: FaissMaxSimIndex.from_token_index(
                c, factory=f, keep_exact=k))
            rerank = "exact fp16" if keep_exact else "decoded codes"
            for nprobe, token_k, candidates in args.sweep:
                index.nprobe, index.token_k, index.candidates = nprobe, token_k, candidates
                hits, latency = timed_search(index, token_queries)
                rows.append(compare(f"maxsim FAISS {factory}, re-rank {rerank}{suffix}", hits, latency, exact_maxsim,
                                    qids, qrels, kind="maxsim", build_s=seconds, index_bytes=index.memory_bytes,
                                    nprobe=nprobe, token_k=token_k, candidates=candidates))
                logger.info("%s", rows[-1])
    if not args.skip_qdrant_maxsim:
        logger.info("Writing %d passages' tokens to Qdrant (local mode)", tokens.num_passages)
        index, seconds = built(lambda: QdrantIndex.from_token_index(client, "tokens", tokens))
        hits, latency = timed_search(index, token_queries[:args.qdrant_queries])
        rows.append(compare("maxsim Qdrant (local mode)", hits, latency, exact_maxsim[:len(hits)], qids[:len(hits)],
                            {q: qrels[q] for q in qids[:len(hits)]}, kind="maxsim", build_s=seconds,
                            queries=len(hits)))
    real_rows = real_scale(args, teacher, setting, pool, token_queries, qids, qrels) if args.real_sizes else []
    return rows, real_rows, tokens, token_queries


def real_pool(data_dir: Path, afriqa: dict[str, str]) -> dict[str, str]:
    """The real corpus of ``--real-sizes``: the AfriQA passages first, then the distinct English sentences of every
    LAFAND-MT pair file and of FLORES-SIB200 (``eng_Latn``, where ``data_dir`` has it) not among them, in a seeded
    order; ids :func:`~optical_hf.corpora.passage_id`."""
    english = [text for path in sorted((data_dir / "lafand-mt").glob("en-*/*.en"))
               for text in load_bitext(path.with_suffix(f".{path.parent.name[3:]}"), path)["target"]]
    if (data_dir / "flores-sib200" / ENGLISH_FLORES).is_dir():
        english += load_flores(data_dir / "flores-sib200", ENGLISH_FLORES).values()
    extra = sorted(set(filter(None, english)) - set(afriqa.values()))
    random.Random(0).shuffle(extra)
    return {**afriqa, **{passage_id(text): text for text in extra}}


def real_scale(args: argparse.Namespace, teacher: Any, setting: Any, pool: dict[str, str],
               queries: list[torch.Tensor], qids: list[str], qrels: dict) -> list[dict[str, Any]]:
    """Rows of the real corpus against size: the first ``--real-sizes`` passages of ``pool`` (:func:`real_pool`; its
    content tokens encoded by the teacher once, cached like the gold pool's), searched by the first
    ``--scale-queries`` queries with the exact scan, the library's default FAISS index and, when ``--scale-*`` flags
    name one, the compact index of :func:`scale_index` (pooling counted in its build time)."""
    sizes = [size or len(pool) for size in args.real_sizes]
    tokens = quality.doc_index(teacher, setting, pool, scoring="maxsim-content", max_length=args.doc_max_length,
                               batch_size=32, cache_dir=args.cache_dir)
    queries, qids = queries[:args.scale_queries], qids[:args.scale_queries]
    qrels = {qid: qrels[qid] for qid in qids}
    compact = args.scale_pool_factor != 1 or args.scale_pq is not None or args.scale_decoded
    rows = []
    for size in sizes:
        end = int(tokens.offsets[size])
        corpus = TokenIndex(tokens.vectors[:end], tokens.offsets[:size + 1], tokens.ids[:size])
        exact, latency = timed_search(corpus, queries)
        common = {"passages": size, "tokens": end, "queries": len(queries)}
        rows.append(compare("exact fp16 scan (TokenIndex)", exact, latency, exact, qids, qrels, build_s=0.0,
                            index_bytes=corpus.memory_bytes, **common))
        makers = [lambda: FaissMaxSimIndex.from_token_index(corpus)]
        if compact:  # pooling is part of its build
            makers.append(lambda: scale_index(corpus if args.scale_pool_factor == 1 else
                                              corpus.pooled(args.scale_pool_factor), size, args))
        for make in makers:
            index, seconds = built(make)
            hits, latency = timed_search(index, queries)
            name = (f"FAISS {index.factory}, re-rank {'decoded codes' if index.exact is None else 'exact fp16'}"
                    f"{'' if index.offsets[-1] == end else f', tokens pooled x{args.scale_pool_factor:g}'}")
            rows.append(compare(name, hits, latency, exact, qids, qrels, build_s=seconds,
                                index_bytes=index.memory_bytes, **common))
            logger.info("%s", rows[-1])
            del index
    return rows


def synthetic(tokens: TokenIndex, size: int, noise: float, seed: int, chunk: int) -> Iterator[TokenIndex]:
    """``size`` passages with the real corpus's token counts and token vectors (plus noise), normalised, fp16, as
    indexes of ``chunk`` passages each (ids ``s0``, ``s1``, ...): a corpus larger than memory is never held whole."""
    generator = torch.Generator().manual_seed(seed)
    lengths = tokens.offsets.diff()[torch.randint(tokens.num_passages, (size,), generator=generator)]
    for first in range(0, size, chunk):
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths[first:first + chunk].cumsum(0)])
        vectors = torch.empty(int(offsets[-1]), tokens.dim, dtype=torch.float16)
        for start in range(0, len(vectors), 1 << 20):
            end = min(start + (1 << 20), len(vectors))
            picked = tokens.vectors[torch.randint(len(tokens.vectors), (end - start,), generator=generator)].float()
            picked += noise * torch.randn(picked.shape, generator=generator) / tokens.dim ** 0.5
            vectors[start:end] = torch.nn.functional.normalize(picked, dim=-1).half()
        yield TokenIndex(vectors, offsets, [f"s{i}" for i in range(first, first + len(offsets) - 1)])


def scale_index(first: TokenIndex, size: int, args: argparse.Namespace) -> FaissMaxSimIndex:
    """The scale part's FAISS MaxSim index, trained on ``first`` (the first chunk, already pooled): the library's
    default factory for ``size`` passages of ``first``'s mean token count, with ``--scale-pq`` code bytes, re-ranked
    over the decoded codes with ``--scale-decoded``."""
    factory = default_factory("maxsim", round(len(first.vectors) * size / first.num_passages), first.dim)
    factory = re.sub(r"PQ\d+", f"PQ{args.scale_pq}", factory) if args.scale_pq else factory
    return FaissMaxSimIndex.from_token_index(first, factory=factory, keep_exact=not args.scale_decoded)


def scale(args: argparse.Namespace, tokens: TokenIndex, queries: list[torch.Tensor]) -> list[dict[str, Any]]:
    """One row per ``--sizes``: the FAISS MaxSim index of :func:`scale_index` over synthetic passages, built
    ``--scale-chunk`` passages at a time (each pooled by ``--scale-pool-factor``, then :meth:`FaissMaxSimIndex.add`),
    and up to ``--scale-exact-up-to`` passages the exact scan of the unpooled passages (chunk by chunk: the top 100
    of each chunk merged, latency summed over chunks) for latency and recall."""
    rows = []
    queries = queries[:args.scale_queries]
    for size in args.sizes:
        logger.info("Scale: %d synthetic passages", size)
        index, seconds, total = None, 0.0, 0
        exact = [[] for _ in queries] if size <= args.scale_exact_up_to else None
        exact_latency = [0.0] * len(queries)
        for corpus in synthetic(tokens, size, args.noise, seed=size, chunk=args.scale_chunk):
            total += len(corpus.vectors)
            if exact is not None:
                found, latency = timed_search(corpus, queries)
                exact = [sorted(row + more, key=lambda h: -h["score"])[:TOP_K] for row, more in zip(exact, found)]
                exact_latency = [sum(pair) for pair in zip(exact_latency, latency)]
            began = time.perf_counter()  # build time: pooling, training and adding
            pooled = corpus if args.scale_pool_factor == 1 else corpus.pooled(args.scale_pool_factor)
            if index is None:
                index = scale_index(pooled, size, args)
            else:
                index.add(pooled)
            seconds += time.perf_counter() - began
            del corpus, pooled  # one chunk in memory at a time
        hits, latency = timed_search(index, queries)
        latency, exact_latency = sorted(latency), sorted(exact_latency)
        p95 = min(len(latency) - 1, int(0.95 * len(latency)))
        recall = None if exact is None else statistics.fmean(
            len({h["id"] for h in a} & {h["id"] for h in e}) / min(TOP_K, size) for a, e in zip(hits, exact))
        fp16 = 0 if index.exact is None else index.exact.memory_bytes  # the re-rank copy, when kept
        codes = index.memory_bytes - fp16  # the FAISS part
        rows.append({"passages": size, "tokens": total, "indexed_tokens": int(index.offsets[-1]),
                     "factory": index.factory, "pool_factor": args.scale_pool_factor,
                     "rerank": "decoded codes" if index.exact is None else "fp16 tokens", "build_s": seconds,
                     "index_bytes": codes, "bytes_per_passage": codes / size, "exact_bytes": fp16,
                     "p50_ms": latency[len(latency) // 2], "p95_ms": latency[p95],
                     "exact_p95_ms": None if exact is None else exact_latency[p95], "recall@100_vs_exact": recall})
        logger.info("%s", rows[-1])
        del index  # the next size must not sit beside this one in memory
    return rows


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict[str, Any]) -> str:
    lines = ["# Search at scale", "", f"`{result['machine']['command']}` on {result['machine']['hardware']} "
             f"({result['machine']['cores_available']} cores), {result['machine']['date']}.", ""]
    if result["real"]:
        lines += [f"## AfriQA gold pool ({result['lang']} {result['split']}, {result['passages']} passages, "
                  f"{result['queries']} queries; student {result['student']})", "",
                  "| mode | nprobe / token_k / candidates | recall@10 vs exact | recall@100 vs exact | MRR@10 | "
                  "build s | index MiB | p50 ms | p95 ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in result["real"]:
            settings = " / ".join(str(row[k]) for k in ("nprobe", "token_k", "candidates") if k in row) or "-"
            size = f"{row['index_bytes'] / 2**20:.1f}" if "index_bytes" in row else "-"
            mode = row["mode"] + (f", first {row['queries']} queries" if "queries" in row else "")
            lines.append(f"| {mode} | {settings} | {row['recall@10_vs_exact']:.3f} | "
                         f"{row['recall@100_vs_exact']:.3f} | {row['mrr@10']:.4f} | {row['build_s']:.1f} | {size} | "
                         f"{row['p50_ms']:.1f} | {row['p95_ms']:.1f} |")
    if result.get("real_scale"):  # absent from reports written before the real corpus against size was measured
        first = result["real_scale"][0]
        lines += ["", f"## Real corpus against size: AfriQA passages, then English LAFAND-MT and FLORES sentences "
                  f"(first {first['queries']} queries; recall against the exact scan of the same passages)", "",
                  "| passages | tokens | mode | recall@10 vs exact | recall@100 vs exact | MRR@10 | build s | index MiB "
                  "| p50 ms | p95 ms |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in result["real_scale"]:
            lines.append(f"| {row['passages']} | {row['tokens']} | {row['mode']} | {row['recall@10_vs_exact']:.3f} | "
                         f"{row['recall@100_vs_exact']:.3f} | {row['mrr@10']:.4f} | {row['build_s']:.0f} | "
                         f"{row['index_bytes'] / 2**20:.1f} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} |")
    if result["scale"]:
        lines += ["", f"## Scale: synthetic passages (real token counts, real tokens + noise {result['noise']}), FAISS "
                  "MaxSim index (candidates from the codes, re-ranked over the fp16 tokens or the decoded codes), "
                  "recall against the exact scan of the unpooled passages", "",
                  "| passages | tokens | pool | factory | re-rank | build s | codes MiB | code bytes/passage | fp16 tokens "
                  "MiB | p50 ms | p95 ms | exact p95 ms | recall@100 vs exact |",
                  "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in result["scale"]:  # rows stored before pooling and decoding were options: x1, fp16 tokens
            lines.append(f"| {row['passages']} | {row['tokens']} | x{row.get('pool_factor', 1):g} | {row['factory']} | "
                         f"{row.get('rerank', 'fp16 tokens')} | {row['build_s']:.0f} | "
                         f"{row['index_bytes'] / 2**20:.0f} | {row['bytes_per_passage']:.0f} | "
                         f"{row['exact_bytes'] / 2**20:.0f} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | "
                         f"{_number(row['exact_p95_ms'], '.1f')} | {_number(row['recall@100_vs_exact'], '.3f')} |")
        lines += ["", "The synthetic tokens are noisier than real ones, so their exact top 100 is flatter and its recall "
                  "here is a lower bound; the real-corpus rows above measure fidelity, these rows memory and latency."]
        last = result["scale"][-1]
        lines += ["", f"At {last['bytes_per_passage']:.0f} code bytes and {last['exact_bytes'] / last['passages']:.0f} "
                  f"fp16 bytes per passage, 1M passages take {last['bytes_per_passage'] * 1e6 / 2**30:.1f} GiB of "
                  f"codes plus {last['exact_bytes'] / last['passages'] * 1e6 / 2**30:.0f} GiB of fp16 tokens "
                  "(extrapolated from the largest size run, not measured)."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["scale"]

    def curve(axis: Any, key: str, **style: Any) -> None:  # the exact scan and recall: up to --scale-exact-up-to
        shown = [row for row in rows if row[key] is not None]
        axis.plot([row["passages"] for row in shown], [row[key] for row in shown], **style)

    panels = [(key, label) for key, label in (("p95_ms", "p95 latency (ms)"), ("bytes_per_passage", "index bytes / "
              "passage"), ("recall@100_vs_exact", "recall@100 vs exact")) if any(row[key] is not None for row in rows)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for axis, (key, label) in zip(axes[0], panels):
        curve(axis, key, marker="o", label="FAISS MaxSim")
        if key == "p95_ms" and any(row["exact_p95_ms"] is not None for row in rows):
            curve(axis, "exact_p95_ms", marker="s", label="exact scan")
            axis.legend()
        axis.set_ylim(bottom=0)
        axis.set_xscale("log")
        axis.set_xlabel("passages")
        axis.set_title(label)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=quality.DEFAULT_DATA)
    parser.add_argument("--lang", default="hau")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--student", help="student folder encoding the queries (default: the untrained e5)")
    parser.add_argument("--e5-path", default=None)
    parser.add_argument("--doc-max-length", type=int, default=256)
    parser.add_argument("--cache-dir", type=Path, default=quality.DEFAULT_CACHE)
    parser.add_argument("--factories", nargs="*", default=[],
                        help="FAISS MaxSim factories besides the default, re-ranked over the exact fp16 tokens")
    parser.add_argument("--decoded-factories", nargs="*", default=[],
                        help="FAISS MaxSim factories re-ranked over their decoded codes (no fp16 copy)")
    parser.add_argument("--pool-factors", nargs="*", type=float, default=[],
                        help="token pooling factors (TokenIndex.pooled): each adds the exact scan of the pooled tokens "
                             "and the --decoded-factories over them")
    parser.add_argument("--sweep", nargs="+", default=[(16, 64, 256), (32, 256, 1000)],
                        type=lambda v: tuple(map(int, v.split(","))),
                        help="MaxSim search settings NPROBE,TOKEN_K,CANDIDATES (default: the library's, and a wider one)")
    parser.add_argument("--sizes", nargs="*", type=int, default=[3110, 10000, 30000])
    parser.add_argument("--real-sizes", nargs="*", type=int, default=[],
                        help="passage counts of the real corpus (AfriQA passages, then LAFAND and FLORES English "
                             "sentences), each searched exactly and by FAISS; 0: the whole corpus")
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--scale-queries", type=int, default=100)
    parser.add_argument("--scale-pool-factor", type=float, default=1.0,
                        help="scale part: pool each passage's tokens by this factor before indexing (1: none)")
    parser.add_argument("--scale-pq", type=int, default=None,
                        help="scale part: code bytes per token of the default IVF-PQ factory (default: the library's; "
                             "none where the default is exact Flat, below its minimum training size)")
    parser.add_argument("--scale-decoded", action="store_true",
                        help="scale part: re-rank over the decoded codes instead of keeping the fp16 tokens")
    parser.add_argument("--scale-chunk", type=int, default=10_000,
                        help="scale part: synthetic passages drawn, pooled and added to the index at a time")
    parser.add_argument("--scale-exact-up-to", type=int, default=30_000,
                        help="scale part: the exact scan (latency, recall reference) only up to this many passages")
    parser.add_argument("--qdrant-queries", type=int, default=50, help="queries searched in Qdrant's local mode")
    parser.add_argument("--skip-qdrant-maxsim", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=quality.REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--output-name", default="search", help="stem of the .json, .md and .png files")
    parser.add_argument("--report-only", action="store_true", help="render the .md and .png from the stored .json")
    args = parser.parse_args(argv)
    if any(not factor >= 1 for factor in args.pool_factors):
        parser.error(f"--pool-factors {' '.join(map(str, args.pool_factors))}: each must be >= 1")
    if not args.scale_pool_factor >= 1:
        parser.error(f"--scale-pool-factor {args.scale_pool_factor}: must be >= 1")
    if any(size < 0 for size in args.real_sizes):
        parser.error(f"--real-sizes {' '.join(map(str, args.real_sizes))}: each must be >= 0 (0: the whole corpus)")
    if args.scale_chunk < 1:
        parser.error(f"--scale-chunk {args.scale_chunk}: must be >= 1 (passages)")
    if args.scale_pq is not None and args.scale_pq < 1:
        parser.error(f"--scale-pq {args.scale_pq}: must be >= 1 (code bytes per token)")
    return args


def write_reports(result: dict[str, Any], args: argparse.Namespace) -> None:
    """``OUTPUT_NAME.md`` and, with a scale part and matplotlib, ``OUTPUT_NAME.png`` of ``result``."""
    (args.output_dir / f"{args.output_name}.md").write_text(render(result), encoding="utf-8")
    if result["scale"]:
        try:
            plot(result, args.output_dir / f"{args.output_name}.png")
        except ImportError:
            logger.warning("No plot: it needs matplotlib (pip install 'optical-hf[bench]')")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report_only:
        write_reports(json.loads((args.output_dir / f"{args.output_name}.json").read_text(encoding="utf-8")), args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from importlib.metadata import version

    rows, real_rows, tokens, queries = real_corpus(args)
    result = {"machine": machine_info("cpu", faiss=version("faiss-cpu"), qdrant_client=version("qdrant-client")),
              "lang": args.lang, "split": args.split, "student": args.student or "untrained multilingual-e5-small",
              "passages": tokens.num_passages, "queries": len(queries), "noise": args.noise, "real": rows,
              "real_scale": real_rows, "scale": scale(args, tokens, queries)}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{args.output_name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_reports(result, args)
    print(render(result))


if __name__ == "__main__":
    sys.exit(main())
