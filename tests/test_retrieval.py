"""optical_hf.retrieve: dense and MaxSim search in util.semantic_search's shape, with a pair folder or a student and
its teacher."""

from __future__ import annotations

import pytest
import torch
from conftest import sentence_transformer
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import cos_sim

from optical_hf import StudentCardInfo, TokenIndex, retrieve, save_student
from optical_hf.late_interaction import build_index

DOCUMENTS = ["the black cat sleeps", "rain falls on the road", "a book by the tree", "the dog runs"]
QUERIES = ["kitacwa kiehtaw", "kinuswa kigodwa"]


@pytest.fixture(scope="module")
def models(model_dirs, tmp_path_factory):
    student, teacher = sentence_transformer(model_dirs["student"]), sentence_transformer(model_dirs["teacher"])
    folder = tmp_path_factory.mktemp("pair") / "pair"
    save_student(student, folder, card=StudentCardInfo(query_prompt="q: ", document_prompt="d: "),
                 teacher_model=teacher)
    return student, teacher, SentenceTransformer(str(folder), device="cpu")


def test_dense_search_ranks_by_the_cosine_of_the_pair(models):
    student, teacher, pair = models
    hits = retrieve(pair, QUERIES, DOCUMENTS, top_k=3)
    expected = cos_sim(student.encode(QUERIES, prompt="q: ", convert_to_tensor=True),
                       teacher.encode(DOCUMENTS, prompt="d: ", convert_to_tensor=True))
    assert [len(row) for row in hits] == [3, 3] and set(hits[0][0]) == {"corpus_id", "score"}
    for row, scores in zip(hits, expected):
        assert [hit["corpus_id"] for hit in row] == scores.argsort(descending=True)[:3].tolist()
        assert [hit["score"] for hit in row] == pytest.approx(scores.sort(descending=True).values[:3].tolist(), abs=1e-5)
    # the student alone, with its teacher as the document model, and precomputed embeddings: the same ranking
    alone = retrieve(student, QUERIES, DOCUMENTS, top_k=3, document_model=teacher, query_prompt="q: ",
                     document_prompt="d: ")
    embedded = retrieve(pair, QUERIES, pair.encode_document(DOCUMENTS, convert_to_tensor=True), top_k=3)
    assert [[h["corpus_id"] for h in row] for row in alone] == [[h["corpus_id"] for h in row] for row in hits]
    assert [[h["corpus_id"] for h in row] for row in embedded] == [[h["corpus_id"] for h in row] for row in hits]


def test_maxsim_search_from_texts_or_a_token_index(models):
    _, _, pair = models
    index = build_index(pair, DOCUMENTS, ids=["a", "b", "c", "d"])
    from_index = retrieve(pair, QUERIES, index, top_k=4)
    from_texts = retrieve(pair, QUERIES, DOCUMENTS, top_k=4, scoring="maxsim")
    assert [[h["corpus_id"] for h in row] for row in from_index] == [[h["corpus_id"] for h in row] for row in from_texts]
    assert [h["id"] for h in from_index[0]] == [["a", "b", "c", "d"][h["corpus_id"]] for h in from_index[0]]
    scores = [h["score"] for h in from_index[0]]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(ValueError, match="cannot be scored .dense."):
        retrieve(pair, QUERIES, index, scoring="dense")
    with pytest.raises(ValueError, match="scoring must be one of"):
        retrieve(pair, QUERIES, DOCUMENTS, scoring="bm25")
    assert isinstance(index, TokenIndex) and torch.isfinite(index.vectors.float()).all()


def test_the_pair_card_names_its_teacher_and_its_folder(model_dirs, tmp_path):
    from optical_hf.fingerprint import model_fingerprint

    student, teacher = sentence_transformer(model_dirs["student"]), sentence_transformer(model_dirs["teacher"])
    folder = save_student(student, tmp_path / "optical-tiny-ha", card=StudentCardInfo(language="ha"),
                          teacher_model=teacher)
    info = StudentCardInfo.load(folder)
    assert info.teacher == str(model_dirs["teacher"]) and info.teacher_fingerprint == model_fingerprint(teacher)
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "optical-tiny-ha" in card and "optical-student-ha" not in card and "path/to/english-teacher" not in card
