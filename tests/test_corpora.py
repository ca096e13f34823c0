"""Tests for optical_hf.corpora: AfriQA gold pool, FLORES and BEIR loaders on small files, their errors, and the
real shared data (skipped when ../shared is absent)."""

import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from optical_hf.corpora import (
    CorpusFormatError,
    afriqa_files,
    flores_pairs,
    load_afriqa_gold,
    load_beir,
    load_flores,
    passage_id,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AFRIQA = SHARED / "data" / "afriqa"
FLORES = SHARED / "data" / "flores-sib200"

PASSAGE_A = "Abuja is the capital city of Nigeria."
PASSAGE_B = "The Niger is the main river of West Africa."
PASSAGE_C = "Kigali is the capital of Rwanda."


def gold_row(qid: str, question, context, translation="What is it?") -> dict:
    return {"id": qid, "question_lang": question, "question_translated": translation, "context": context, "title": "t"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def gold_file(root: Path, lang: str, split: str, rows: list[dict]) -> Path:
    return write_jsonl(root / lang / f"gold_span_passages.afriqa.{lang}.en.{split}.json", rows)


@pytest.fixture
def gold_root(tmp_path) -> Path:
    root = tmp_path / "gold_passages"
    gold_file(root, "hau", "dev", [
        gold_row("0", "Ina babban birnin Najeriya?", PASSAGE_A, "Where is the capital of Nigeria?"),
        gold_row("1", "Wane kogi?", "  " + PASSAGE_B + "\n", "Which river?"),
        gold_row("2", "Babu mahallin?", None),
        gold_row("3", "Fanko?", "   "),
    ])
    gold_file(root, "hau", "train", [gold_row("0", "Ina Abuja?", PASSAGE_A)])
    gold_file(root, "kin", "train", [gold_row("0", "Umurwa mukuru?", PASSAGE_C), gold_row("1", float("nan"), PASSAGE_B)])
    return root


# ---- AfriQA ---------------------------------------------------------------------------------------------------------


def test_afriqa_files_explicit_all_and_parent_folder(gold_root):
    assert afriqa_files(gold_root, "hau", "dev") == [gold_root / "hau" / "gold_span_passages.afriqa.hau.en.dev.json"]
    names = [path.name for path in afriqa_files(gold_root.parent)]
    assert names == [
        "gold_span_passages.afriqa.hau.en.dev.json",
        "gold_span_passages.afriqa.hau.en.train.json",
        "gold_span_passages.afriqa.kin.en.train.json",
    ]
    assert len(afriqa_files(gold_root, ["hau", "kin"], "train")) == 2


def test_afriqa_files_missing_split_is_named(gold_root):
    with pytest.raises(FileNotFoundError, match=r"gold_span_passages\.afriqa\.kin\.en\.dev\.json.*'kin'.*'dev'"):
        afriqa_files(gold_root, "kin", "dev")
    with pytest.raises(FileNotFoundError, match="not found"):
        afriqa_files(gold_root / "nowhere")


def test_load_afriqa_gold_queries_qrels_and_skipped_rows(gold_root, caplog):
    with caplog.at_level(logging.INFO, logger="optical_hf.corpora"):
        data = load_afriqa_gold(afriqa_files(gold_root, "hau", "dev"))
    assert data.queries == {"hau.dev:0": "Ina babban birnin Najeriya?", "hau.dev:1": "Wane kogi?"}
    assert data.qrels == {"hau.dev:0": {passage_id(PASSAGE_A): 1}, "hau.dev:1": {passage_id(PASSAGE_B): 1}}
    assert data.corpus == {passage_id(PASSAGE_A): PASSAGE_A, passage_id(PASSAGE_B): PASSAGE_B}
    assert data.translations == {"hau.dev:0": "Where is the capital of Nigeria?", "hau.dev:1": "Which river?"}
    assert "skipped 2 rows with an empty context" in caplog.text


def test_load_afriqa_gold_pool_is_deduplicated_across_files(gold_root):
    data = load_afriqa_gold(afriqa_files(gold_root, "hau", "dev"), afriqa_files(gold_root))
    # A appears in hau dev and hau train, B in hau dev (with extra spaces) and kin train: 3 distinct passages
    assert sorted(data.corpus.values()) == sorted([PASSAGE_A, PASSAGE_B, PASSAGE_C])
    assert len(data.queries) == 2
    for qid, judgements in data.qrels.items():
        assert all(docid in data.corpus for docid in judgements), qid


def test_load_afriqa_gold_adds_query_passages_missing_from_pool_and_skips_nan_question(gold_root):
    data = load_afriqa_gold(afriqa_files(gold_root, "kin", "train"), afriqa_files(gold_root, "hau", "train"))
    assert data.queries == {"kin.train:0": "Umurwa mukuru?"}  # the NaN question is skipped
    assert set(data.corpus.values()) == {PASSAGE_A, PASSAGE_C}


def test_load_afriqa_gold_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(gold_row("0", "q", PASSAGE_A)) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(CorpusFormatError, match=r"bad\.json, line 3: invalid JSON"):
        load_afriqa_gold([path])


def test_load_afriqa_gold_missing_key_names_file_and_line(tmp_path):
    row = gold_row("1", "q", PASSAGE_B)
    del row["question_lang"]
    path = write_jsonl(tmp_path / "nokey.json", [gold_row("0", "q", PASSAGE_A), row])
    with pytest.raises(CorpusFormatError, match=r"nokey\.json, line 2: missing key\(s\) \['question_lang'\]"):
        load_afriqa_gold([path])


def test_load_afriqa_gold_rejects_non_objects_duplicates_and_missing_files(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(CorpusFormatError, match=r"list\.json, line 1: expected a JSON object"):
        load_afriqa_gold([listed])
    duplicated = write_jsonl(tmp_path / "dup.json", [gold_row("7", "q", PASSAGE_A), gold_row("7", "r", PASSAGE_B)])
    with pytest.raises(CorpusFormatError, match=r"dup\.json, line 2: duplicate query id '7'"):
        load_afriqa_gold([duplicated])
    valid = write_jsonl(tmp_path / "valid.json", [gold_row("0", "q", PASSAGE_A)])
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        load_afriqa_gold([valid], [valid, tmp_path / "missing.json"])


# ---- FLORES ---------------------------------------------------------------------------------------------------------


def write_flores(root: Path, lang: str, split: str, rows: list[tuple[str, str]]) -> Path:
    path = root / lang / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "index_id\tcategory\ttext\n" + "".join(f"{i}\tnews\t{text}\n" for i, text in rows), encoding="utf-8"
    )
    return path


def test_load_flores_splits_and_pairs(tmp_path):
    write_flores(tmp_path, "swh_Latn", "dev", [("1", 'Habari "njema"'), ("2", "Asante")])
    write_flores(tmp_path, "swh_Latn", "test", [("5", "Karibu")])
    write_flores(tmp_path, "eng_Latn", "dev", [("2", "Thank you"), ("1", 'Good "news"')])
    write_flores(tmp_path, "eng_Latn", "test", [("5", "Welcome"), ("9", "Unpaired")])
    assert load_flores(tmp_path, "swh_Latn") == {"1": 'Habari "njema"', "2": "Asante", "5": "Karibu"}
    assert load_flores(tmp_path, "swh_Latn", "test") == {"5": "Karibu"}
    sources, targets = flores_pairs(tmp_path, "swh_Latn")
    assert list(zip(sources, targets)) == [
        ('Habari "njema"', 'Good "news"'), ("Asante", "Thank you"), ("Karibu", "Welcome")
    ]
    assert flores_pairs(tmp_path, "swh_Latn", split="dev") == (['Habari "njema"', "Asante"], ['Good "news"', "Thank you"])


def test_load_flores_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="swh_Latn"):
        load_flores(tmp_path, "swh_Latn")
    bad = write_flores(tmp_path, "swh_Latn", "dev", [("1", "a")])
    bad.write_text(bad.read_text(encoding="utf-8") + "2\tnews\n", encoding="utf-8")
    with pytest.raises(CorpusFormatError, match=r"dev\.tsv, line 3: expected 3 tab-separated columns, got 2"):
        load_flores(tmp_path, "swh_Latn")
    with pytest.raises(FileNotFoundError, match=r"devtest\.tsv"):
        load_flores(tmp_path, "swh_Latn", ["devtest"])
    write_flores(tmp_path, "yor_Latn", "dev", [("1", "a")])
    write_flores(tmp_path, "yor_Latn", "test", [("1", "b")])
    with pytest.raises(CorpusFormatError, match="index_id '1' already appears"):
        load_flores(tmp_path, "yor_Latn")
    headless = tmp_path / "zul_Latn" / "dev.tsv"
    headless.parent.mkdir()
    headless.write_text("1\tnews\ttext\n", encoding="utf-8")
    with pytest.raises(CorpusFormatError, match=r"dev\.tsv, line 1: expected a header"):
        load_flores(tmp_path, "zul_Latn")


# ---- BEIR -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def beir_folder(tmp_path) -> Path:
    write_jsonl(tmp_path / "corpus.jsonl", [
        {"_id": "d1", "title": "Abuja", "text": PASSAGE_A},
        {"_id": "d2", "title": "", "text": PASSAGE_B},
        {"_id": 3, "text": PASSAGE_C},
    ])
    write_jsonl(tmp_path / "queries.jsonl", [
        {"_id": "q1", "text": "capital of Nigeria"},
        {"_id": "q2", "text": "river"},
        {"_id": "q3", "text": "train-only query"},
    ])
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq2\td2\t2\n", encoding="utf-8"
    )
    return tmp_path


def test_load_beir(beir_folder):
    data = load_beir(beir_folder)
    assert data.corpus == {"d1": f"Abuja {PASSAGE_A}", "d2": PASSAGE_B, "3": PASSAGE_C}
    assert data.queries == {"q1": "capital of Nigeria", "q2": "river"}  # q3 has no judgement in this split
    assert data.qrels == {"q1": {"d1": 1, "d2": 0}, "q2": {"d2": 2}}
    assert data.translations == {}


def test_load_beir_with_trec_qrels(beir_folder):
    trec = beir_folder / "dev.qrels"
    trec.write_text("q3 0 3 1\nq2 0 d1 0\n", encoding="utf-8")
    data = load_beir(beir_folder, qrels_file=trec)
    assert data.queries == {"q3": "train-only query"}
    assert data.qrels == {"q3": {"3": 1}}


def test_load_beir_errors(beir_folder):
    with pytest.raises(FileNotFoundError, match=r"qrels/dev\.tsv"):
        load_beir(beir_folder, split="dev")
    bad_qrels = beir_folder / "bad.tsv"
    bad_qrels.write_text("q1 d1\n", encoding="utf-8")
    with pytest.raises(CorpusFormatError, match=r"bad\.tsv, line 1: expected"):
        load_beir(beir_folder, qrels_file=bad_qrels)
    bad_qrels.write_text("q1\td1\thigh\n", encoding="utf-8")
    with pytest.raises(CorpusFormatError, match=r"bad\.tsv, line 1: relevance 'high'"):
        load_beir(beir_folder, qrels_file=bad_qrels)
    unknown = beir_folder / "unknown.tsv"
    unknown.write_text("q9\td1\t1\n", encoding="utf-8")
    with pytest.raises(CorpusFormatError, match=r"not in .*queries\.jsonl.*q9"):
        load_beir(beir_folder, qrels_file=unknown)
    (beir_folder / "corpus.jsonl").write_text('{"_id": "d1", "title": "x"}\n', encoding="utf-8")
    with pytest.raises(CorpusFormatError, match=r"corpus\.jsonl, line 1: missing key\(s\) \['text'\]"):
        load_beir(beir_folder)


# ---- real shared data -----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not AFRIQA.is_dir(), reason="../shared/data/afriqa is absent")
def test_real_afriqa_hau_dev_against_all_gold_passages():
    pool = afriqa_files(AFRIQA)
    data = load_afriqa_gold(afriqa_files(AFRIQA, "hau", "dev"), pool)
    print(f"AfriQA hau dev: {len(data.queries)} queries, {len(pool)} pool files, {len(data.corpus)} passages")
    assert len(pool) == 13
    assert 200 <= len(data.queries) <= 225  # 225 rows, a few with an empty context
    assert 2_500 <= len(data.corpus) <= 3_510  # 3,510 rows in all, minus empty contexts and duplicates
    assert set(data.translations) == set(data.queries)
    assert all(next(iter(judgements)) in data.corpus for judgements in data.qrels.values())


@pytest.mark.skipif(not FLORES.is_dir(), reason="../shared/data/flores-sib200 is absent")
def test_real_flores_swh_vs_eng_has_1004_pairs():
    sources, targets = flores_pairs(FLORES, "swh_Latn")
    print(f"FLORES swh_Latn-eng_Latn: {len(sources)} pairs")
    assert len(sources) == len(targets) == 1004
    swahili, english = load_flores(FLORES, "swh_Latn"), load_flores(FLORES, "eng_Latn")
    index_id = next(iter(swahili))
    assert targets[sources.index(swahili[index_id])] == english[index_id]
