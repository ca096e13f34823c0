"""Smoke test of benchmarks/speed.py: tiny sizes, tiny random models, every part of the report produced."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("benchmark_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profiled_peak_counts_live_tensor_bytes(speed):
    def work() -> None:
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(1_000_000)  # 8 MB live
        del a
        c = torch.empty(2_000_000)  # 4 + 8 = 12 MB live: the peak
        del b, c

    assert speed.peak_memory_bytes(work, torch.device("cpu")) == 12_000_000


def test_make_costs_pads_with_zero_cost(speed):
    cost, n, m = speed.make_costs(6, 10, seed=0, device=torch.device("cpu"), dim=16)
    assert cost.shape == (6, 10, 10) and n[0] == m[0] == 10
    assert all(5 <= k <= 10 for k in n + m)
    for i, (rows, cols) in enumerate(zip(n, m)):
        assert cost[i, rows:].abs().sum() == 0 and cost[i, :, cols:].abs().sum() == 0
        assert cost[i, :rows, :cols].min() > -1e-6


def test_paired_ratio_is_the_median_of_round_ratios_with_its_order_statistic_interval(speed):
    # 25 rounds: the distribution-free 95% interval of a median is [8th, 18th] order statistic (coverage 95.7%)
    slow_phase = [3.0 if r < 12 else 1.0 for r in range(25)]  # the machine is 3x slower in the first 12 rounds
    ratio = speed.paired_ratio([(1.0 + r / 100) * d for r, d in enumerate(slow_phase)], slow_phase)
    assert ratio["paired_median"] == pytest.approx(1.12)
    assert (ratio["low"], ratio["high"]) == (pytest.approx(1.07), pytest.approx(1.17))
    assert 0.95 < ratio["coverage"] < 0.96
    assert ratio["ratio_of_medians"] != pytest.approx(1.12)  # the slow phases do not cancel across rounds
    two = speed.paired_ratio([2.0, 6.0], [1.0, 2.0])  # too few rounds for 95%: the full range, coverage stated
    assert (two["low"], two["high"], two["coverage"]) == (2.0, 3.0, 0.5)


def test_objective_overhead_is_the_median_round_difference_over_the_mse_step(speed):
    slow_phase = [3.0 if r < 12 else 1.0 for r in range(25)]
    mse = [0.010 * d for d in slow_phase]
    ot = [m + 0.001 * (20 + r) for r, m in enumerate(mse)]  # adds 20..44 ms, median 32 ms: the slow phase cancels
    overhead = speed.objective_overhead(ot, mse, mse_step=[0.8, 1.6, 1.0])
    assert overhead["added_ms"] == pytest.approx(32.0)
    assert (overhead["added_low_ms"], overhead["added_high_ms"]) == (pytest.approx(27.0), pytest.approx(37.0))
    assert overhead["mse_step_ms"] == pytest.approx(1000.0)
    assert (overhead["ratio"], overhead["low"], overhead["high"]) == (
        pytest.approx(1.032), pytest.approx(1.027), pytest.approx(1.037))


@pytest.mark.parametrize("flag", ["--repeats", "--tol-repeats", "--train-repeats", "--objective-repeats"])
def test_repeat_counts_below_one_are_refused_naming_the_flag(speed, flag, capsys):
    with pytest.raises(SystemExit):
        speed.parse_args(["--parts", "ot", flag, "0"])
    assert f"argument {flag}: expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_report_only_needs_a_stored_json(speed, tmp_path, capsys):
    with pytest.raises(SystemExit):
        speed.parse_args(["--report-only", "--output-dir", str(tmp_path)])
    assert f"--report-only: no {tmp_path / 'speed.json'} to render" in capsys.readouterr().err


def test_stored_report_is_the_rendering_of_the_stored_json(speed):
    results = SCRIPT.parent / "results"
    rendered = speed.render_markdown(json.loads((results / "speed.json").read_text()))
    assert rendered == (results / "speed.md").read_text(), "re-render it: python benchmarks/speed.py --report-only"


def test_quick_run_writes_complete_report(speed, model_dirs, tmp_path, monkeypatch):
    results = speed.main([
        "--quick", "--threads", "1", "--output-dir", str(tmp_path),
        "--student", str(model_dirs["student"]), "--teacher", str(model_dirs["teacher"]),
    ])
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["targets"] == results["targets"] and len(saved["targets"]) == 5

    (config,) = saved["ot_core"]
    assert set(config["equal_iters"]) == {
        "ours_envelope", "ours_autodiff", "pot_solve_batch_envelope", "pot_solve_batch_scaling_envelope",
        "pot_sinkhorn_log_loop_envelope", "pot_sinkhorn_log_loop_autodiff",
    }
    assert config["equal_iters"]["pot_solve_batch_scaling_envelope"]["domain"] == "scaling"
    assert config["equal_iters"]["ours_envelope"]["domain"] in ("scaling", "log")
    for setting in ("equal_iters", "equal_tol"):
        for name, row in config[setting].items():
            assert row["finite"], (setting, name)
            assert row["median_ms"] > 0 and len(row["times_ms"]) == 2
    equal_iters, equal_tol = config["equal_iters"], config["equal_tol"]
    assert {row["iters_max"] for row in equal_iters.values()} == {5}  # --quick runs 5 iterations everywhere
    assert equal_iters["ours_autodiff"]["peak_mem_mb"] > equal_iters["ours_envelope"]["peak_mem_mb"]
    # --quick: tol 1e-3 within 500 iterations; ours and POT with the L1-guaranteeing tol reach it, on the same plan
    for name in ("ours_envelope", "pot_solve_batch_envelope_l1", "pot_solve_batch_scaling_envelope_l1"):
        assert equal_tol[name]["iters_max"] < 500
        assert max(equal_tol[name]["row_marginal_l1_max"], equal_tol[name]["col_marginal_l1_max"]) < 1e-3
    assert equal_tol["pot_solve_batch_envelope_l1"]["tol_passed"] < equal_tol["pot_solve_batch_envelope"]["tol_passed"]
    assert equal_tol["pot_solve_batch_envelope_l1"]["max_plan_diff_vs_ours"] < 1e-3

    steps = saved["training"]["steps"]
    assert set(steps) == {"ot_envelope", "ot_cached_teacher", "ot_autodiff", "mse_precomputed_labels",
                          "mse_teacher_online", "mse_two_column_precomputed_labels"}
    cached = saved["training"]["time_ratios"]["ot_cached_teacher/mse_precomputed_labels"]
    assert cached["low"] <= cached["paired_median"] <= cached["high"]
    assert any(target.startswith("OT step with cached teacher <= 1.05x") for target in saved["targets"])
    assert all(row["finite"] and row["median_ms"] > 0 and row["peak_mem_mb"] > 0 for row in steps.values())
    assert saved["training"]["setup"]["batch_size"] == 4
    objectives, overhead = saved["training"]["objectives"], saved["training"]["objective_overhead"]
    assert set(objectives) == {"ot_cached_objective", "mse_objective"}
    assert all(row["median_ms"] > 0 for row in objectives.values())
    assert overhead["added_low_ms"] <= overhead["added_ms"] <= overhead["added_high_ms"]
    assert overhead["ratio"] == pytest.approx(1 + overhead["added_ms"] / overhead["mse_step_ms"])
    assert any("from the objectives alone" in target for target in saved["targets"])

    report = (tmp_path / "speed.md").read_text()
    for heading in ("## OT core", "### Equal iterations", "### Equal tolerance", "## Training step",
                    "### The objective alone", "## Targets"):
        assert heading in report
    assert "| ot_envelope |" in report and "| ot_cached_teacher |" in report and saved["machine"]["command"] in report

    # --report-only re-renders the same report from the stored json alone, measuring nothing and leaving the json as is
    stored = (tmp_path / "speed.json").read_bytes()
    (tmp_path / "speed.md").write_text("stale")
    for name in ("measure_all", "measure", "bench_ot_config", "bench_training", "machine_info"):
        monkeypatch.setattr(speed, name, lambda *args, **kwargs: pytest.fail("--report-only measured something"))
    assert speed.main(["--report-only", "--output-dir", str(tmp_path)]) == saved
    assert (tmp_path / "speed.md").read_text() == report
    assert (tmp_path / "speed.json").read_bytes() == stored
