"""Hybrid batches (optical_hf.hybrid): the sampler's proportions, layout and determinism, each schedule's values, and
the wiring into both front ends and the CLI."""

from __future__ import annotations

import functools
import math
import re

import pytest
from conftest import sentence_transformer
from sentence_transformers import SentenceTransformerTrainingArguments
from transformers import AutoModel, AutoTokenizer

from optical_hf import OTDistillationConfig, OTDistillationTrainer, OTLossConfig
from optical_hf.arguments import HybridBatchArguments
from optical_hf.cli import main
from optical_hf.hybrid import AlphaSchedule, HybridBatchSampler, HybridState, with_monolingual
from optical_hf.recipe import build_trainer
from optical_hf.vocabulary import Prompts


def _sampler(alpha: float, granularity: str, n_cross: int = 2000, batch_size: int = 8, seed: int = 0,
             drop_last: bool = False) -> HybridBatchSampler:
    return HybridBatchSampler(range(2 * n_cross), batch_size, drop_last, seed=seed, n_cross=n_cross,
                              state=HybridState(alpha), granularity=granularity)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_batches_are_monolingual_with_probability_alpha(alpha):
    sampler = _sampler(alpha, "batch")
    batches = list(sampler)
    assert len(batches) == len(sampler) == math.ceil(2000 / 8)  # the cross-lingual pairs' number of batches
    kinds = [{index >= 2000 for index in batch} for batch in batches]
    assert all(len(kind) == 1 for kind in kinds), "a batch mixes kinds at granularity 'batch'"
    share = sum(kind == {True} for kind in kinds) / len(kinds)
    assert abs(share - alpha) <= 4 * math.sqrt(max(alpha * (1 - alpha), 1e-9) / len(kinds))  # 4 standard errors
    indices = [index for batch in batches for index in batch]
    assert len(indices) == 2000 and all(0 <= index < 4000 for index in indices)
    assert len(set(indices)) == len(indices), "an index repeats within an epoch"


def test_entries_mix_within_a_batch_with_probability_alpha():
    batches = list(_sampler(0.25, "entry", batch_size=16))
    share = sum(index >= 2000 for batch in batches for index in batch) / 2000
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 2000)
    assert any(len({index >= 2000 for index in batch}) == 2 for batch in batches)
    assert [len(batch) for batch in _sampler(0.25, "entry", n_cross=20, batch_size=8)] == [8, 8, 4]
    assert [len(batch) for batch in _sampler(0.25, "entry", n_cross=20, batch_size=8, drop_last=True)] == [8, 8]


def test_the_sampler_is_deterministic_by_seed_and_epoch():
    first, again, other_seed = _sampler(0.5, "entry"), _sampler(0.5, "entry"), _sampler(0.5, "entry", seed=1)
    assert list(first) == list(again) and list(first) != list(other_seed)
    again.set_epoch(1)
    assert list(again) != list(first)


def test_schedules_give_their_values():
    assert AlphaSchedule(0.5)(70, 100) == 0.5
    linear = AlphaSchedule(0.0, 1.0, "linear")
    assert [linear(step, 100) for step in (0, 25, 100, 150)] == [0.0, 0.25, 1.0, 1.0]
    cosine = AlphaSchedule(1.0, 0.0, "cosine")
    assert cosine(0, 100) == 1.0 and cosine(100, 100) == pytest.approx(0.0) and cosine(50, 100) == pytest.approx(0.5)
    assert cosine(25, 100) == pytest.approx(0.5 + 0.5 * math.cos(math.pi / 4))
    step = AlphaSchedule(0.2, 0.8, "step", step_at=0.3)
    assert [step(s, 10) for s in (0, 2, 3, 9)] == [0.2, 0.2, 0.8, 0.8]
    assert AlphaSchedule(kind=lambda s, total: s / total / 2)(50, 100) == 0.25
    with pytest.raises(ValueError, match="--hybrid_schedule linear needs --hybrid_alpha_end"):
        AlphaSchedule(0.5, kind="linear")
    with pytest.raises(ValueError, match=r"--hybrid_alpha must be a number in \[0, 1\], got 1.5"):
        AlphaSchedule(1.5)


def test_monolingual_rows_repeat_the_english_side(bitext):
    both = with_monolingual(bitext)
    assert len(both) == 2 * len(bitext) and both.column_names == ["source", "target"]
    assert both[len(bitext)] == {"source": bitext[0]["target"], "target": bitext[0]["target"]}
    assert both[0] == {"source": bitext[0]["source"], "target": bitext[0]["target"]}


@pytest.fixture
def seen(monkeypatch) -> list[list[str]]:
    """The source texts of every batch the collator builds."""
    from optical_hf.collation import OTDistillationDataCollator

    batches, call = [], OTDistillationDataCollator.__call__

    def spy(self, rows):
        batches.append([row["source"] for row in rows])
        return call(self, rows)

    monkeypatch.setattr(OTDistillationDataCollator, "__call__", spy)
    return batches


def test_sentence_transformers_front_end_trains_on_hybrid_batches(model_dirs, bitext, tmp_path, seen):
    student, teacher = sentence_transformer(model_dirs["student"]), sentence_transformer(model_dirs["teacher"])
    args = SentenceTransformerTrainingArguments(str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8,
                                                logging_steps=2, report_to=[], save_strategy="no", seed=0)
    hybrid = HybridBatchArguments(hybrid_alpha=0.0, hybrid_schedule="step", hybrid_alpha_end=1.0, hybrid_step_at=0.5)
    trainer = build_trainer(student, teacher, bitext, args, OTLossConfig(), Prompts(), hybrid=hybrid)
    trainer.train()
    english = set(bitext["target"])
    assert len(trainer.train_dataset) == 2 * len(bitext)
    # alpha 0 for the first half of the steps (cross-lingual batches), 1 after (monolingual), up to a one-batch lag
    assert not english & set(seen[0]) and set(seen[-1]) <= english
    logged = [log["hybrid_alpha"] for log in trainer.state.log_history if "hybrid_alpha" in log]
    assert logged == [0.0, 1.0, 1.0]


def test_trainer_front_end_trains_on_hybrid_batches(model_dirs, bitext, tmp_path, seen):
    args = OTDistillationConfig(str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=8, logging_steps=1,
                                report_to=[], save_strategy="no", seed=0, hybrid_alpha=1.0)
    trainer = OTDistillationTrainer(
        model=AutoModel.from_pretrained(model_dirs["student"]), teacher=AutoModel.from_pretrained(model_dirs["teacher"]),
        teacher_processing_class=AutoTokenizer.from_pretrained(model_dirs["teacher"]), args=args,
        train_dataset=bitext)
    trainer.train()
    assert len(seen) >= 3 and all(set(batch) <= set(bitext["target"]) for batch in seen)  # alpha 1: English only
    assert [log["hybrid_alpha"] for log in trainer.state.log_history if "loss" in log] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("flags, message", [
    (["--hybrid_schedule", "cosine"], "--hybrid_schedule has no effect without --hybrid_alpha"),
    (["--hybrid_alpha", "0.5", "--hybrid_schedule", "linear"], "--hybrid_schedule linear needs --hybrid_alpha_end"),
    (["--hybrid_alpha", "2"], r"--hybrid_alpha must be a number in \[0, 1\], got 2.0"),
])
def test_distill_checks_the_hybrid_flags_before_loading(flags, message, capsys, tmp_path):
    assert main(["distill", "--output_dir", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_the_sampler_factory_is_what_sentence_transformers_calls(bitext):
    # SentenceTransformerTrainer.get_batch_sampler calls a callable batch_sampler with these keywords
    factory = functools.partial(HybridBatchSampler, n_cross=len(bitext), state=HybridState(0.5))
    sampler = factory(with_monolingual(bitext), batch_size=4, drop_last=False, valid_label_columns=[], generator=None,
                      seed=3)
    assert len(sampler) == math.ceil(len(bitext) / 4) and sampler.seed == 3
