"""benchmarks/quality.py on a synthetic copy of the AfriQA/LAFAND layout, with a tiny random model as "e5".

What the held-out rerun relies on: data found through ``--data-dir`` and ``--split`` alone, a language without LAFAND
bitext, the evaluated questions kept out of the training bitext, every scoring mode from one trained student, and
a rerun that skips what is stored.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import foreign, sentence_transformer, toy_bitext

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
        run("xx", "a", 0, 0.50), run("xx", "a", 1, 0.54), run("xx", "b", 0, 0.47), run("xx", "b", 1, 0.53),
        run("xx", "b", 0, 0.90, pairs=10),  # a smaller budget: not compared
        run("yy", "a", 0, 0.40), run("yy", "a", 1, 0.60), run("yy", "b", 0, 0.45),  # seed 1 has no partner
        run("zz", "a", 0, 0.30),  # b never ran on zz
    ]
    header, rule, row = quality.margin_table(records, "e5", [("a", "b"), ("a", "missing")])
    assert header == "| comparison | xx | yy | zz | wins | mean |"
    assert row == "| a − b | +0.020 (s0 +0.030, s1 +0.010) | -0.050 | - | 1/2 | -0.015 |"
    assert quality.parse_comparison(" ot [recipe] vs mse [lr2e-4] ") == ("ot [recipe]", "mse [lr2e-4]")
    with pytest.raises(Exception, match="expected 'SYSTEM vs SYSTEM'"):
        quality.parse_comparison("ot [recipe], mse")
