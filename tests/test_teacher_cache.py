"""Teacher-output cache: same losses as the online teacher (up to fp16), reuse without a teacher forward, keys."""

from __future__ import annotations

import pytest
import torch
from conftest import sentence_transformer
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from transformers import AutoModel, AutoTokenizer

from optical_hf import (
    OTDistillationConfig,
    OTDistillationDataCollator,
    OTDistillationLoss,
    OTDistillationTrainer,
    build_teacher_cache,
)
from optical_hf.teacher_cache import distinct_texts, teacher_fingerprint


class ForwardCounter:
    """Counts forward calls of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1


def _split(batch: dict) -> list[dict]:
    return [{k[len(c) + 1 :]: v for k, v in batch.items() if k.startswith(c + "_")} for c in ("source", "target")]


@pytest.mark.parametrize("prompt", [None, "query: "])
def test_sentence_transformers_cached_loss_matches_online(model_dirs, bitext, tmp_path, prompt):
    student = sentence_transformer(model_dirs["student_no_dropout"])
    teacher = sentence_transformer(model_dirs["teacher"])
    cache = build_teacher_cache(teacher, bitext["target"], prompt=prompt, cache_dir=tmp_path)
    prompts = {"target": prompt} if prompt else None
    online = OTDistillationDataCollator(student.preprocess, teacher_preprocess_fn=teacher.preprocess, prompts=prompts)
    cached = OTDistillationDataCollator(student.preprocess, teacher_preprocess_fn=teacher.preprocess, prompts=prompts,
                                        teacher_cache=cache)
    rows = list(bitext.select(range(16)))
    online_features, cached_features = _split(online(rows)), _split(cached(rows))
    assert "token_embeddings" in cached_features[1] and "token_embeddings" not in online_features[1]
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(cached_features[1][key], online_features[1][key])
    assert cached_features[1].get("prompt_length") == online_features[1].get("prompt_length")

    loss = OTDistillationLoss(student, teacher, sentence_weight=1.0).eval()
    counter = ForwardCounter(teacher)
    with torch.no_grad():
        expected = loss(online_features)
        got = loss(cached_features)
    assert counter.calls == 1  # the online batch only
    for name in ("ot", "sentence"):
        assert got[name].item() == pytest.approx(expected[name].item(), rel=1e-2)


def test_sentence_transformers_reuses_cache_and_trains_without_teacher(model_dirs, bitext, tmp_path):
    student, teacher = sentence_transformer(model_dirs["student"]), sentence_transformer(model_dirs["teacher"])
    counter = ForwardCounter(teacher)
    first = build_teacher_cache(teacher, bitext["target"], cache_dir=tmp_path, batch_size=32)
    batches = -(-len(set(bitext["target"])) // 32)
    assert counter.calls == batches and len(first) == len(set(bitext["target"]))
    second = build_teacher_cache(teacher, list(reversed(bitext["target"])), cache_dir=tmp_path)
    assert counter.calls == batches and second.fingerprint == first.fingerprint  # read back, order-independent
    assert torch.equal(second.token_embeddings, first.token_embeddings)

    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=16, learning_rate=5e-4,
        logging_steps=2, report_to=[], save_strategy="no", seed=0,
    )
    trainer = SentenceTransformerTrainer(
        model=student, args=args, train_dataset=bitext, loss=OTDistillationLoss(student, teacher),
        data_collator=OTDistillationDataCollator(student.preprocess, teacher_preprocess_fn=teacher.preprocess,
                                                 teacher_cache=second),
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert counter.calls == batches and logs and all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)


def test_collator_falls_back_to_online_teacher_and_checks_prompt(model_dirs, bitext, tmp_path):
    student, teacher = sentence_transformer(model_dirs["student"]), sentence_transformer(model_dirs["teacher"])
    cache = build_teacher_cache(teacher, bitext["target"][:8], cache_dir=tmp_path)
    collator = OTDistillationDataCollator(student.preprocess, teacher_preprocess_fn=teacher.preprocess,
                                          teacher_cache=cache)
    assert "target_token_embeddings" in collator(list(bitext.select(range(8))))
    features = _split(collator(list(bitext.select(range(8, 16)))))  # not cached: tokenized for the online teacher
    assert "token_embeddings" not in features[1]
    assert torch.isfinite(OTDistillationLoss(student, teacher)(features)["ot"])
    prompted = OTDistillationDataCollator(student.preprocess, teacher_preprocess_fn=teacher.preprocess,
                                          prompts={"target": "query: "}, teacher_cache=cache)
    with pytest.raises(ValueError, match="prompt"):
        prompted(list(bitext.select(range(8))))


def test_fingerprint_changes_with_weights_prompt_length_and_texts(model_dirs, bitext, tmp_path):
    teacher = sentence_transformer(model_dirs["teacher"])
    texts = distinct_texts(bitext["target"])

    def key(**overrides) -> str:
        settings = {"texts": texts, "prompt": None, "max_length": 16, **overrides}
        return teacher_fingerprint(teacher, teacher.tokenizer, **settings)

    base = key()
    assert key() == base
    variants = [key(prompt="query: "), key(max_length=32), key(texts=texts[1:])]
    with torch.no_grad():
        next(teacher.parameters())[0, 0] += 1e-3
    variants.append(key())
    assert len({base, *variants}) == 5

    build_teacher_cache(teacher, texts, cache_dir=tmp_path)
    teacher.max_seq_length = 8
    build_teacher_cache(teacher, texts, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2


def _trainer(model_dirs, dataset, tmp_path, teacher, eval_dataset=None, cache_teacher=True) -> OTDistillationTrainer:
    args = OTDistillationConfig(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=16, learning_rate=5e-4,
        report_to=[], save_strategy="no", seed=0, sentence_weight=1.0, query_prompt="query: ",
        teacher_prompt="query: ", cache_teacher=cache_teacher, teacher_cache_dir=str(tmp_path / "cache"),
    )
    return OTDistillationTrainer(
        model=AutoModel.from_pretrained(model_dirs["student_no_dropout"]), teacher=teacher,
        teacher_processing_class=AutoTokenizer.from_pretrained(model_dirs["teacher"]), args=args,
        train_dataset=dataset, eval_dataset=eval_dataset,
    )


def test_trainer_cached_loss_matches_online(model_dirs, bitext, tmp_path):
    teacher = AutoModel.from_pretrained(model_dirs["teacher"])
    online = _trainer(model_dirs, bitext, tmp_path, teacher, cache_teacher=False)
    cached = _trainer(model_dirs, bitext, tmp_path, teacher)
    assert online.data_collator.teacher_cache is None and len(cached.data_collator.teacher_cache) > 0
    rows = list(bitext.select(range(16)))
    online_batch, cached_batch = online.data_collator(rows), cached.data_collator(rows)
    assert "target_token_embeddings" in cached_batch
    for key in ("target_input_ids", "target_attention_mask"):
        assert torch.equal(cached_batch[key], online_batch[key])
    losses = []
    for trainer, batch in ((online, online_batch), (cached, cached_batch)):
        trainer.model.eval()
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
    uncached = cached.data_collator([{"source": "kitacwa", "target": "a sentence not in the cache"}])
    assert "target_token_embeddings" not in uncached and "target_input_ids" in uncached  # online teacher


def test_trainer_reuses_cache_and_trains_without_teacher(model_dirs, bitext, tmp_path):
    teacher = AutoModel.from_pretrained(model_dirs["teacher"])
    counter = ForwardCounter(teacher.embeddings)  # its Transformer module may call the model's forward directly
    _trainer(model_dirs, bitext, tmp_path, teacher)
    assert counter.calls > 0
    counter.calls = 0
    trainer = _trainer(model_dirs, bitext, tmp_path, teacher, eval_dataset=bitext.select(range(8)))
    trainer.train()
    trainer.evaluate()
    assert counter.calls == 0
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # the eval texts are among the train texts
    logs = [log for log in trainer.state.log_history if "loss" in log or "eval_loss" in log]
    assert logs and all(torch.isfinite(torch.tensor(log.get("loss", log.get("eval_loss")))) for log in logs)


@pytest.mark.parametrize("damage", ["truncated", "nan-bytes", "empty"])
def test_a_damaged_cache_file_is_named_discarded_and_rebuilt(damage, model_dirs, bitext, tmp_path, caplog):
    teacher = sentence_transformer(model_dirs["teacher"])
    built = build_teacher_cache(teacher, bitext["target"], cache_dir=tmp_path)
    path, expected = tmp_path / f"{built.fingerprint}.pt", built.token_embeddings.clone()
    first_row = built.token_embeddings[0].numpy().tobytes()
    del built  # its tensors map the file that is damaged below
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # the fp16 token states, overwritten by NaN (0x7e00) where they sit in the file
        start = data.index(first_row)
        path.write_bytes(data[:start] + b"\x00\x7e" * 64 + data[start + 128:])
    counter = ForwardCounter(teacher)
    with caplog.at_level("WARNING", logger="optical_hf"):
        rebuilt = build_teacher_cache(teacher, bitext["target"], cache_dir=tmp_path)
    assert f"Discarding the damaged teacher cache {path}" in caplog.text
    assert counter.calls > 0 and torch.equal(rebuilt.token_embeddings, expected)
    assert torch.isfinite(rebuilt.token_embeddings).all()


def test_a_cache_folder_that_cannot_be_written_is_one_error_before_the_teacher_runs(model_dirs, bitext, tmp_path):
    from optical_hf import OpticalInputError

    teacher = sentence_transformer(model_dirs["teacher"])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    counter = ForwardCounter(teacher)
    with pytest.raises(OpticalInputError, match=rf"teacher cache folder {blocker / 'cache'} cannot be written .*"
                                                r"--teacher_cache_dir, or .* --cache_teacher false"):
        build_teacher_cache(teacher, bitext["target"], cache_dir=blocker / "cache")
    assert counter.calls == 0


def test_fingerprints_ignore_a_pooler_head_that_loads_at_random(model_dirs, tmp_path):
    """multilingual-e5-small's checkpoint has no pooler: from_pretrained draws it anew at every load, while
    sentence-transformers never uses it. An index or cache must still know the model on the next load."""
    import shutil

    from safetensors.torch import load_file, save_file

    from optical_hf.fingerprint import model_fingerprint

    folder = tmp_path / "no-pooler"
    shutil.copytree(model_dirs["teacher"], folder)
    weights = {k: v for k, v in load_file(folder / "model.safetensors").items() if "pooler" not in k}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    first, second = sentence_transformer(folder), sentence_transformer(folder)
    assert not torch.equal(first[0].auto_model.pooler.dense.weight, second[0].auto_model.pooler.dense.weight)
    assert model_fingerprint(first) == model_fingerprint(second)
    texts = ["the cat", "a big dog"]
    assert (teacher_fingerprint(first, first.tokenizer, texts, max_length=16)
            == teacher_fingerprint(second, second.tokenizer, texts, max_length=16))
    with torch.no_grad():
        second[0].auto_model.embeddings.word_embeddings.weight[3, 0] += 1.0
    assert model_fingerprint(first) != model_fingerprint(second)
