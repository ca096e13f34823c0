"""Tests for optical_hf.evaluation: trec_eval metrics on hand-checkable rankings, exact dense retrieval, and the
evaluators run with tiny random sentence-transformers models built here."""

import csv
import math
import os
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.sentence_transformer.modules import Pooling, StaticEmbedding, Transformer
from tokenizers import Tokenizer, models, pre_tokenizers

import optical_hf.evaluation
from optical_hf.corpora import RetrievalData
from optical_hf.evaluation import (
    BitextRetrievalEvaluator,
    CLIREvaluator,
    bitext_retrieval,
    compute_metrics,
    evaluate_clir,
    format_metrics_table,
    per_query_metrics,
    retrieve,
)

DOCS = {
    "d1": "the cat sat on the mat",
    "d2": "rain falls in the green valley",
    "d3": "a quick brown fox jumps",
    "d4": "bread and milk for breakfast",
    "d5": "stars shine over the quiet sea",
}
QUERIES = {"q1": "paka ameketi", "q2": "mvua inanyesha", "q3": "mbweha anaruka"}
QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 1}}


# ---- tiny random models ------------------------------------------------------------------------------------------


def build_tiny_model(folder: Path, seed: int) -> SentenceTransformer:
    """A 2-layer, 32-d random BERT with a character-level WordPiece vocabulary, mean pooling."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{letter}" for letter in letters), ":"]
    transformers.BertTokenizer(vocab={token: index for index, token in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    transformers.BertModel(config).save_pretrained(folder)
    transformer = Transformer(str(folder), max_seq_length=64)
    return SentenceTransformer(modules=[transformer, Pooling(32, "mean")], device="cpu")


def static_model(vectors: dict[str, list[float]]) -> SentenceTransformer:
    """A SentenceTransformer embedding each whitespace-separated word as ``vectors[word]`` (mean over words)."""
    vocab = {"[UNK]": 0, **{word: index for index, word in enumerate(vectors, start=1)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    weights = torch.tensor([[0.0] * len(next(iter(vectors.values()))), *vectors.values()])
    return SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_weights=weights)], device="cpu")


def encoded_texts(call: mock._Call) -> list[str]:
    """The texts of one ``SentenceTransformer.encode`` call (``inputs``, by keyword or position)."""
    return list(call.kwargs["inputs"] if "inputs" in call.kwargs else call.args[0])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> SentenceTransformer:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "teacher", seed=0)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> SentenceTransformer:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "student", seed=1)


def echo_data() -> RetrievalData:
    """Queries whose English translation is exactly their relevant document: the oracle must be perfect."""
    return RetrievalData(
        queries=dict(QUERIES), corpus=dict(DOCS), qrels=dict(QRELS), translations={q: DOCS[f"d{q[1]}"] for q in QUERIES}
    )


# ---- metrics ------------------------------------------------------------------------------------------------------


def test_metrics_on_known_ranks():
    # relevant document at rank 1, rank 2, and not retrieved at all
    run = {
        "q1": {"d1": 0.9, "d2": 0.5, "d3": 0.1},
        "q2": {"d1": 0.9, "d2": 0.5, "d3": 0.1},
        "q3": {"d1": 0.9, "d2": 0.5, "d4": 0.1},
    }
    metrics = compute_metrics(QRELS, run)
    assert metrics["mrr@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert metrics["recall@1"] == pytest.approx(1 / 3)
    assert metrics["recall@10"] == pytest.approx(2 / 3)
    assert metrics["recall@100"] == pytest.approx(2 / 3)
    assert metrics["map"] == pytest.approx((1 + 0.5 + 0) / 3)
    # one relevant document: nDCG = 1 / log2(rank + 1)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 0) / 3)
    assert list(metrics) == ["mrr@10", "ndcg@10", "map", "recall@1", "recall@10", "recall@100"]
    per_query = per_query_metrics(QRELS, run)  # what the paired significance tests compare
    assert [per_query[q]["mrr@10"] for q in ("q1", "q2", "q3")] == [1.0, 0.5, 0.0]
    assert [per_query[q]["recall@100"] for q in ("q1", "q2", "q3")] == [1.0, 1.0, 0.0]


def test_ndcg_with_two_relevant_documents():
    # relevant at ranks 2 and 3: DCG = 1/log2(3) + 1/log2(4); ideal = 1 + 1/log2(3)
    metrics = compute_metrics({"q": {"a": 1, "b": 1}}, {"q": {"x": 0.9, "a": 0.8, "b": 0.7}})
    assert metrics["ndcg@10"] == pytest.approx((1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3)))
    assert metrics["recall@1"] == 0.0


def test_mrr_is_cut_at_10_but_recall_100_is_not():
    run = {"q1": {f"x{i:02d}": 1.0 - i / 100 for i in range(10)} | {"d1": 0.5}}
    metrics = compute_metrics({"q1": {"d1": 1}}, run)
    assert metrics["mrr@10"] == 0.0
    assert metrics["recall@10"] == 0.0
    assert metrics["recall@100"] == 1.0
    assert metrics["map"] == pytest.approx(1 / 11)


def test_missing_query_counts_zero_and_unjudged_query_is_ignored():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 0}}
    metrics = compute_metrics(qrels, {"q1": {"d1": 1.0}, "q3": {"d3": 1.0}})
    assert metrics["mrr@10"] == pytest.approx(0.5)


def test_metrics_without_relevant_documents_raise():
    with pytest.raises(ValueError, match="no query has a relevant document"):
        compute_metrics({"q1": {"d1": 0}}, {"q1": {"d1": 1.0}})


# ---- retrieve -----------------------------------------------------------------------------------------------------


def test_retrieve_ranks_by_cosine_not_dot_product():
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # "long" has the largest dot product with q0 but a lower cosine than "aligned"
    docs = torch.tensor([[0.9, 0.1], [10.0, 10.0], [0.0, 1.0]])
    run = retrieve(queries, docs, ["q0", "q1"], ["aligned", "long", "up"], top_k=3)
    assert list(run["q0"]) == ["aligned", "long", "up"]
    assert list(run["q1"]) == ["up", "long", "aligned"]
    assert run["q0"]["long"] == pytest.approx(1 / math.sqrt(2))
    assert run["q1"]["up"] == pytest.approx(1.0)


def test_retrieve_top_k_chunking_and_default_ids():
    generator = torch.Generator().manual_seed(0)
    queries, docs = torch.randn(7, 5, generator=generator), torch.randn(11, 5, generator=generator)
    whole = retrieve(queries, docs.numpy(), top_k=4)
    chunked = retrieve(queries, docs, top_k=4, query_chunk_size=2)
    assert set(whole) == {str(i) for i in range(7)}
    assert all(len(ranking) == 4 for ranking in whole.values())
    assert {qid: list(ranking) for qid, ranking in whole.items()} == {
        qid: list(ranking) for qid, ranking in chunked.items()
    }
    expected = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(docs, dim=-1).T
    assert list(whole["3"]) == [str(i) for i in expected[3].argsort(descending=True)[:4].tolist()]
    assert len(retrieve(queries, docs, top_k=100)["0"]) == 11


def test_retrieve_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(2, 5\)"):
        retrieve(torch.zeros(3, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="2 query ids for 3"):
        retrieve(torch.zeros(3, 4), torch.zeros(2, 4), query_ids=["a", "b"])


# ---- evaluate_clir ------------------------------------------------------------------------------------------------


def test_oracle_is_perfect_when_translations_are_the_documents(teacher):
    metrics = evaluate_clir(teacher, teacher, echo_data(), use_translations=True, show_progress_bar=False)
    assert metrics["mrr@10"] == pytest.approx(1.0)
    assert metrics["recall@1"] == pytest.approx(1.0)


def test_evaluate_clir_uses_each_model_and_prompt(teacher, student):
    data = echo_data()
    with (
        mock.patch.object(student, "encode", wraps=student.encode) as student_encode,
        mock.patch.object(teacher, "encode", wraps=teacher.encode) as teacher_encode,
    ):
        metrics = evaluate_clir(
            student, teacher, data, query_prompt="query: ", doc_prompt="passage: ", show_progress_bar=False
        )
    assert encoded_texts(student_encode.call_args) == list(QUERIES.values())
    assert student_encode.call_args.kwargs["prompt"] == "query: "
    assert encoded_texts(teacher_encode.call_args) == list(DOCS.values())
    assert teacher_encode.call_args.kwargs["prompt"] == "passage: "
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert metrics["recall@100"] == pytest.approx(1.0)  # every document is retrieved from a corpus of 5


def test_use_translations_requires_them(teacher):
    data = echo_data()
    del data.translations["q2"]
    with pytest.raises(ValueError, match=r"1 of 3 queries have no English translation.*q2"):
        evaluate_clir(teacher, teacher, data, use_translations=True, show_progress_bar=False)


# ---- CLIREvaluator ------------------------------------------------------------------------------------------------


def test_clir_evaluator_caches_documents_and_prefixes_metrics(teacher, student, tmp_path):
    # queries are the documents' own texts: the teacher as "student" must score perfectly
    data = RetrievalData(queries={"q1": DOCS["d1"], "q3": DOCS["d3"]}, corpus=dict(DOCS), qrels=QRELS)
    evaluator = CLIREvaluator(data, teacher, name="toy")
    with mock.patch.object(teacher, "encode", wraps=teacher.encode) as teacher_encode:
        perfect = evaluator(teacher, output_path=str(tmp_path), epoch=1, steps=10)
        other = evaluator(student, output_path=str(tmp_path), epoch=2, steps=20)
    # the corpus first (outside the timed query search), then the queries of the first evaluation; not the corpus again
    assert teacher_encode.call_count == 2
    assert [encoded_texts(call) for call in teacher_encode.call_args_list] == [
        list(DOCS.values()), [DOCS["d1"], DOCS["d3"]]
    ]
    assert evaluator.primary_metric == "toy_mrr@10"
    assert set(perfect) == {f"toy_{key}" for key in ("mrr@10", "ndcg@10", "map", "recall@1", "recall@10", "recall@100")}
    assert perfect["toy_mrr@10"] == pytest.approx(1.0)
    assert set(other) == set(perfect)
    assert teacher.model_card_data.eval_results_dict[evaluator] == perfect
    with open(tmp_path / "clir_evaluation_toy_results.csv", newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0][:3] == ["epoch", "steps", "mrr@10"] and [row[1] for row in table[1:]] == ["10", "20"]


def test_clir_evaluator_uses_precomputed_corpus_embeddings_and_times_the_search(teacher):
    data = RetrievalData(queries={"q1": DOCS["d1"], "q3": DOCS["d3"]}, corpus=dict(DOCS), qrels=QRELS)
    embeddings = teacher.encode(list(DOCS.values()), convert_to_tensor=True)
    evaluator = CLIREvaluator(data, teacher, name="", write_csv=False, corpus_embeddings=embeddings)
    with mock.patch.object(teacher, "encode", wraps=teacher.encode) as teacher_encode:
        metrics = evaluator(teacher)
    assert [encoded_texts(call) for call in teacher_encode.call_args_list] == [[DOCS["d1"], DOCS["d3"]]]  # queries only
    assert metrics["mrr@10"] == pytest.approx(1.0)
    assert evaluator.last_timing["index_bytes"] == embeddings.nelement() * 4
    assert evaluator.last_timing["encode_ms_per_query"] > 0 and evaluator.last_timing["search_ms_per_query"] > 0
    with pytest.raises(ValueError, match=r"corpus_embeddings of shape \(2, \d+\) for 5 documents"):
        CLIREvaluator(data, teacher, corpus_embeddings=embeddings[:2])


def test_clir_evaluator_rejects_empty_corpus(teacher):
    with pytest.raises(ValueError, match="0 documents"):
        CLIREvaluator(RetrievalData(queries={"q": "x"}, corpus={}, qrels={"q": {"d": 1}}), teacher)
    with pytest.raises(ValueError, match="none of the 1 queries has a relevant document"):
        CLIREvaluator(RetrievalData(queries={"q": "x"}, corpus={"d": "y"}, qrels={"q": {"d": 0}}), teacher)


def test_clir_evaluator_ranks_with_semantic_search_teacher_corpus_once(monkeypatch):
    # Hand-checkable: 2-d word vectors; the teacher embeds the English documents, the student the queries.
    teacher = static_model({"east": [1.0, 0.0], "north": [0.0, 1.0], "northeast": [1.0, 1.0]})
    student = static_model({"kaskazini": [0.0, 1.0], "mashariki": [1.0, 0.2], "magharibi": [-1.0, 0.0]})
    data = RetrievalData(
        queries={"q1": "kaskazini", "q2": "mashariki", "q3": "magharibi", "q4": "kaskazini"},
        corpus={"east": "east", "north": "north", "ne": "northeast"},
        qrels={"q1": {"ne": 1}, "q2": {"east": 1}, "q3": {"east": 1}, "q4": {"north": 0}},  # q4: no relevant doc
    )
    rankings, semantic_search = [], optical_hf.evaluation.semantic_search

    def spy(*args, **kwargs):
        rankings.append(semantic_search(*args, **kwargs))
        return rankings[-1]

    monkeypatch.setattr(optical_hf.evaluation, "semantic_search", spy)
    evaluator = CLIREvaluator(data, teacher, name="compass")
    assert isinstance(evaluator, InformationRetrievalEvaluator)
    with (
        mock.patch.object(teacher, "encode", wraps=teacher.encode) as teacher_encode,
        mock.patch.object(student, "encode", wraps=student.encode) as student_encode,
    ):
        first = evaluator(student)
        second = evaluator(student)
    assert teacher_encode.call_count == 1 and encoded_texts(teacher_encode.call_args) == ["east", "north", "northeast"]
    assert student_encode.call_count == 2 and encoded_texts(student_encode.call_args) == [
        "kaskazini", "mashariki", "magharibi"
    ]
    # cosines: q1 (0, 1): north 1 > ne .71 > east 0; q2 (1, .2): east .98 > ne .83 > north .20;
    # q3 (-1, 0): north 0 > ne -.71 > east -1
    corpus_ids = ["east", "north", "ne"]
    assert [[corpus_ids[hit["corpus_id"]] for hit in hits] for hits in rankings[0]] == [
        ["north", "ne", "east"], ["east", "ne", "north"], ["north", "ne", "east"]
    ]
    assert len(rankings) == 2 and first == second
    assert first["compass_mrr@10"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)
    assert first["compass_recall@1"] == pytest.approx(1 / 3)
    assert first["compass_ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 + 1 / math.log2(4)) / 3)
    assert evaluator.primary_metric == "compass_mrr@10"


# ---- bitext -------------------------------------------------------------------------------------------------------

SENTENCES = ["habari ya asubuhi", "asante sana", "karibu nyumbani", "ninapenda chai", "mvua kubwa leo", "jua kali"]


def test_bitext_retrieval_is_perfect_for_identical_model_and_sentences(teacher):
    metrics = bitext_retrieval(teacher, teacher, SENTENCES, SENTENCES)
    assert metrics == {"p@1_src2tgt": 1.0, "p@1_tgt2src": 1.0, "p@1": 1.0}


def test_bitext_retrieval_prompts_and_mean(teacher, student):
    targets = [sentence[::-1] for sentence in SENTENCES]
    with mock.patch.object(student, "encode", wraps=student.encode) as student_encode:
        metrics = bitext_retrieval(student, teacher, SENTENCES, targets, query_prompt="query: ")
    assert student_encode.call_args.kwargs["prompt"] == "query: "
    assert metrics["p@1"] == pytest.approx((metrics["p@1_src2tgt"] + metrics["p@1_tgt2src"]) / 2)
    assert all(0.0 <= value <= 1.0 for value in metrics.values())


def test_bitext_retrieval_needs_aligned_lists(teacher):
    with pytest.raises(ValueError, match="got 2 and 1"):
        bitext_retrieval(teacher, teacher, ["a", "b"], ["a"])


def test_bitext_evaluator_caches_targets(teacher):
    evaluator = BitextRetrievalEvaluator(SENTENCES, SENTENCES, teacher, name="flores-swh")
    with mock.patch.object(teacher, "encode", wraps=teacher.encode) as teacher_encode:
        first = evaluator(teacher)
        second = evaluator(teacher)
    assert teacher_encode.call_count == 3  # targets once, sources twice
    assert evaluator.primary_metric == "flores-swh_p@1"
    assert first == second == {"flores-swh_p@1_src2tgt": 1.0, "flores-swh_p@1_tgt2src": 1.0, "flores-swh_p@1": 1.0}


# ---- table --------------------------------------------------------------------------------------------------------


def test_format_metrics_table():
    table = format_metrics_table({"floor": {"mrr@10": 0.1, "recall@1": 0.05}, "oracle": {"mrr@10": 0.75123}}, digits=3)
    assert table == (
        "| system | mrr@10 | recall@1 |\n"
        "|---|---:|---:|\n"
        "| floor | 0.100 | 0.050 |\n"
        "| oracle | 0.751 | - |"
    )


def test_first_relevant_ranks_follow_trec_order():
    from optical_hf.evaluation import first_relevant_ranks

    qrels = {"q1": {"d2": 1}, "q2": {"d9": 1, "d1": 0}, "q3": {"d1": 0}}  # q3 has no relevant document: left out
    run = {"q1": {"d1": 0.9, "d2": 0.5, "d3": 0.5}, "q2": {"d1": 0.8, "d2": 0.7}}
    # q1: d1 first, then the tie d3/d2 in docid-descending order (trec_eval's): d2 third; q2: not retrieved -> depth + 1
    assert first_relevant_ranks(qrels, run) == {"q1": 3, "q2": 3}
