"""OTDistillationTrainer (transformers.Trainer subclass) with plain AutoModel students."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import sentence_transformer
from peft import LoraConfig
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.transformer import Transformer
from sentence_transformers.sentence_transformer.evaluation import MSEEvaluator
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
from transformers import AutoModel, AutoTokenizer, HfArgumentParser, TrainingArguments

import optical_hf.losses
from optical_hf import OTDistillationConfig, OTDistillationTrainer, OTLossConfig, OpticalInputError
from optical_hf.collation import content_mask, special_token_ids
from optical_hf.evaluation import BitextRetrievalEvaluator, bitext_retrieval
from optical_hf.losses import distillation_losses

# The plain OPTICAL objective of the paper (the defaults are the benchmark's recipe): tests of its mechanisms pass it.
PAPER = dict(cost="cosine", marginals="content", debias=False, reg=0.1, ot_weight=1.0, contrastive_weight=0.0)


def _trainer(model_dirs, dataset, tmp_path, student="student", eval_dataset=None, **kwargs):
    """``kwargs["args"]``: OTDistillationConfig options (training, OT and trainer) over these defaults."""
    args = dict(
        output_dir=str(tmp_path / "run"), max_steps=30, per_device_train_batch_size=16, learning_rate=5e-4,
        logging_steps=5, report_to=[], save_strategy="no", seed=0,
    )
    args.update(kwargs.pop("args", {}))
    teacher = kwargs.pop("teacher", None)
    return OTDistillationTrainer(
        model=kwargs.pop("model", None) or AutoModel.from_pretrained(model_dirs[student]),
        teacher=AutoModel.from_pretrained(model_dirs["teacher"]) if teacher is None else teacher,
        teacher_processing_class=AutoTokenizer.from_pretrained(model_dirs["teacher"]),
        args=OTDistillationConfig(**args), train_dataset=dataset, eval_dataset=eval_dataset, **kwargs,
    )


def _embed_auto(folder, texts):
    model, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    return (hidden * enc["attention_mask"][..., None]).sum(1) / enc["attention_mask"].sum(1, keepdim=True)


def test_loss_decreases_with_eval_loss_and_components(model_dirs, bitext, tmp_path):
    trainer = _trainer(
        model_dirs, bitext, tmp_path, eval_dataset=bitext.select(range(32)),
        args={"sentence_weight": 1.0, "eval_strategy": "steps", "eval_steps": 15},
    )
    teacher_params = {id(p) for p in trainer.teacher.parameters()}
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"]
    components = ("ot", "sentence", "contrastive")
    assert set(components) <= set(logs[0]) and {f"eval_{k}" for k in components} <= set(evals[0])
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[0]["eval_loss"] == pytest.approx(sum(evals[0][f"eval_{k}"] for k in components), rel=1e-3)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized and not optimized & teacher_params
    assert not isinstance(trainer.teacher, torch.nn.parallel.DistributedDataParallel)


def test_save_model_loads_in_both_libraries(model_dirs, bitext, tmp_path):
    trainer = _trainer(model_dirs, bitext, tmp_path, args={"max_steps": 3})
    trainer.train()
    (tmp_path / "run" / "checkpoint-7").mkdir(parents=True)  # resumable state must survive the final save
    trainer.save_model()
    out = tmp_path / "run"
    assert (out / "checkpoint-7").is_dir() and (out / "modules.json").exists()
    texts = bitext["source"][:6]
    st = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(st, _embed_auto(out, texts), atol=1e-5)
    assert torch.allclose(st, trainer.student_as_sentence_transformer().encode(texts, convert_to_tensor=True), atol=1e-5)


def test_lora_trains_adapters_and_saves_merged(model_dirs, bitext, tmp_path):
    # the paper's objective: with the defaults (sqeuclidean OT of raw states + InfoNCE), a rank-4 q/v adapter on these
    # random models does not lower the logged loss within 30 steps; test_loss_decreases_with_eval_loss_and_components
    # trains them
    trainer = _trainer(model_dirs, bitext, tmp_path, args=PAPER,
                       peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    base = trainer.model.base_model.model.encoder.layer[0].attention.self.query.base_layer.weight.clone()
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert torch.equal(base, trainer.model.base_model.model.encoder.layer[0].attention.self.query.base_layer.weight)
    trainer.save_model(str(tmp_path / "final"))
    out = tmp_path / "final"
    assert (out / "adapter" / "adapter_config.json").exists()
    texts = bitext["source"][:6]
    trainer.model.eval()
    with torch.no_grad():
        enc = trainer.processing_class(texts, padding=True, return_tensors="pt")
        hidden = trainer.model(**enc).last_hidden_state  # the unmerged adapter model
    expected = (hidden * enc["attention_mask"][..., None]).sum(1) / enc["attention_mask"].sum(1, keepdim=True)
    assert torch.allclose(_embed_auto(out, texts), expected, atol=1e-5)
    st = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(st, expected, atol=1e-5)


def test_gradient_accumulation_matches_large_batch(model_dirs, bitext, tmp_path):
    # no in-batch contrastive term: InfoNCE over two half-batches is not InfoNCE over the full batch, so only a
    # per-pair objective (the mean of per-pair losses) can make accumulation equal a large batch
    common = {"max_steps": 1, "learning_rate": 0.1, "optim": "sgd", "lr_scheduler_type": "constant",
              "dataloader_drop_last": True, "contrastive_weight": 0.0}
    weights = []
    for batch, accumulation in ((8, 1), (4, 2)):
        trainer = _trainer(model_dirs, bitext, tmp_path / f"{batch}", student="student_no_dropout",
                           args={**common, "per_device_train_batch_size": batch,
                                 "gradient_accumulation_steps": accumulation})
        trainer.train()
        weights.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    start = torch.cat([p.flatten() for p in AutoModel.from_pretrained(model_dirs["student_no_dropout"]).parameters()])
    assert not torch.allclose(weights[0], start)
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def test_the_trainer_collates_like_the_sentence_transformers_front_end(model_dirs, bitext, tmp_path):
    trainer = _trainer(model_dirs, bitext, tmp_path, args={"query_prompt": "query: ", "teacher_prompt": "query: ",
                                                           "marginals": "content"})
    rows = [{"source": "kitacwa", "target": "the cat"}, {"source": "kigodwa kieerhtwa", "target": "a big dog"}]
    batch = trainer.data_collator(rows)
    student = sentence_transformer(model_dirs["student"])
    features = student.preprocess([row["source"] for row in rows], prompt="query: ")
    assert torch.equal(batch["source_input_ids"], features["input_ids"])
    assert batch["source_prompt_length"] == features["prompt_length"]
    source = {key[len("source_"):]: value for key, value in batch.items() if key.startswith("source_")}
    expected = content_mask(features["input_ids"], features["attention_mask"],
                            special_token_ids(student.tokenizer), features["prompt_length"])
    assert torch.equal(trainer.loss._marginal(source, "student"), expected)
    target = {key[len("target_"):]: value for key, value in batch.items() if key.startswith("target_")}
    teacher_tok = AutoTokenizer.from_pretrained(model_dirs["teacher"])
    kept = teacher_tok.convert_ids_to_tokens(target["input_ids"][1][target["attention_mask"][1].bool()])
    assert kept[-4:] == ["a", "big", "dog", "[SEP]"]  # the English side with the teacher's own tokenizer
    with pytest.raises(OpticalInputError, match="the bitext has no column 'english'"):
        _trainer(model_dirs, bitext, tmp_path, args={"target_column": "english"})


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_trains_with_debiased_sqeuclidean_pooling_ot(model_dirs, bitext, tmp_path, pooling):
    options = dict(cost="sqeuclidean", marginals="pooling", debias=True, contrastive_weight=0.1, pooling=pooling)
    trainer = _trainer(model_dirs, bitext, tmp_path, args={"max_steps": 10, **options})
    batch = trainer.data_collator([bitext[i] for i in range(4)])
    source = {k[len("source_"):]: v for k, v in batch.items() if k.startswith("source_")}
    weights = trainer.loss._marginal(source, "student")
    with torch.no_grad():
        tokens = trainer.model(input_ids=source["input_ids"], attention_mask=source["attention_mask"]).last_hidden_state
    pooled = torch.einsum("bn,bnd->bd", weights, tokens)
    mask = source["attention_mask"][..., None]
    expected = tokens[:, 0] if pooling == "cls" else (tokens * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    sentence = trainer._student_head({**source, "token_embeddings": tokens})["sentence_embedding"]
    torch.testing.assert_close(sentence, expected, atol=1e-5, rtol=1e-5)  # the saved folder's Pooling(args.pooling)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert {"ot", "contrastive"} <= set(logs[0])
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_evaluator_metrics_join_the_eval_metrics(model_dirs, bitext, tmp_path):
    heldout = bitext.select(range(16))
    teacher = sentence_transformer(model_dirs["teacher"])
    evaluators = [
        BitextRetrievalEvaluator(heldout["source"], heldout["target"], teacher, name="heldout"),
        MSEEvaluator(heldout["target"], heldout["source"], teacher, name="mse"),
    ]
    trainer = _trainer(model_dirs, bitext, tmp_path, eval_dataset=heldout, evaluator=evaluators,
                       args={"max_steps": 4, "eval_strategy": "steps", "eval_steps": 2})
    trainer.train()
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert [log["step"] for log in evals] == [2, 4]
    assert {"eval_heldout_p@1", "eval_heldout_p@1_src2tgt", "eval_mse_negative_mse"} <= set(evals[0])
    student = trainer.student_as_sentence_transformer()
    expected_p1 = bitext_retrieval(student, teacher, heldout["source"], heldout["target"])["p@1"]
    expected_mse = 100 * ((student.encode(heldout["source"]) - teacher.encode(heldout["target"])) ** 2).mean()
    assert evals[-1]["eval_heldout_p@1"] == pytest.approx(expected_p1)
    assert evals[-1]["eval_mse_negative_mse"] == pytest.approx(-expected_mse, rel=1e-4)
    assert evals[0]["eval_mse_negative_mse"] != evals[-1]["eval_mse_negative_mse"]  # the student being trained
    with open(tmp_path / "run" / "eval" / "bitext_retrieval_evaluation_heldout_results.csv") as handle:
        assert len(handle.read().splitlines()) == 3  # header + one row per evaluation


def test_save_model_writes_the_optical_card_and_push_to_hub_pushes_that_folder(model_dirs, bitext, tmp_path, hub,
                                                                              monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import ModelCard

    from hub_server import FAKE_USER, online
    from optical_hf.model_card import StudentCardInfo

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    trainer = _trainer(model_dirs, bitext, tmp_path, peft_config=lora,
                       args={"max_steps": 2, "hub_revision": "v1", "hub_token": "hf_test", "query_prompt": "query: "})
    trainer.train()
    trainer.card_info = StudentCardInfo(language="sw", teacher="org/english-teacher", license="mit")
    with online(monkeypatch, hub):
        url = trainer.push_to_hub()

    repo_id = f"{FAKE_USER}/run"  # Trainer's rule: the name of output_dir in the token's namespace
    assert url.startswith(f"{hub.endpoint}/{repo_id}/commit/")
    assert StudentCardInfo.load(tmp_path / "run").language == "sw"  # the final save, pushable by optical-hf push
    uploaded = hub.uploaded_files(repo_id, revision="v1")
    assert {"model.safetensors", "modules.json", "README.md", "optical_hf.json"} <= uploaded
    assert "adapter_config.json" not in uploaded and hub.uploaded_files(repo_id) == set()  # nothing on main
    card = ModelCard((hub.repo_dir(repo_id, revision="v1") / "README.md").read_text(encoding="utf-8"))
    assert card.data.license == "mit" and card.data.language == ["sw", "en"]
    assert f'student = SentenceTransformer("{repo_id}")' in card.text
    assert "trained from scratch" not in card.text and "None dataset" not in card.text


def test_save_model_without_card_info_says_what_the_trainer_knows(model_dirs, bitext, tmp_path):
    from optical_hf.model_card import StudentCardInfo

    trainer = _trainer(model_dirs, bitext, tmp_path, args={"max_steps": 1, "query_prompt": "query: "})
    trainer.train()
    trainer.save_model()
    info = StudentCardInfo.load(tmp_path / "run")
    assert info.query_prompt == "query: " and info.base_model is None  # loaded from a local folder
    assert info.ot["reg"] == trainer.args.reg
    assert "teacher.encode_document(documents)" in (tmp_path / "run" / "README.md").read_text(encoding="utf-8")


def test_config_holds_the_loss_and_trainer_options_once(tmp_path):
    (config,) = HfArgumentParser((OTDistillationConfig,)).parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--ot_reg", "0.3", "--cost", "sqeuclidean", "--debias",
              "--contrastive_weight", "0.5", "--pooling", "cls", "--query_prompt", "query: ",
              "--cache_teacher", "false"],
        look_for_args_file=False,
    )
    assert config.to_dict() == OTLossConfig(reg=0.3, cost="sqeuclidean", debias=True, contrastive_weight=0.5).to_dict()
    assert (config.pooling, config.query_prompt, config.cache_teacher) == ("cls", "query: ", False)
    loss_fields = {f.name for f in dataclasses.fields(OTLossConfig)}
    assert loss_fields <= {f.name for f in dataclasses.fields(OTDistillationConfig)}
    assert not loss_fields & set(OTDistillationConfig.__dict__["__annotations__"])  # inherited, not re-declared
    with pytest.raises(OpticalInputError, match="OTLossConfig.n_iters must be an integer >= 1, got 0"):
        OTDistillationConfig(str(tmp_path), n_iters=0)
    with pytest.raises(OpticalInputError, match="OTDistillationConfig.pooling must be one of"):
        OTDistillationConfig(str(tmp_path), pooling="max")


def test_plain_training_arguments_get_the_default_options(model_dirs, bitext, tmp_path):
    args = TrainingArguments(str(tmp_path / "run"), max_steps=7, learning_rate=3e-4, report_to=[], seed=3)
    trainer = OTDistillationTrainer(
        model=AutoModel.from_pretrained(model_dirs["student"]),
        teacher=AutoModel.from_pretrained(model_dirs["teacher"]),
        teacher_processing_class=AutoTokenizer.from_pretrained(model_dirs["teacher"]), args=args, train_dataset=bitext,
    )
    assert isinstance(trainer.args, OTDistillationConfig)
    assert (trainer.args.max_steps, trainer.args.learning_rate, trainer.args.seed) == (7, 3e-4, 3)
    assert trainer.args.to_dict() == OTLossConfig().to_dict() and trainer.args.max_length == 128
    assert trainer.loss.config is trainer.args  # one owner of the values
    assert not trainer.args.remove_unused_columns


@pytest.mark.parametrize("cache_teacher", [True, False])
def test_sentence_transformer_teacher_gives_its_own_sentence_embedding(model_dirs, bitext, tmp_path, monkeypatch,
                                                                      cache_teacher):
    transformer = Transformer(str(model_dirs["teacher"]))
    teacher = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean"), Normalize()], device="cpu")
    seen = []

    def spy(*args, **kwargs):
        seen.append(args[6])  # teacher_sentence
        return distillation_losses(*args, **kwargs)

    monkeypatch.setattr(optical_hf.losses, "distillation_losses", spy)
    trainer = _trainer(model_dirs, bitext, tmp_path, teacher=teacher, args={
        "sentence_weight": 1.0, "teacher_prompt": "query: ", "cache_teacher": cache_teacher,
        "teacher_cache_dir": str(tmp_path / "cache")})
    rows = [bitext[i] for i in range(8)]
    batch = trainer.data_collator(rows)
    assert ("target_sentence_embedding" in batch) is cache_teacher
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    expected = teacher.encode([row["target"] for row in rows], prompt="query: ", convert_to_tensor=True)
    torch.testing.assert_close(seen[0].norm(dim=-1), torch.ones(8), atol=2e-3, rtol=0)  # Normalize applied
    torch.testing.assert_close(seen[0], expected, atol=2e-3, rtol=0)  # fp16 when cached


def test_trains_with_the_late_interaction_terms(model_dirs, bitext, tmp_path):
    options = dict(PAPER, transport="semi-relaxed", rho=0.1, hard_alignment_weight=0.5, maxsim_distill_weight=0.5,
                   contrastive_weight=0.1, marginals="pooling")
    trainer = _trainer(model_dirs, bitext, tmp_path, args={"max_steps": 10, **options})
    assert trainer.loss.config.to_dict() == OTLossConfig(**options).to_dict()
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert {"ot", "hard_alignment", "maxsim_kd", "contrastive"} <= set(logs[0])
    assert logs[0]["loss"] == pytest.approx(
        sum(logs[0][k] for k in ("ot", "hard_alignment", "maxsim_kd", "contrastive")), rel=1e-3)
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in logs) and logs[-1]["loss"] < logs[0]["loss"]


def test_sentence_transformer_student_keeps_its_own_modules(model_dirs, bitext, tmp_path):
    transformer = Transformer(str(model_dirs["student"]), max_seq_length=32)
    student = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), "cls"), Normalize()], device="cpu")
    student.prompts["query"] = "query: "
    before = student.encode(bitext["source"][:4], convert_to_tensor=True).clone()
    trainer = OTDistillationTrainer(
        model=student, teacher=AutoModel.from_pretrained(model_dirs["teacher"]),
        teacher_processing_class=AutoTokenizer.from_pretrained(model_dirs["teacher"]),
        args=OTDistillationConfig(str(tmp_path / "run"), max_steps=2, learning_rate=1e-3, report_to=[],
                                  save_strategy="no", marginals="pooling"),
        train_dataset=bitext,
    )
    assert trainer.loss._pooling["student"] == ("cls", True)  # the student's own pooling is its OT weights
    trainer.train()
    trainer.save_model()

    reloaded = SentenceTransformer(str(tmp_path / "run"), device="cpu")
    assert [type(module) for module in reloaded] == [Transformer, Pooling, Normalize]
    assert reloaded[1].pooling_mode == "cls" and reloaded.max_seq_length == 32
    assert reloaded.prompts["query"] == "query: "
    texts = bitext["source"][:4]
    after = reloaded.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(after, trainer.student_as_sentence_transformer().encode(texts, convert_to_tensor=True))
    torch.testing.assert_close(after.norm(dim=-1), torch.ones(4))
    assert not torch.allclose(after, before)  # the trained weights, not the initial ones


@pytest.mark.parametrize("config", [{}, PAPER, {"lora": True}, {"sentence_weight": 1.0, "normalize": True}],
                         ids=["recipe", "paper", "lora", "sentence-term-normalized-student"])
def test_both_front_ends_train_the_same_objective(config, model_dirs, bitext, tmp_path):
    """Same weights and batch: the same loss and gradients through OTDistillationLoss (sentence-transformers) and
    OTDistillationTrainer (transformers.Trainer: an AutoModel student, saved with Pooling(mean); or a
    SentenceTransformer student with Normalize, whose normalised embedding the sentence term must see)."""
    from optical_hf import OTDistillationDataCollator, OTDistillationLoss, add_lora

    config = dict(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]) if config.pop("lora", False) else None
    normalize = config.pop("normalize", False)

    def pipeline():
        transformer = Transformer(str(model_dirs["student_no_dropout"]))
        modules = [transformer, Pooling(transformer.get_embedding_dimension(), "mean"), *([Normalize()] * normalize)]
        return SentenceTransformer(modules=modules, device="cpu")

    rows = [bitext[i] for i in range(8)]
    student, teacher = pipeline(), sentence_transformer(model_dirs["teacher"])
    if lora is not None:
        add_lora(student, lora)
    loss = OTDistillationLoss(student, teacher, config=OTLossConfig(**config))
    batch = OTDistillationDataCollator(student.preprocess, teacher_preprocess_fn=teacher.preprocess)(rows)
    features = [{k[len(c) + 1:]: v for k, v in batch.items() if k.startswith(c + "_")} for c in ("source", "target")]
    student.train()
    st_loss = torch.stack(list(loss(features).values())).sum()
    st_loss.backward()

    trainer = _trainer(model_dirs, bitext, tmp_path, student="student_no_dropout", peft_config=lora,
                       teacher=sentence_transformer(model_dirs["teacher"]),
                       args={"cache_teacher": False, "pooling": "mean", **config},
                       **({"model": pipeline()} if normalize else {}))
    trained = dict(trainer.model.named_parameters())
    st_params = {name.removeprefix("0.model.").replace("base_model.model.", ""): param
                 for name, param in student.named_parameters()}
    names = {name: name.replace("base_model.model.", "") for name in trained}
    with torch.no_grad():  # the same LoRA initialisation on both sides
        for name, param in trained.items():
            param.copy_(st_params[names[name]])
    trainer.model.train()
    trainer_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    trainer_loss.backward()

    torch.testing.assert_close(trainer_loss, st_loss, atol=1e-6, rtol=1e-5)
    compared = [name for name, param in trained.items() if param.requires_grad]
    assert compared and (lora is None or all("lora_" in name for name in compared))
    for name in compared:
        torch.testing.assert_close(trained[name].grad, st_params[names[name]].grad, atol=1e-6, rtol=1e-4, msg=name)
