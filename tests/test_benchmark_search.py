"""benchmarks/search.py on the synthetic AfriQA layout of test_benchmark_quality, with a tiny random model as "e5":
every mode runs, exact settings reproduce the exact scans, and the report, JSON and plot are written."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import sentence_transformer
from test_benchmark_quality import _data_dir

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def search():
    sys.path.insert(0, str(BENCHMARKS))  # search.py imports quality.py and common.py as its neighbours
    try:
        import search as module
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))
        for name in ("search", "quality", "common"):
            sys.modules.pop(name, None)


def _run(search, model_dirs, tmp_path, *flags: str) -> Path:
    """search.py on the synthetic layout with a tiny model as "e5" and ``flags``; returns its output folder."""
    model = tmp_path / "model"
    sentence_transformer(model_dirs["student"]).save(str(model))
    out = tmp_path / "out"
    search.main(["--data-dir", str(_data_dir(tmp_path / "data")), "--lang", "xx", "--e5-path", str(model),
                 "--doc-max-length", "32", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out), *flags])
    return out


def test_search_benchmark_on_a_copy_of_the_layout(search, model_dirs, tmp_path):
    out = _run(search, model_dirs, tmp_path, "--factories", "IVF2,Flat", "--decoded-factories", "IVF2,Flat",
               "--pool-factors", "1.5", "--sweep", "2,1000,1000", "1,2,3", "--sizes", "25", "40",
               "--scale-queries", "4", "--qdrant-queries", "3", "--scale-chunk", "15")  # 2 and 3 chunks per size
    result = json.loads((out / "search.json").read_text(encoding="utf-8"))
    rows = {(row["mode"], row.get("nprobe"), row.get("token_k")): row for row in result["real"]}
    assert result["passages"] == 60 and result["queries"] == 10
    exact_dense = rows["dense exact (semantic_search)", None, None]
    exact_maxsim = rows["maxsim exact (TokenIndex, fp16)", None, None]
    assert exact_dense["recall@100_vs_exact"] == exact_maxsim["recall@100_vs_exact"] == 1.0
    # every list probed, every token fetched, every candidate re-ranked: the exact ranking and MRR
    for factory in ("Flat, re-rank exact fp16", "Flat, re-rank decoded codes", "IVF2,Flat, re-rank exact fp16"):
        full = rows[f"maxsim FAISS {factory}", 2, 1000]
        assert full["recall@10_vs_exact"] == 1.0 and full["mrr@10"] == pytest.approx(exact_maxsim["mrr@10"], abs=1e-6)
        tight = rows[f"maxsim FAISS {factory}", 1, 2]  # 3 candidates only: at most 3 of the exact top 10
        assert tight["recall@10_vs_exact"] <= 0.3 + 1e-9
    assert rows["maxsim FAISS IVF2,Flat, re-rank decoded codes", 2, 1000]["recall@10_vs_exact"] == 1.0
    pooled = rows["maxsim exact (TokenIndex, fp16), tokens pooled x1.5", None, None]  # fewer tokens, another ranking
    assert pooled["index_bytes"] < 0.8 * exact_maxsim["index_bytes"]
    pooled_faiss = rows["maxsim FAISS IVF2,Flat, re-rank decoded codes, tokens pooled x1.5", 2, 1000]
    assert pooled_faiss["mrr@10"] == pytest.approx(pooled["mrr@10"], abs=1e-6)  # the pooled exact scan, approximated
    assert rows["dense FAISS HNSW32", 16, None]["recall@10_vs_exact"] == 1.0  # 40 passages: HNSW finds them all
    assert rows["maxsim Qdrant (local mode)", None, None]["recall@10_vs_exact"] == 1.0
    assert [row["passages"] for row in result["scale"]] == [25, 40]
    # built and scanned chunk by chunk (15 + 10 passages): the token search reaches all 25 passages and re-ranks them
    # over the exact tokens, so its top 100 is the exact top 100 merged from every chunk (recall is out of
    # min(100, passages): a merge that lost a chunk would score < 1); at 40 it misses a few (token_k 64)
    recall = [row["recall@100_vs_exact"] for row in result["scale"]]
    assert recall[0] == 1.0 and 0.9 <= recall[1] <= 1.0
    assert all(row["index_bytes"] > 0 for row in result["scale"])
    report = (out / "search.md").read_text(encoding="utf-8")
    assert "| maxsim FAISS IVF2,Flat, re-rank exact fp16 | 1 / 2 / 3 |" in report and "1M passages take" in report
    if importlib.util.find_spec("matplotlib") is None:  # the bench extra
        assert not (out / "search.png").exists()
    else:
        assert (out / "search.png").stat().st_size > 0


def test_the_compact_scale_index_pools_and_drops_the_fp16_copy(search, model_dirs, tmp_path):
    out = _run(search, model_dirs, tmp_path, "--sweep", "2,1000,1000", "--sizes", "40", "--scale-queries", "4",
               "--qdrant-queries", "1", "--skip-qdrant-maxsim", "--scale-pool-factor", "2", "--scale-decoded", "--scale-chunk", "15",
               "--scale-exact-up-to", "30", "--real-sizes", "30", "0")
    result = json.loads((out / "search.json").read_text(encoding="utf-8"))
    (row,) = result["scale"]
    assert row["rerank"] == "decoded codes" and row["exact_bytes"] == 0 and row["pool_factor"] == 2
    assert row["indexed_tokens"] < 0.6 * row["tokens"] and row["index_bytes"] > 0
    assert row["recall@100_vs_exact"] is None and row["exact_p95_ms"] is None  # 40 passages: past the exact scan
    report = (out / "search.md").read_text(encoding="utf-8")
    (line,) = [line for line in report.splitlines() if line.startswith("| 40 | ")]
    assert "| x2 | " in line and "| decoded codes | " in line and line.endswith(" | - | - |")
    # the real corpus against size: the 60 AfriQA passages, then the 6 LAFAND English sentences; at each size the
    # exact scan, the default index (Flat at this size: the exact ranking) and the compact one
    real = result["real_scale"]
    assert [(r["passages"], r["mode"].split(",")[0]) for r in real] == [
        (30, "exact fp16 scan (TokenIndex)"), (30, "FAISS Flat"), (30, "FAISS Flat"),
        (66, "exact fp16 scan (TokenIndex)"), (66, "FAISS Flat"), (66, "FAISS Flat")]
    assert all(r["recall@10_vs_exact"] == 1.0 for r in real[:2] + real[3:5]) and real[3]["tokens"] > real[0]["tokens"]
    assert real[2]["mode"].endswith("re-rank decoded codes, tokens pooled x2") and real[2]["index_bytes"] > 0
    assert "## Real corpus against size" in report and "| 66 | " in report


def test_synthetic_passages_keep_the_real_token_counts(search):
    from optical_hf import TokenIndex

    real = TokenIndex.from_token_states([torch.randn(n, 8) for n in (3, 5, 7)])
    chunks = list(search.synthetic(real, 50, noise=0.5, seed=0, chunk=20))
    assert [chunk.num_passages for chunk in chunks] == [20, 20, 10]
    assert [pid for chunk in chunks for pid in chunk.ids] == [f"s{i}" for i in range(50)]
    for fake in chunks:
        assert set(fake.offsets.diff().tolist()) <= {3, 5, 7}
        assert torch.allclose(fake.vectors.float().norm(dim=1), torch.ones(len(fake.vectors)), atol=1e-2)


def test_export_size_reports_the_pair_against_the_student(model_dirs, tmp_path):
    """benchmarks/export_size.py with a tiny model as "e5": each row's pair folder holds the student and the teacher."""
    model = tmp_path / "model"
    sentence_transformer(model_dirs["student"]).save(str(model))
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import export_size
        report = export_size.main(["--e5", str(model), "--output", str(tmp_path / "export_size.md")])
    finally:
        sys.path.remove(str(BENCHMARKS))
        sys.modules.pop("export_size", None)
    assert (tmp_path / "export_size.md").read_text(encoding="utf-8") == report
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ")][1:]  # after the header
    ratios = {row[0].strip("| "): float(row[3].strip(" |")) for row in rows}
    assert len(ratios) == 3 and ratios["all-MiniLM-L6-v2 → all-MiniLM-L6-v2"] == pytest.approx(2.0, abs=0.05)
    assert all(ratio > 1 for ratio in ratios.values())


def test_a_pool_factor_below_one_is_refused_naming_the_flag(search, capsys):
    with pytest.raises(SystemExit):
        search.parse_args(["--pool-factors", "2", "0.5"])
    assert "--pool-factors 2.0 0.5: each must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        search.parse_args(["--scale-pool-factor", "0.5"])
    assert "--scale-pool-factor 0.5: must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        search.parse_args(["--scale-pq", "0"])
    assert "--scale-pq 0: must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        search.parse_args(["--real-sizes", "100", "-1"])
    assert "--real-sizes 100 -1: each must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        search.parse_args(["--scale-chunk", "0"])
    assert "--scale-chunk 0: must be >= 1" in capsys.readouterr().err


def test_a_real_size_past_the_pool_is_refused_before_any_model_loads(search, model_dirs, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before --real-sizes was checked")

    monkeypatch.setattr(search.quality, "load_model", no_model)
    with pytest.raises(SystemExit, match=r"--real-sizes 67: the real pool holds 66 passages"):
        _run(search, model_dirs, tmp_path, "--sizes", "--real-sizes", "10", "67")
