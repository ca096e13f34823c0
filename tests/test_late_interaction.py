"""Tests for optical_hf.late_interaction: exact MaxSim against a brute-force reference across chunkings, the fp16
token index, token selection, the MaxSim CLIR evaluator on a hand-checkable ranking, and the scoring mode of a student
folder (optical_hf.json, model card, ``optical-hf evaluate``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import sentence_transformer, toy_bitext
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import StaticEmbedding
from tokenizers import Tokenizer, models, pre_tokenizers

import optical_hf.late_interaction
from optical_hf.cli import EXIT_BAD_INPUT, main
from optical_hf.corpora import RetrievalData, load_beir
from optical_hf.errors import OpticalInputError
from optical_hf.faiss_index import load_search_index
from optical_hf.export import save_student
from optical_hf.late_interaction import (
    MaxSimCLIREvaluator,
    TokenIndex,
    build_index,
    encode_token_states,
    evaluate_clir_maxsim,
    maxsim_retrieve,
    maxsim_topk,
)
from optical_hf.model_card import PLACEHOLDER_MODEL_ID, StudentCardInfo

PASSAGE_LENGTHS = [3, 1, 5, 2, 7, 4]  # 22 tokens
QUERY_LENGTHS = [2, 4, 1, 3, 4]


# ---- helpers ------------------------------------------------------------------------------------------------------


class StaticTokenEmbedding(StaticEmbedding):
    """StaticEmbedding that also returns per-token states: each word's vector, right-padded with zeros."""

    def preprocess(self, inputs: list[str], prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        ids = [encoding.ids for encoding in self.tokenizer.encode_batch(inputs, add_special_tokens=False)]
        input_ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(row) for row in ids], batch_first=True)
        lengths = torch.tensor([len(row) for row in ids])
        return {"input_ids": input_ids, "attention_mask": (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()}

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        tokens = self.embedding.weight[features["input_ids"]] * features["attention_mask"].unsqueeze(-1)
        features["token_embeddings"] = tokens
        features["sentence_embedding"] = tokens.sum(1) / features["attention_mask"].sum(1, keepdim=True)
        return features


def token_model(vectors: dict[str, list[float]]) -> SentenceTransformer:
    """A SentenceTransformer whose token states are ``vectors[word]`` for each whitespace-separated word."""
    vocab = {"[UNK]": 0, **{word: index for index, word in enumerate(vectors, start=1)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    weights = torch.tensor([[0.0] * len(next(iter(vectors.values()))), *vectors.values()])
    return SentenceTransformer(modules=[StaticTokenEmbedding(tokenizer, embedding_weights=weights)], device="cpu")


def random_states(lengths: list[int], dim: int = 8, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(length, dim, generator=generator) for length in lengths]


def brute_force_scores(queries: list[torch.Tensor], passages: list[torch.Tensor]) -> torch.Tensor:
    """``(n_q, n_p)`` MaxSim by definition, one (query, passage) pair at a time; passages rounded to fp16 as stored."""
    normalise = torch.nn.functional.normalize
    scores = torch.zeros(len(queries), len(passages))
    for i, query in enumerate(queries):
        for j, passage in enumerate(passages):
            cosines = normalise(query, dim=-1) @ normalise(passage, dim=-1).half().float().T
            scores[i, j] = sum(max(row) for row in cosines.tolist())
    return scores


class ConversionSpy(torch.Tensor):
    """A tensor recording the number of rows of every ``.float()`` conversion of it (or of its slices)."""

    converted_rows: list[int] = []

    def float(self, *args, **kwargs):
        ConversionSpy.converted_rows.append(self.shape[0])
        return super().float(*args, **kwargs)


# ---- MaxSim search ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_chunk_size", [1, 3, 4, 7, 22, 1000])
@pytest.mark.parametrize("query_chunk_size", [1, 2, 64])
def test_maxsim_topk_matches_brute_force(token_chunk_size, query_chunk_size):
    # chunks of 3, 4 and 7 tokens split passages across chunks (offsets 0 3 4 9 11 18 22) and leave a remainder
    passages, queries = random_states(PASSAGE_LENGTHS, seed=0), random_states(QUERY_LENGTHS, seed=1)
    index = TokenIndex.from_token_states(passages)
    expected = brute_force_scores(queries, passages)
    scores, indices = maxsim_topk(queries, index, top_k=4, query_chunk_size=query_chunk_size,
                                  token_chunk_size=token_chunk_size)
    assert scores.shape == indices.shape == (len(queries), 4)
    expected_scores, expected_indices = expected.topk(4, dim=1)
    assert torch.equal(indices, expected_indices)
    assert torch.allclose(scores, expected_scores, atol=1e-5)


def test_maxsim_padding_does_not_change_a_query_score():
    passages, queries = random_states(PASSAGE_LENGTHS, seed=2), random_states([1, 6], seed=3)
    index = TokenIndex.from_token_states(passages)
    alone, _ = maxsim_topk(queries[:1], index, top_k=6)
    padded, _ = maxsim_topk(queries, index, top_k=6)  # query 0 is padded from 1 to 6 tokens
    assert torch.allclose(alone[0], padded[0], atol=1e-6)


def test_maxsim_retrieve_caps_top_k_and_names_ids():
    passages, queries = random_states([2, 3], seed=4), random_states([2], seed=5)
    index = TokenIndex.from_token_states(passages, ids=["a", "b"])
    run = maxsim_retrieve(queries, index, ["q"], top_k=10, token_chunk_size=2)
    expected = brute_force_scores(queries, passages)[0]
    assert set(run) == {"q"} and set(run["q"]) == {"a", "b"}
    assert run["q"]["a"] == pytest.approx(float(expected[0]), abs=1e-5)
    assert run["q"]["b"] == pytest.approx(float(expected[1]), abs=1e-5)


def test_maxsim_rejects_bad_inputs():
    index = TokenIndex.from_token_states(random_states([2]))
    with pytest.raises(ValueError, match="dim 4, the index 8"):
        maxsim_topk([torch.ones(2, 4)], index)
    with pytest.raises(ValueError, match=r"queries \[1\] have none"):
        maxsim_topk([torch.ones(2, 8), torch.ones(0, 8)], index)
    with pytest.raises(ValueError, match=r"passage\(s\) \['b'\] have no tokens"):
        TokenIndex.from_token_states([torch.ones(1, 8), torch.ones(0, 8)], ids=["a", "b"])
    with pytest.raises(OpticalInputError, match="side must be one of \\('query', 'document'\\), got 'passage'"):
        encode_token_states(token_model(TEACHER_VECTORS), ["north"], side="passage")


# ---- the fp16 index -----------------------------------------------------------------------------------------------


def test_token_index_is_fp16_reports_its_memory_and_round_trips_as_a_folder(tmp_path):
    index = TokenIndex.from_token_states(random_states(PASSAGE_LENGTHS), ids=[f"d{i}" for i in range(6)])
    assert index.vectors.dtype == torch.float16 and index.vectors.shape == (22, 8)
    assert index.offsets.tolist() == [0, 3, 4, 9, 11, 18, 22]
    assert index.memory_bytes == 22 * 8 * 2 + 7 * 8
    assert torch.allclose(index.vectors.float().norm(dim=1), torch.ones(22), atol=1e-3)
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "README.md").write_text("mine")
    index.save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["README.md", "index.json", "tokens.pt"]
    metadata = json.loads((tmp_path / "index" / "index.json").read_text())
    assert (metadata["kind"], metadata["dim"], metadata["num_passages"], metadata["num_tokens"]) == ("maxsim", 8, 6, 22)
    assert metadata["ids"] == index.ids
    for mmap in (False, True):  # mmap: the tokens are mapped from the file, not read
        loaded = TokenIndex.load(tmp_path / "index", mmap=mmap)
        assert torch.equal(loaded.vectors, index.vectors) and torch.equal(loaded.offsets, index.offsets)
        assert loaded.ids == index.ids and loaded.memory_bytes == index.memory_bytes
        assert loaded.search(random_states([2]), top_k=3) == index.search(random_states([2]), top_k=3)
    assert isinstance(load_search_index(tmp_path / "index"), TokenIndex)  # the loader of every saved index
    loaded.save(tmp_path / "index")  # unchanged, over the file it is mapped from
    assert torch.equal(loaded.vectors, index.vectors) and TokenIndex.load(tmp_path / "index").ids == index.ids
    loaded.add(random_states([2]), ["d6"])
    loaded.remove(["d0"])
    loaded.save(tmp_path / "index")  # over the folder it was mapped from
    assert TokenIndex.load(tmp_path / "index").ids == ["d1", "d2", "d3", "d4", "d5", "d6"]


def test_token_pooling_merges_near_duplicate_tokens_into_their_mean():
    base = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    noise = 0.01 * torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    twins = base.repeat_interleave(2, dim=0) + noise  # three pairs of near-identical tokens
    index = TokenIndex.from_token_states([twins, base[:1]], ids=["twins", "single"])
    index.built_by = {"model": "t", "fingerprint": "f", "prompt": None, "tokens": "content"}
    pooled = index.pooled(2)
    assert pooled.offsets.tolist() == [0, 3, 4] and pooled.ids == index.ids  # ceil(6 / 2) and ceil(1 / 2) tokens
    expected = torch.nn.functional.normalize(twins.view(3, 2, 8).mean(1), dim=-1)
    order = (pooled.vectors[:3].float() @ expected.T).argmax(0)  # each pair's mean is one pooled token
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(pooled.vectors[order].float(), expected, atol=2e-3)
    assert pooled.built_by["pool_factor"] == 2 and pooled.built_by["fingerprint"] == "f"
    query = [torch.randn(3, 8)]
    assert pooled.search(query, top_k=2)[0][0]["score"] == pytest.approx(index.search(query, top_k=2)[0][0]["score"],
                                                                      abs=0.05)
    assert torch.equal(index.pooled(1).vectors, index.vectors)
    with pytest.raises(OpticalInputError, match="factor must be >= 1, got 0.5"):
        index.pooled(0.5)


def test_a_damaged_index_folder_is_refused_naming_it(tmp_path):
    index = TokenIndex.from_token_states(random_states(PASSAGE_LENGTHS), ids=[f"d{i}" for i in range(6)])
    path = tmp_path / "index"
    index.save(path)
    state = torch.load(path / "tokens.pt", weights_only=True)
    state["vectors"][3:8] = float("nan")  # what flipped bytes in the vectors do
    torch.save(state, path / "tokens.pt")
    with pytest.raises(OpticalInputError, match=rf"{path}: damaged TokenIndex \(TokenIndex: 5 token vector\(s\) "
                                                r"are NaN or infinite, in passage\(s\) \['d1', 'd2'\]"):
        TokenIndex.load(path)
    index.save(path)
    state = torch.load(path / "tokens.pt", weights_only=True)
    state["vectors"][0, 0] += 0.5  # a finite but changed value
    torch.save(state, path / "tokens.pt")
    with pytest.raises(OpticalInputError, match=f"{path}: the TokenIndex checksum does not match"):
        TokenIndex.load(path)
    index.save(path)
    metadata = json.loads((path / "index.json").read_text())
    del metadata["ids"]
    (path / "index.json").write_text(json.dumps(metadata))
    with pytest.raises(OpticalInputError, match=f"{path}: the TokenIndex lacks ids"):
        TokenIndex.load(path)
    index.save(path)
    (path / "tokens.pt").write_bytes(b"")
    with pytest.raises(OpticalInputError, match=f"{path}: not a TokenIndex folder"):
        TokenIndex.load(path)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "index.json").write_text('{"format": 3}', encoding="utf-8")
    (notes / "tokens.pt").write_bytes((path / "index.json").read_bytes())
    with pytest.raises(OpticalInputError, match=f"{notes}: not a TokenIndex"):
        TokenIndex.load(notes)
    with pytest.raises(OpticalInputError, match=f"{tmp_path / 'missing'}: not a TokenIndex folder"):
        TokenIndex.load(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"NaN or infinite, in passage\(s\) \['1'\]"):
        TokenIndex.from_token_states([torch.ones(2, 8), torch.full((1, 8), float("inf"))])


def test_an_index_knows_what_built_it_and_refuses_another_teacher(tmp_path):
    teacher, other = token_model(TEACHER_VECTORS), token_model(STUDENT_VECTORS)
    with pytest.raises(OpticalInputError, match="build_index: the corpus is empty"):
        build_index(teacher, [])
    index = build_index(teacher, list(COMPASS.corpus.values()), list(COMPASS.corpus), prompt=None, tokens="all")
    assert set(index.built_by) == {"model", "fingerprint", "prompt", "tokens"}
    index.save(tmp_path / "index")
    loaded = TokenIndex.load(tmp_path / "index")
    assert loaded.built_by == index.built_by
    MaxSimCLIREvaluator(COMPASS, teacher, index=loaded, doc_tokens="all")  # the same teacher and settings: accepted
    with pytest.raises(OpticalInputError, match=r"other settings than the document model in use: fingerprint '\w+' "
                                                r"\(in use: '\w+'\)"):
        MaxSimCLIREvaluator(COMPASS, other, index=loaded, doc_tokens="all")
    with pytest.raises(OpticalInputError, match=r"prompt None \(in use: 'passage: '\); tokens 'all' \(in use: "
                                                r"'content'\)"):
        MaxSimCLIREvaluator(COMPASS, teacher, index=loaded, doc_prompt="passage: ")


def test_search_converts_one_chunk_at_a_time():
    passages, queries = random_states(PASSAGE_LENGTHS), random_states(QUERY_LENGTHS, seed=1)
    index = TokenIndex.from_token_states(passages)
    expected, _ = maxsim_topk(queries, index, top_k=3)
    index.vectors = index.vectors.as_subclass(ConversionSpy)
    ConversionSpy.converted_rows = []
    scores, _ = maxsim_topk(queries, index, top_k=3, query_chunk_size=2, token_chunk_size=5)
    assert ConversionSpy.converted_rows == [5, 5, 5, 5, 2]  # each chunk once, never the whole (22, 8) index
    assert index.vectors.dtype == torch.float16 and index.memory_bytes == 22 * 8 * 2 + 7 * 8
    assert torch.allclose(scores, expected)


# ---- token states -------------------------------------------------------------------------------------------------


def test_content_tokens_drop_special_and_prompt_tokens(model_dirs):
    model = sentence_transformer(model_dirs["teacher"])
    text, prompt = "the cat sees a bird", "query: "
    every = encode_token_states(model, [text], side="query", prompt=prompt, tokens="all")[0]
    content = encode_token_states(model, [text], side="query", prompt=prompt, tokens="content")[0]
    assert torch.equal(encode_token_states(model, [text], side="query", prompt=prompt)[0], content)  # the default
    n_prompt = len(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    n_text = len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert len(every) == 1 + n_prompt + n_text + 1  # [CLS] prompt text [SEP]
    assert torch.equal(content, every[1 + n_prompt:-1])
    with pytest.raises(OpticalInputError, match="query tokens must be one of"):
        encode_token_states(model, [text], side="query", tokens="words")


# ---- evaluator ----------------------------------------------------------------------------------------------------

TEACHER_VECTORS = {"east": [1.0, 0.0], "west": [-1.0, 0.0], "north": [0.0, 1.0], "northeast": [1.0, 1.0]}
STUDENT_VECTORS = {"mashariki": [1.0, 0.0], "kaskazini": [0.0, 1.0], "magharibi": [-1.0, 0.5]}
COMPASS = RetrievalData(
    queries={"q1": "mashariki", "q2": "kaskazini", "q3": "magharibi kaskazini", "q4": "kaskazini"},
    corpus={"ew": "east west", "ne": "northeast", "n": "north"},
    qrels={"q1": {"ew": 1}, "q2": {"ne": 1}, "q3": {"ne": 1}, "q4": {"n": 0}},  # q4: no relevant document
)


def test_maxsim_evaluator_on_a_hand_checkable_ranking():
    teacher, student = token_model(TEACHER_VECTORS), token_model(STUDENT_VECTORS)
    evaluator = MaxSimCLIREvaluator(COMPASS, teacher, name="compass", write_csv=False, token_chunk_size=2)
    runs, real_retrieve = [], optical_hf.late_interaction.run_from_hits

    def spy(*args, **kwargs):
        runs.append(real_retrieve(*args, **kwargs))
        return runs[-1]

    with (
        mock.patch.object(optical_hf.late_interaction, "run_from_hits", spy),
        mock.patch.object(teacher, "encode", wraps=teacher.encode) as teacher_encode,
    ):
        first = evaluator(student)
        second = evaluator(student)
    assert teacher_encode.call_count == 1  # the teacher's index is built once
    # q1 east: ew max(1, -1) = 1 > ne .71 > n 0 (dense cosine would put ne first: "east west" averages to 0)
    # q2 north: n 1 > ne .71 > ew 0
    # q3 (-1, .5)/1.12 and north: n .45 + 1 = 1.45 > ew .89 + 0 > ne -.32 + .71 = .39
    w = 1 / math.sqrt(1.25)
    expected = {
        "q1": {"ew": 1.0, "ne": 1 / math.sqrt(2), "n": 0.0},
        "q2": {"n": 1.0, "ne": 1 / math.sqrt(2), "ew": 0.0},
        "q3": {"n": 0.5 * w + 1, "ew": w, "ne": -0.5 * w / math.sqrt(2) + 1 / math.sqrt(2)},
    }
    assert {qid: list(ranking) for qid, ranking in runs[0].items()} == {
        qid: list(ranking) for qid, ranking in expected.items()
    }
    for qid, ranking in expected.items():
        assert runs[0][qid] == pytest.approx(ranking, abs=1e-3)
    assert first == second
    assert first["compass_mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert first["compass_recall@1"] == pytest.approx(1 / 3)
    assert evaluator.primary_metric == "compass_mrr@10"
    assert evaluator.last_timing["index_bytes"] == evaluator.index.memory_bytes == 4 * 2 * 2 + 4 * 8
    assert evaluator.last_timing["search_ms_per_query"] >= 0


def test_maxsim_evaluator_searches_a_prebuilt_index_of_its_corpus():
    teacher, student = token_model(TEACHER_VECTORS), token_model(STUDENT_VECTORS)
    built = MaxSimCLIREvaluator(COMPASS, teacher, name="", write_csv=False)(student)
    index = build_index(teacher, list(COMPASS.corpus.values()), list(COMPASS.corpus))
    evaluator = MaxSimCLIREvaluator(COMPASS, teacher, name="", write_csv=False, index=index)
    with mock.patch.object(teacher, "encode", wraps=teacher.encode) as teacher_encode:
        assert evaluator(student) == built
    assert teacher_encode.call_count == 0 and evaluator.index is index
    other = build_index(teacher, ["north", "east"], ["n", "e"])
    stray = r"2 passage ids are not the corpus's 3 document ids \(e.g. \['e', 'ew', 'ne'\]\)"
    with pytest.raises(ValueError, match=stray):
        MaxSimCLIREvaluator(COMPASS, teacher, index=other)


def test_maxsim_evaluator_runs_inside_sentence_transformers_training(tmp_path, model_dirs):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MSELoss

    teacher, student = sentence_transformer(model_dirs["teacher"]), sentence_transformer(model_dirs["student"])
    pairs = toy_bitext(8, seed=4)
    data = RetrievalData(queries={f"q{i}": s for i, (s, _) in enumerate(pairs)},
                         corpus={f"d{i}": t for i, (_, t) in enumerate(pairs)},
                         qrels={f"q{i}": {f"d{i}": 1} for i in range(len(pairs))})
    train = Dataset.from_dict({"sentence": [s for s, _ in pairs],
                               "label": teacher.encode([t for _, t in pairs]).tolist()})
    evaluator = MaxSimCLIREvaluator(data, teacher, name="toy")
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none",
                                                per_device_train_batch_size=4, use_cpu=True)
    trainer = SentenceTransformerTrainer(model=student, args=args, train_dataset=train, loss=MSELoss(student),
                                         evaluator=evaluator)
    metrics = trainer.evaluate()
    assert 0.0 < metrics["eval_toy_mrr@10"] <= 1.0
    assert (tmp_path / "out" / "eval" / "clir_evaluation_toy_results.csv").is_file()


# ---- scoring mode of a student folder -----------------------------------------------------------------------------


@pytest.fixture
def beir(tmp_path) -> Path:
    pairs = toy_bitext(10, seed=5)
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, (_, t) in enumerate(pairs)), encoding="utf-8")
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": s}) + "\n" for i, (s, _) in enumerate(pairs)), encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(10)), encoding="utf-8")
    return folder


def saved_student(model_dirs, folder: Path, scoring: str) -> Path:
    card = StudentCardInfo(language="sw", teacher=str(model_dirs["teacher"]), query_prompt="query: ", scoring=scoring)
    return save_student(sentence_transformer(model_dirs["student"]), folder, card=card)


def test_student_folder_keeps_scoring_and_evaluate_uses_it(model_dirs, beir, tmp_path, capsys):
    folder = saved_student(model_dirs, tmp_path / "maxsim-student", "maxsim")
    assert StudentCardInfo.load(folder).scoring == "maxsim"
    assert json.loads((folder / "optical_hf.json").read_text(encoding="utf-8"))["scoring"] == "maxsim"
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert "Late interaction (MaxSim)" in readme
    assert "retrieve(model, queries, documents, top_k=10, scoring=\"maxsim\", query_prompt='query: '" in readme
    snippet = readme.split("Late interaction (MaxSim)")[1].split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(snippet.replace(PLACEHOLDER_MODEL_ID, str(folder)), namespace)  # the card's snippet runs as written
    assert [len(hits) for hits in namespace["hits"]] == [2]
    card = StudentCardInfo(language="sw", query_prompt="query: ", scoring="maxsim")
    pair = save_student(sentence_transformer(model_dirs["student"]), tmp_path / "maxsim-pair", card=card,
                        teacher_model=sentence_transformer(model_dirs["teacher"]))
    snippet = (pair / "README.md").read_text(encoding="utf-8").split("Late interaction (MaxSim)")[1]
    snippet = snippet.split("```python\n")[1].split("```")[0]
    assert 'retrieve(model, queries, documents, top_k=10, scoring="maxsim")' in snippet  # the pair knows its prompts
    exec(snippet.replace(PLACEHOLDER_MODEL_ID, str(pair)), namespace)
    assert [len(hits) for hits in namespace["hits"]] == [2]

    output = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", str(folder), "--beir", str(beir), "--output_json", str(output)]) == 0
    report = json.loads(output.read_text(encoding="utf-8"))
    assert report["scoring"] == "maxsim" and "scoring: maxsim" in capsys.readouterr().out
    student = SentenceTransformer(str(folder), device="cpu")
    teacher = SentenceTransformer(str(model_dirs["teacher"]), device="cpu")
    expected = evaluate_clir_maxsim(student, teacher, load_beir(beir), query_prompt="query: ")
    assert report["metrics"]["model"] == pytest.approx(expected, abs=1e-6)

    assert main(["evaluate", "--model", str(folder), "--beir", str(beir), "--scoring", "dense",
                 "--output_json", str(output)]) == 0
    assert json.loads(output.read_text(encoding="utf-8"))["scoring"] == "dense"


def test_dense_student_card_has_no_maxsim_block(model_dirs, tmp_path):
    folder = saved_student(model_dirs, tmp_path / "dense-student", "dense")
    assert StudentCardInfo.load(folder).scoring == "dense"
    assert "MaxSim" not in (folder / "README.md").read_text(encoding="utf-8")


def test_bad_scoring_values_are_named(model_dirs, beir, capsys):
    with pytest.raises(ValueError, match=r"StudentCardInfo.scoring must be one of \('dense', 'maxsim'\), got 'colbert'"):
        StudentCardInfo(scoring="colbert")
    for command in (["evaluate", "--model", str(model_dirs["student"]), "--beir", str(beir)], ["distill"]):
        with pytest.raises(SystemExit) as exit_info:  # one declaration: both commands refuse it while parsing flags
            main([*command, "--scoring", "colbert"])
        assert exit_info.value.code == EXIT_BAD_INPUT
        assert "--scoring: invalid choice: 'colbert' (choose from" in capsys.readouterr().err


def test_distill_records_maxsim_and_reports_the_maxsim_evaluator(model_dirs, beir, tmp_path, monkeypatch):
    import optical_hf.cli
    from optical_hf import recipe

    results = []
    monkeypatch.setattr(optical_hf.cli, "run", lambda *args: results.append(recipe.run(*args)))
    bitext = tmp_path / "pairs.tsv"
    bitext.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in toy_bitext(24, seed=6)),
                      encoding="utf-8")
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(model_dirs["teacher"]), "--student", str(model_dirs["student"]),
                 "--bitext", str(bitext), "--eval_size", "8", "--max_steps", "1", "--per_device_train_batch_size",
                 "8", "--output_dir", str(out), "--disable_tqdm", "true", "--eval_beir", str(beir),
                 "--scoring", "maxsim"]) == 0
    info = StudentCardInfo.load(out)
    assert info.scoring == "maxsim"
    clir_rows = {row["metric_type"]: row["value"] for row in info.metrics
                 if row["task_type"] == "information-retrieval"}
    student = SentenceTransformer(str(out), device="cpu")
    teacher = SentenceTransformer(str(model_dirs["teacher"]), device="cpu")
    expected = evaluate_clir_maxsim(student, teacher, load_beir(beir))
    assert clir_rows == pytest.approx(expected, abs=1e-6)
    assert {key.removeprefix("clir_"): value for key, value in results[0]["after"].items()
            if key.startswith("clir_")} == pytest.approx(expected, abs=1e-6)


def test_distill_arguments_reject_an_unknown_scoring():
    from optical_hf.recipe import DistillArguments

    with pytest.raises(OpticalInputError, match="--scoring must be one of"):
        DistillArguments(scoring="colbert")


def test_the_training_maxsim_and_the_index_scan_score_the_same():
    """One MaxSim, two kernels: the loss's batched in-batch scores (differentiable, mean over the query's tokens) and
    the chunked index scan (sum over the query's tokens) agree up to each query's token count."""
    from optical_hf.losses import _maxsim

    generator = torch.Generator().manual_seed(0)
    queries, documents = torch.randn(3, 5, 8, generator=generator), torch.randn(3, 7, 8, generator=generator)
    query_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    document_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=torch.bool)
    batched = _maxsim(queries, query_mask, documents, document_mask)  # (3 queries, 3 documents)
    index = TokenIndex.from_token_states([d[m] for d, m in zip(documents, document_mask)])
    scores, ids = maxsim_topk([q[m] for q, m in zip(queries, query_mask)], index, top_k=3, token_chunk_size=5)
    scanned = torch.empty(3, 3).scatter_(1, ids, scores)
    # the index stores unit vectors in fp16: cosines to ~1e-3 (a different scale or reduction would miss by ~0.1-1)
    torch.testing.assert_close(scanned / query_mask.sum(1, keepdim=True), batched, atol=2e-3, rtol=0)


def test_evaluate_scores_bitext_by_maxsim(model_dirs, tmp_path, capsys):
    from optical_hf.late_interaction import bitext_retrieval_maxsim

    pairs = toy_bitext(12, seed=2)
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    out = tmp_path / "scores.json"
    assert main(["evaluate", "--model", str(model_dirs["student"]), "--teacher", str(model_dirs["teacher"]),
                 "--bitext", str(tsv), "--scoring", "maxsim", "--output_json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    student, teacher = sentence_transformer(model_dirs["student"]), sentence_transformer(model_dirs["teacher"])
    expected = bitext_retrieval_maxsim(student, teacher, [s for s, _ in pairs], [t for _, t in pairs])
    assert report["scoring"] == "maxsim" and report["metrics"]["model"] == pytest.approx(expected)
    # by hand: the share of sources whose best target by sum_i max_j cos is their own translation
    index = build_index(teacher, [t for _, t in pairs], prompt="")
    states = encode_token_states(student, [s for s, _ in pairs], side="query", prompt="")
    _, best = maxsim_topk(states, index, top_k=1)
    assert expected["p@1"] == pytest.approx((best[:, 0] == torch.arange(12)).float().mean().item())
