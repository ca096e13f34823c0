"""Search indexes at scale: FAISS (dense, approximate MaxSim) and Qdrant (local mode) against the exact references,
their saved metadata, and the refusal of an index built by another teacher."""

from __future__ import annotations

import json

import pytest
import torch
from qdrant_client import QdrantClient
from sentence_transformers.util import semantic_search

from optical_hf import (
    FaissDenseIndex, FaissMaxSimIndex, OpticalInputError, QdrantIndex, TokenIndex, build_index, build_search_index,
    load_search_index, retrieve,
)
from optical_hf.faiss_index import default_factory

DIM = 16


def token_states(count: int, seed: int, topics: int = 6) -> list[torch.Tensor]:
    """``count`` passages of 3-11 token states each, drawn around a few topic centres (so that search has structure)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(topics, DIM, generator=torch.Generator().manual_seed(99))
    states = []
    for _ in range(count):
        topic = int(torch.randint(topics, (1,), generator=generator))
        length = int(torch.randint(3, 12, (1,), generator=generator))
        states.append(centres[topic] + 0.7 * torch.randn(length, DIM, generator=generator))
    return states


@pytest.fixture(scope="module")
def corpus() -> TokenIndex:
    return TokenIndex.from_token_states(token_states(60, seed=1), ids=[f"p{i}" for i in range(60)])


@pytest.fixture(scope="module")
def queries() -> list[torch.Tensor]:
    return token_states(8, seed=2)


def ranking(hits):
    return [[hit["id"] for hit in row] for row in hits]


@pytest.mark.parametrize("keep_exact", [True, False])  # re-ranked over the fp16 tokens, or over the decoded codes
def test_approximate_maxsim_equals_the_exact_scan_at_full_settings(corpus, queries, keep_exact):
    index = FaissMaxSimIndex.from_token_index(corpus, factory="IVF4,Flat", keep_exact=keep_exact)
    assert (index.exact is corpus) == keep_exact
    index.nprobe, index.token_k, index.candidates = 4, index.index.ntotal, corpus.num_passages
    exact, approximate = corpus.search(queries, top_k=10), index.search(queries, top_k=10)
    assert ranking(approximate) == ranking(exact)
    for row_a, row_e in zip(approximate, exact):
        # the decoded codes are renormalised in float32 where the exact scan reads the fp16 vectors as stored
        assert [h["score"] for h in row_a] == pytest.approx([h["score"] for h in row_e], abs=1e-5 if keep_exact else 1e-3)
        assert [h["corpus_id"] for h in row_a] == [h["corpus_id"] for h in row_e]


@pytest.mark.parametrize("keep_exact", [True, False])
def test_a_maxsim_index_built_chunk_by_chunk_searches_like_the_exact_scan(corpus, queries, keep_exact):
    def part(lo: int, hi: int) -> TokenIndex:  # passages lo:hi of the corpus as an index of their own
        bounds = corpus.offsets[lo:hi + 1].tolist()
        return TokenIndex.from_token_states([corpus.vectors[s:e] for s, e in zip(bounds, bounds[1:])], corpus.ids[lo:hi])

    first, rest = part(0, 25), part(25, corpus.num_passages)
    index = FaissMaxSimIndex.from_token_index(first, factory="IVF4,Flat", keep_exact=keep_exact)
    size = index.memory_bytes
    index.add(rest)
    assert index.ids == corpus.ids and torch.equal(index.offsets, corpus.offsets)
    assert index.memory_bytes > size  # measured again after the add
    index.nprobe, index.token_k, index.candidates = 4, index.index.ntotal, corpus.num_passages
    assert ranking(index.search(queries, top_k=10)) == ranking(corpus.search(queries, top_k=10))
    with pytest.raises(OpticalInputError, match=r"ids \['p30'\] are already indexed"):
        index.add(TokenIndex.from_token_states([torch.randn(3, DIM)], ids=["p30"]))
    with pytest.raises(OpticalInputError, match="token dim 8, the index 16"):
        index.add(TokenIndex.from_token_states([torch.randn(3, 8)], ids=["new"]))
    other = TokenIndex.from_token_states([torch.randn(3, DIM)], ids=["new"])
    other.built_by = {"model": "another-teacher", "fingerprint": "f", "prompt": None, "tokens": "content"}
    with pytest.raises(OpticalInputError, match="tokens built by .*another-teacher.*, the index by"):
        index.add(other)
    assert index.num_passages == corpus.num_passages  # nothing added by a refused call


def test_compressed_codes_and_few_probes_keep_most_of_the_exact_top10(corpus, queries):
    assert default_factory("maxsim", len(corpus.vectors), DIM) == "Flat"  # too few tokens to train a quantiser
    assert default_factory("maxsim", 10**6, DIM) == "IVF1024,PQ16np"
    assert default_factory("maxsim", 10**6, 384) == "IVF1024,PQ32np"
    exact = ranking(corpus.search(queries, top_k=10))
    recall = {}
    for keep_exact in (True, False):
        index = FaissMaxSimIndex.from_token_index(corpus, factory="IVF4,PQ8np", keep_exact=keep_exact)
        index.nprobe, index.token_k, index.candidates = 2, 32, 20
        approximate = ranking(index.search(queries, top_k=10))
        recall[keep_exact] = sum(len(set(a) & set(e)) for a, e in zip(approximate, exact)) / sum(map(len, exact))
        assert all(1 <= len(row) <= 10 for row in approximate)
    assert 0.6 <= recall[False] <= recall[True] <= 1.0  # exact re-ranking ranks at least as well as decoded codes


def test_dense_indexes_equal_semantic_search(corpus):
    embeddings = torch.stack([state.mean(0) for state in token_states(60, seed=1)])
    queries = torch.stack([state.mean(0) for state in token_states(5, seed=3)])
    expected = semantic_search(torch.nn.functional.normalize(queries, dim=-1),
                               torch.nn.functional.normalize(embeddings, dim=-1), top_k=5)
    for factory in ("Flat", "HNSW16"):
        index = FaissDenseIndex.from_embeddings(embeddings, corpus.ids, factory=factory)
        hits = index.search(queries, top_k=5)
        assert [[h["corpus_id"] for h in row] for row in hits] == [[h["corpus_id"] for h in row] for row in expected]
        assert hits[0][0]["score"] == pytest.approx(expected[0][0]["score"], abs=1e-5)
    assert default_factory("dense", 60, DIM) == "Flat" and default_factory("dense", 10**6, DIM) == "HNSW32"


def test_faiss_indexes_round_trip_as_folders_with_their_metadata(corpus, queries, tmp_path):
    maxsim = FaissMaxSimIndex.from_token_index(corpus, factory="IVF4,PQ8np")
    maxsim.built_by = {"model": "teacher", "fingerprint": "abc", "prompt": "passage: ", "tokens": "content"}
    maxsim.nprobe, maxsim.token_k, maxsim.candidates = 3, 20, 30
    maxsim.save(tmp_path / "maxsim")
    loaded = load_search_index(tmp_path / "maxsim")
    assert isinstance(loaded, FaissMaxSimIndex) and loaded.ids == maxsim.ids and loaded.built_by == maxsim.built_by
    assert (loaded.nprobe, loaded.token_k, loaded.candidates, loaded.factory) == (3, 20, 30, "IVF4,PQ8np")
    assert ranking(loaded.search(queries)) == ranking(maxsim.search(queries))
    assert torch.equal(loaded.exact.vectors, corpus.vectors)  # the fp16 tokens re-ranking uses: exact/
    assert torch.equal(load_search_index(tmp_path / "maxsim", mmap=True).exact.vectors, corpus.vectors)
    metadata = json.loads((tmp_path / "maxsim" / "index.json").read_text())
    assert metadata["kind"] == "maxsim" and metadata["built_by"]["prompt"] == "passage: " and metadata["exact"]
    compressed = FaissMaxSimIndex.from_token_index(corpus, factory="IVF4,PQ8np", keep_exact=False)
    compressed.save(tmp_path / "compressed")
    assert not (tmp_path / "compressed" / "exact").exists()
    assert ranking(load_search_index(tmp_path / "compressed").search(queries)) == ranking(compressed.search(queries))

    dense = FaissDenseIndex.from_embeddings(torch.randn(12, DIM), [f"d{i}" for i in range(12)],
                                            built_by={"fingerprint": "xyz"})
    dense.save(tmp_path / "dense")
    again = load_search_index(tmp_path / "dense")
    assert isinstance(again, FaissDenseIndex) and again.ids == dense.ids and again.built_by == {"fingerprint": "xyz"}
    probe = torch.randn(2, DIM)
    assert again.search(probe) == dense.search(probe)

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "index.json").write_text("{}")
    with pytest.raises(OpticalInputError, match="broken"):
        load_search_index(tmp_path / "broken")
    with pytest.raises(OpticalInputError, match=r"shape \(2, 8\), the index holds dim 16"):
        again.search(torch.randn(2, 8))
    with pytest.raises(OpticalInputError, match="the index holds dim 16"):
        loaded.search([torch.randn(3, 8)])
    with pytest.raises(OpticalInputError, match="distinct passage ids"):
        FaissDenseIndex.from_embeddings(torch.randn(3, DIM), ["a", "a", "b"])


def test_token_index_adds_and_removes_passages(corpus, queries):
    states = token_states(60, seed=1)
    grown = TokenIndex.from_token_states(states[:40], ids=corpus.ids[:40])
    grown.add(states[40:], corpus.ids[40:])
    assert grown.ids == corpus.ids and torch.equal(grown.vectors, corpus.vectors)
    assert torch.equal(grown.offsets, corpus.offsets)
    grown.remove(["p3", "p50"])
    kept = [i for i in range(60) if i not in (3, 50)]
    expected = TokenIndex.from_token_states([states[i] for i in kept], ids=[f"p{i}" for i in kept])
    assert ranking(grown.search(queries)) == ranking(expected.search(queries))
    with pytest.raises(OpticalInputError, match="already indexed"):
        grown.add(states[:1], ["p0"])
    with pytest.raises(OpticalInputError, match="not in the index"):
        grown.remove(["p3"])


def test_qdrant_collections_search_like_the_references_and_keep_their_metadata(corpus, queries):
    client = QdrantClient(":memory:")
    corpus.built_by = {"model": "teacher", "fingerprint": "abc", "prompt": None, "tokens": "content"}
    written = QdrantIndex.from_token_index(client, "tokens", corpus, texts=[f"text {i}" for i in range(60)])
    exact = corpus.search(queries, top_k=5)
    hits = written.search(queries, top_k=5)
    assert ranking(hits) == ranking(exact)
    assert [h["score"] for h in hits[0]] == pytest.approx([h["score"] for h in exact[0]], abs=1e-3)
    reopened = QdrantIndex(client, "tokens")
    assert (reopened.kind, reopened.built_by, reopened.dim, reopened.num_passages) == ("maxsim", corpus.built_by, DIM, 60)
    assert client.retrieve("tokens", [7])[0].payload == {"id": "p7", "text": "text 7"}

    embeddings, probe = torch.randn(20, DIM), torch.randn(3, DIM)
    dense = QdrantIndex.from_embeddings(client, "dense", embeddings, built_by={"fingerprint": "xyz"})
    expected = semantic_search(probe, embeddings, top_k=4)
    assert [[h["corpus_id"] for h in row] for row in dense.search(probe, top_k=4)] == \
        [[h["corpus_id"] for h in row] for row in expected]
    with pytest.raises(OpticalInputError, match="exists; pass overwrite=True"):
        QdrantIndex.from_embeddings(client, "dense", embeddings)
    client.create_collection("foreign", vectors_config={})
    with pytest.raises(OpticalInputError, match="not written by optical_hf"):
        QdrantIndex(client, "foreign")
    with pytest.raises(OpticalInputError, match="factory is a FAISS option"):
        build_search_index(None, ["text"], scoring="dense", factory="Flat", qdrant=(client, "new"))


def test_an_index_built_by_another_teacher_is_refused(model_dirs):
    from conftest import sentence_transformer

    student, teacher = sentence_transformer(model_dirs["student"]), sentence_transformer(model_dirs["teacher"])
    documents, questions = ["the black cat sleeps", "rain falls", "a book"], ["kitacwa kiehtaw"]
    index = build_index(teacher, documents)
    approximate = FaissMaxSimIndex.from_token_index(index, factory="Flat")
    for search_index in (index, approximate, QdrantIndex.from_token_index(QdrantClient(":memory:"), "c", index)):
        assert len(retrieve(student, questions, search_index, top_k=2, document_model=teacher)[0]) == 2
        with pytest.raises(OpticalInputError, match="fingerprint"):
            retrieve(student, questions, search_index, top_k=2, document_model=student)


def test_a_metadata_file_missing_a_key_names_the_folder(corpus, tmp_path):
    FaissMaxSimIndex.from_token_index(corpus, factory="Flat").save(tmp_path / "index")
    metadata = json.loads((tmp_path / "index" / "index.json").read_text())
    del metadata["offsets"]
    (tmp_path / "index" / "index.json").write_text(json.dumps(metadata))
    with pytest.raises(OpticalInputError, match=r"index\.json lacks offsets; save the index again"):
        load_search_index(tmp_path / "index")
