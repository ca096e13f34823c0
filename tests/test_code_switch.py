"""Word alignments from OT plans and code-switched bitext (optical_hf.code_switch)."""

from __future__ import annotations

import pytest
import torch
from conftest import sentence_transformer

from optical_hf.code_switch import (
    Alignment,
    align,
    code_switch,
    identity_link_rate,
    lexicon_alignments,
    links_from_word_plan,
    load_alignments,
    save_alignments,
    word_plan,
)
from optical_hf.errors import OpticalInputError


def test_sub_words_are_merged_into_words():
    # source tokens: "mabadi" "##liko" (word 0), "kutoka" (word 1); target tokens: "change" (0), "from" (1)
    plan = torch.tensor([[0.30, 0.02], [0.15, 0.03], [0.05, 0.45]])
    words = word_plan(plan, [0, 0, 1], [0, 1])
    torch.testing.assert_close(words, torch.tensor([[0.45, 0.05], [0.05, 0.45]]))
    assert links_from_word_plan(words) == [(0, 0, pytest.approx(0.45)), (1, 1, pytest.approx(0.45))]


def test_the_two_linking_rules():
    words = torch.tensor([[0.5, 0.4, 0.1], [0.5, 0.0, 0.0]])
    # mutual argmax: word 0's best is 0 and target 0's best is source 0 (first of the tie); source 1 -> 0 is not mutual
    assert [(a, b) for a, b, _ in links_from_word_plan(words)] == [(0, 0)]
    # threshold: at least 40% of the source word's mass
    assert [(a, b) for a, b, _ in links_from_word_plan(words, "threshold", 0.4)] == [(0, 0), (0, 1), (1, 0)]
    with pytest.raises(OpticalInputError, match="rule must be one of"):
        links_from_word_plan(words, "intersection")


def _toy() -> Alignment:
    source, target = "Paka mweusi analala.", "The black cat sleeps."
    return Alignment(source, target, [(0, 4), (5, 11), (12, 19)], [(0, 3), (4, 9), (10, 13), (14, 20)],
                     [(0, 2, 0.3), (1, 1, 0.3), (2, 3, 0.25), (2, 2, 0.01)])


def test_code_switching_replaces_linked_words_with_probability_p():
    toy = _toy()
    assert code_switch([toy], 1.0) == ["The mweusi Paka analala."]
    assert code_switch([toy], 0.0) == [toy.target]
    assert code_switch([toy], 1.0, side="source") == ["cat black sleeps."]  # word 2 takes its heaviest link
    assert code_switch([toy] * 3, 0.5, seed=1) == code_switch([toy] * 3, 0.5, seed=1)
    variants = {v for seed in range(30) for v in code_switch([toy], 0.5, seed=seed)}
    assert len(variants) > 2, "p = 0.5 should give several variants"
    with pytest.raises(OpticalInputError, match="p must be in"):
        code_switch([toy], 1.5)


def test_alignments_round_trip_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "alignments.jsonl"
    save_alignments(path, [_toy()])
    assert load_alignments(path) == [_toy()]
    path.write_text(path.read_text(encoding="utf-8") + "{not json\n", encoding="utf-8")
    with pytest.raises(OpticalInputError, match=r"alignments.jsonl, line 2: not an alignment line"):
        load_alignments(path)


def test_a_lexicon_can_replace_the_plans(tmp_path):
    lexicon = tmp_path / "lexicon.tsv"
    lexicon.write_text("paka\tcat\nmweusi\tblack\n", encoding="utf-8")
    (alignment,) = lexicon_alignments([("Paka mweusi analala.", "The black cat sleeps.")], lexicon)
    assert [(alignment.words("source")[a], alignment.words("target")[b]) for a, b, _ in alignment.links] == [
        ("Paka", "cat"), ("mweusi", "black")]
    assert code_switch([alignment], 1.0) == ["The mweusi Paka sleeps."]
    lexicon.write_text("paka cat\n", encoding="utf-8")
    with pytest.raises(OpticalInputError, match="lexicon.tsv, line 1: expected"):
        lexicon_alignments([("a", "b")], lexicon)


def test_identical_numbers_and_names_are_counted():
    source, target = "Vatican ina watu 800.", "Vatican has 800 people."
    words = Alignment(source, target, [(0, 7), (8, 11), (12, 16), (17, 20), (20, 21)],
                      [(0, 7), (8, 11), (12, 15), (16, 22), (22, 23)], [(0, 0, 1.0), (3, 2, 1.0), (4, 1, 1.0)])
    assert identity_link_rate([words]) == (2 / 3, 3)  # Vatican and 800 linked, "." linked elsewhere


def test_align_links_each_word_of_a_sentence_with_itself(model_dirs):
    model = sentence_transformer(model_dirs["teacher"])
    pairs = [("the black cat sleeps", "the black cat sleeps"), ("rain falls", "rain falls")]
    alignments = align(model, pairs)
    for alignment in alignments:  # the same model on the same sentence: identical token states, a diagonal plan
        n = len(alignment.source_spans)
        assert n == len(alignment.words("source")) and n > 1
        assert sorted((a, b) for a, b, _ in alignment.links) == [(k, k) for k in range(n)]
    assert identity_link_rate(alignments)[1] == 0  # lower-case words: not counted


def test_distill_trains_on_code_switched_pairs_and_stores_the_alignments(model_dirs, tmp_path, monkeypatch):
    from conftest import toy_bitext

    from optical_hf import recipe
    from optical_hf.cli import main
    from optical_hf.model_card import StudentCardInfo

    bitext = tmp_path / "pairs.tsv"
    bitext.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in toy_bitext(40, seed=3)), encoding="utf-8")
    sizes = []
    augment = recipe.code_switched_bitext
    monkeypatch.setattr(recipe, "code_switched_bitext", lambda *a, **k: sizes.append(len(a[0])) or augment(*a, **k))
    stored = tmp_path / "alignments.jsonl"
    argv = ["distill", "--teacher", str(model_dirs["teacher"]), "--student", str(model_dirs["student"]), "--bitext",
            str(bitext), "--eval_size", "8", "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--disable_tqdm", "true", "--code_switch_p", "1.0", "--code_switch_alignments", str(stored)]
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 0
    alignments = load_alignments(stored)
    assert len(alignments) == sizes[0] == 32 and sum(len(a.links) for a in alignments) > 0
    assert StudentCardInfo.load(tmp_path / "out").training["code_switch_p"] == 1.0
    before = stored.stat().st_mtime_ns
    assert main([*argv, "--output_dir", str(tmp_path / "again")]) == 0  # read back, not aligned again
    assert stored.stat().st_mtime_ns == before


@pytest.mark.parametrize("flags, message", [
    (["--code_switch_side", "source"], "--code_switch_side has no effect without --code_switch_p"),
    (["--code_switch_p", "1.5"], r"--code_switch_p must be a number in \[0, 1\], got 1.5"),
    (["--code_switch_p", "0.5", "--code_switch_lexicon", "missing.tsv"], "--code_switch_lexicon missing.tsv: no such"),
])
def test_distill_checks_the_code_switch_flags_before_loading(flags, message, capsys, tmp_path):
    import re

    from optical_hf.cli import main

    assert main(["distill", "--output_dir", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
