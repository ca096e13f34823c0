#!/usr/bin/env python
"""Retrieval-quality benchmark: OPTICAL (OT) distillation against sentence-level MSE distillation on AfriQA.

``benchmarks/README.md`` ("quality.py") describes the protocol (closed-pool CLIR over AfriQA's gold passages), the
systems (floor, oracle, mse, ot), settings, training bitext, metrics and records. Every finished run is appended at
once to ``OUTPUT_DIR/OUTPUT_NAME.jsonl``, keyed by everything that defines it, and skipped when stored, so a stopped
command can simply be started again; the report ``OUTPUT_NAME.md`` is rendered from every stored record.

Example::

    python benchmarks/quality.py                                   # e5, every dev language, all pairs, mse + ot
    python benchmarks/quality.py --langs hau --methods ot --tag eps1 --loss reg=1.0 debias=true --output-name sweep
    python benchmarks/quality.py --data-dir /data/copy --split test --output-name heldout   # another copy of the data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# OpenMP's default busy-wait stalls every multi-threaded op for a scheduler tick when other jobs share the cores
# (measured here: 1.5-3x slower training steps at a load average of 3-5 on 2 cores); passive waiting costs little on
# an idle machine. It must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datasets  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer  # noqa: E402
from sentence_transformers import SentenceTransformerTrainingArguments  # noqa: E402
from sentence_transformers.sentence_transformer.losses import MSELoss, MultipleNegativesRankingLoss  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO_ROOT))

from optical_hf import (  # noqa: E402
    CLIREvaluator, MaxSimCLIREvaluator, OTLossConfig, Prompts, TokenIndex, bitext_from_pairs, build_index,
    code_switched_bitext, load_bitext, model_fingerprint, paired_test,
)
from optical_hf.arguments import CodeSwitchArguments, HybridBatchArguments  # noqa: E402
from optical_hf.corpora import (  # noqa: E402
    AFRIQA_GOLD_TEMPLATE, RetrievalData, _clean_text, _read_jsonl, afriqa_files, load_afriqa_gold,
)
from optical_hf.late_interaction import INDEX_FORMAT  # noqa: E402
from optical_hf.recipe import build_trainer, packaged_teacher_path  # noqa: E402

from benchmarks.common import DEFAULT_E5, machine_info  # noqa: E402

logger = logging.getLogger("benchmarks.quality")

SHARED = REPO_ROOT.parent / "shared"
DEFAULT_DATA = SHARED / "data"
E5_BUILD_TOOL = SHARED / "tools" / "build_multilingual_e5_small.py"
DEFAULT_CACHE = Path("~/.cache/optical-bench/quality").expanduser()

METHODS = ("mse", "ot")
SCORINGS = {"dense": None, "maxsim": "all", "maxsim-content": "content"}
"""Scoring modes: dense cosine of sentence embeddings, or MaxSim over the tokens named (``TOKEN_SELECTIONS``)."""
DEFAULT_MARGINS = [("ot [recipe]", other) for other in (
    "ot [recipe-e100]", "ot [contrastive+sent100]", "ot [contrastive+sent1000]", "ot [recipe-no-ot]", "mse",
    "ot [paper-ot]",
)] + [("ot [recipe-e0.1]", "ot [recipe-e100]"), ("ot [contrastive+sent100]", "mse")] + [
    (f"ot [{strategy}]", "ot [recipe]") for strategy in ("hybrid0.5", "hybrid0.5-entry", "codeswitch0.5", "aux-qa")]
"""The report's margin tables (systems named by family, each at its selected learning rate): the shipped recipe
against its own large-epsilon limit, the matched sentence-level controls, MSE and the paper's objective; the recipe
with token-level transport (``reg=0.1``: sharp plans) against the same large-epsilon limit; the sentence-level control
against MSE (whether a margin over MSE needs the OT term); and each training strategy
(``controls.sh strategies``, run at the recipe's selected rate) against the recipe."""
LR_TAG = re.compile(r"-?lr[0-9.e+-]+(?=\]$)")
"""A ``--tag`` ending in ``lr<value>`` marks one point of a system's learning-rate grid: ``ot [recipe-lr1e-4]`` and
``ot [recipe]`` are the family ``ot [recipe]``, ``mse [lr2e-4]`` and ``mse`` the family ``mse``."""
DEFAULT_TUNE_LANG = "hau"
SELECTION_SCORINGS = ("dense", "maxsim-content")
"""The scorings whose MRR@10, averaged, selects a system's learning rate: one trained model serves both."""
ALPHA = 0.05
METRICS = ("mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100")
PRIMARY = "mrr@10"
PER_QUERY = ("mrr@10", "recall@100")
"""Metrics stored per query in each record (``per_query``), for the paired significance tests."""


@dataclass(frozen=True)
class Setting:
    """A teacher/student pair and its prompts."""

    name: str
    title: str
    model_path: str
    """The frozen teacher (passages, English side); also the student's initialisation unless ``student_path``."""
    query_prompt: str | None
    doc_prompt: str | None
    teacher_prompt: str | None
    student_path: str | None = None
    """The student's initialisation when it is another model than the teacher (its untrained state is the floor)."""
    mse_both_sides: bool = False
    """MSE trains the student on the English side too (Reimers & Gurevych 2020's recipe for a new student)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run besides the method and the bitext."""

    epochs: float
    max_steps: int | None
    lr: float
    batch_size: int
    warmup: float
    seed: int
    max_seq_length: int
    freeze_embeddings: bool
    loss: tuple[tuple[str, Any], ...] = ()
    """``OTLossConfig`` overrides of the OT method (``--loss KEY=VALUE``); the library's defaults otherwise."""


# ------------------------------------------------------------------------------------------------------------ data
def language_bitext(data_dir: Path, lang: str, exclude_questions: set[str]) -> tuple[datasets.Dataset, dict[str, Any]]:
    """LAFAND pairs of ``lang`` (none for Bemba) plus its AfriQA train query translations, minus the evaluated
    split's questions (``exclude_questions``).

    Returns:
        The bitext (columns ``source`` = ``lang`` sentence, ``target`` = English) and a dict of counts and files.
    """
    lafand_dir = data_dir / "lafand-mt" / f"en-{lang}"
    split = next((name for name in ("train", "dev") if (lafand_dir / f"{name}.{lang}").is_file()), None)
    lafand = []
    if split is not None:
        table = load_bitext(lafand_dir / f"{split}.{lang}", lafand_dir / f"{split}.en")
        lafand = list(zip(table["source"], table["target"]))
    queries_file = data_dir / "afriqa" / "queries" / lang / f"queries.afriqa.{lang}.en.train.json"
    queries = load_bitext(queries_file, source_column="question", target_column="translated_question")
    kept = [(s, t) for s, t in zip(queries["source"], queries["target"]) if s not in exclude_questions]
    info = {"lafand_file": None if split is None else f"lafand-mt/en-{lang}/{split}.{{{lang},en}}",
            "lafand_pairs": len(lafand), "afriqa_train_queries": len(queries),
            "dropped_dev_duplicates": len(queries) - len(kept), "pairs": len(lafand) + len(kept)}
    if split is None:
        logger.info("%s: no LAFAND bitext in %s; training on the %d AfriQA train query translations only", lang,
                    lafand_dir, len(kept))
    elif split != "train":
        logger.info("%s: LAFAND has no train file; its %s file (%d pairs) is used as training bitext", lang, split,
                    len(lafand))
    return bitext_from_pairs(lafand + kept), info


def sample_bitext(bitext: datasets.Dataset, pairs: int | None, seed: int) -> datasets.Dataset:
    """The first ``pairs`` rows (all for ``None``) of a seeded shuffle: a smaller sample is a prefix of a larger."""
    shuffled = bitext.shuffle(seed=seed)
    return shuffled if pairs is None or pairs >= len(bitext) else shuffled.select(range(pairs))


def split_retrieval(data_dir: Path, lang: str, split: str) -> RetrievalData:
    """Gold-pool task of ``lang``: its ``split`` questions against the pool of every gold-passage file found."""
    root = data_dir / "afriqa"
    return load_afriqa_gold(afriqa_files(root, lang, split), afriqa_files(root))


def english_qa_pairs(data_dir: Path, lang: str) -> datasets.Dataset:
    """The auxiliary task of ``--strategy aux_train_qa=true``: the English (question, gold passage) pairs of ``lang``'s
    AfriQA **train** gold-passage file (columns ``source`` = ``question_translated``, ``target`` = ``context``); rows
    without a passage or a translation are skipped, as the retrieval pool skips empty contexts."""
    (path,) = afriqa_files(data_dir / "afriqa", lang, "train")
    rows = _read_jsonl(path, ("question_translated", "context"))  # the library's reader: errors name file and line
    pairs = [(_clean_text(row["question_translated"]), _clean_text(row["context"])) for _, row in rows]
    return bitext_from_pairs([(question, passage) for question, passage in pairs if question and passage])


def split_langs(data_dir: Path, split: str) -> list[str]:
    """Languages with a gold-passage file for ``split`` under ``data_dir`` (alphabetical)."""
    pattern = AFRIQA_GOLD_TEMPLATE.format(lang="*", split=split)
    return sorted(path.parent.name for path in (data_dir / "afriqa" / "gold_passages").glob(f"*/{pattern}"))


# ---------------------------------------------------------------------------------------------------------- models
def e5_path(path: str | None) -> str:
    """Folder of multilingual-e5-small, built with the shared tool when missing."""
    folder = Path(path).expanduser() if path else DEFAULT_E5
    if (folder / "modules.json").is_file():
        return str(folder)
    if not E5_BUILD_TOOL.is_file():
        raise FileNotFoundError(f"--e5-path {folder}: no model there and no build tool at {E5_BUILD_TOOL}")
    logger.info("Building multilingual-e5-small into %s with %s", folder, E5_BUILD_TOOL)
    out = subprocess.run([sys.executable, str(E5_BUILD_TOOL), str(folder)], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def custom_setting(args: argparse.Namespace) -> Setting:
    """``--settings custom``: any teacher folder (``--teacher``) and student initialisation (``--student``, default the
    teacher), with their prompts: one command per backbone (a backbone sweep). Named after the folders, e.g.
    ``custom:multilingual-e5-small`` or ``custom:all-MiniLM-L6-v2<-multilingual-e5-small``."""
    teacher = str(Path(args.teacher).expanduser())
    student = str(Path(args.student).expanduser()) if args.student else None
    name = f"custom:{Path(teacher).name}" + (f"<-{Path(student).name}" if student else "")
    return Setting(name, f"teacher {teacher}, student {student or 'the teacher'}", teacher, args.query_prompt,
                   args.doc_prompt, args.teacher_prompt, student_path=student, mse_both_sides=student is not None)


def make_settings(names: Sequence[str], e5: str | None, custom: Setting | None = None) -> dict[str, Setting]:
    settings = {}
    for name in names:
        if name == "e5":
            settings[name] = Setting("e5", "same-model transfer, multilingual-e5-small", e5_path(e5),
                                     "query: ", "passage: ", "query: ")
        elif name == "cross":
            settings[name] = Setting("cross", "cross-model: all-MiniLM-L6-v2 teacher, multilingual-e5-small student",
                                     packaged_teacher_path(), "query: ", None, None, student_path=e5_path(e5),
                                     mse_both_sides=True)
        elif name == "custom":
            settings[custom.name] = custom
        else:
            settings[name] = Setting("minilm", "English teacher, all-MiniLM-L6-v2", packaged_teacher_path(),
                                     None, None, None)
    return settings


def load_model(path: str, device: str, max_seq_length: int) -> SentenceTransformer:
    """A SentenceTransformer from ``path`` truncating its inputs at ``max_seq_length`` tokens."""
    model = SentenceTransformer(path, device=device)
    model.max_seq_length = max_seq_length
    return model


def doc_index(teacher: SentenceTransformer, setting: Setting, corpus: dict[str, str], max_length: int, batch_size: int,
              cache_dir: Path, scoring: str) -> Any:
    """The teacher's passages of ``corpus`` (in its order), encoded once and cached on disk: ``(num_docs, dim)``
    normalised embeddings for ``dense`` scoring, a :class:`optical_hf.late_interaction.TokenIndex` (fp16 token states
    of the tokens :data:`SCORINGS` names; saved as a folder) for the MaxSim modes. The cache is keyed by content: the
    teacher's weights (:func:`optical_hf.model_fingerprint`), the prompt, the max length, the pool and the scoring."""
    key = {"index_format": INDEX_FORMAT, "teacher": model_fingerprint(teacher), "prompt": setting.doc_prompt,
           "max_length": max_length, "pool": hashlib.sha1(json.dumps(list(corpus.items())).encode()).hexdigest()}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    tokens = SCORINGS[scoring]
    path = cache_dir / f"docs-{setting.name}-{digest}{'' if tokens is None else f'-{scoring}'}.pt"
    if path.exists():  # a file (dense) or a TokenIndex folder
        logger.info("Teacher passages of %s from cache %s", setting.name, path)
        return torch.load(path) if tokens is None else TokenIndex.load(path)
    logger.info("Encoding %d passages with the %s teacher (%s, max %d tokens, cached to %s)", len(corpus),
                setting.name, scoring, max_length, path)
    training_length = teacher.max_seq_length
    teacher.max_seq_length = max_length
    try:
        if tokens is not None:
            docs = build_index(teacher, list(corpus.values()), list(corpus), prompt=setting.doc_prompt,
                               tokens=tokens, batch_size=batch_size, show_progress_bar=True)
        else:
            docs = teacher.encode(list(corpus.values()), prompt=setting.doc_prompt, batch_size=batch_size,
                                  convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=True).cpu()
    finally:
        teacher.max_seq_length = training_length
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(docs, tmp) if tokens is None else docs.save(tmp)
    tmp.replace(path)
    return docs


def retrieval_metrics(
    model: SentenceTransformer, teacher: SentenceTransformer, setting: Setting, data: RetrievalData, docs: Any,
    scoring: str, use_translations: bool = False,
) -> tuple[dict[str, float], dict[str, float], dict[str, list[Any]]]:
    """Metrics of ``model`` encoding the queries of ``data`` (or their translations) against the cached ``docs`` of
    ``teacher`` (:func:`doc_index`), by the library's evaluator of ``scoring`` (``teacher`` is its ``doc_model``).

    Returns:
        The metrics, the search cost (``index_mib``, ``encode_ms_per_query``, ``search_ms_per_query``: wall time on
        this machine) and the per-query values (``{"qids": [...], "mrr@10": [...], "recall@100": [...], "rank":
        [...]}``; ``rank``: the gold passage's, 101 beyond the run's 100) of the paired tests and language-bias table.
    """
    common = {"query_prompt": setting.query_prompt, "doc_prompt": setting.doc_prompt, "name": "", "write_csv": False,
              "use_translations": use_translations}
    tokens = SCORINGS[scoring]
    if tokens is None:
        evaluator = CLIREvaluator(data, teacher, corpus_embeddings=docs, **common)
    else:
        evaluator = MaxSimCLIREvaluator(data, teacher, index=docs, query_tokens=tokens, doc_tokens=tokens, **common)
    metrics = evaluator.compute_all_metrics(model)
    timing = evaluator.last_timing
    cost = {"index_mib": timing["index_bytes"] / 2**20, "encode_ms_per_query": timing["encode_ms_per_query"],
            "search_ms_per_query": timing["search_ms_per_query"]}
    per_query = evaluator.last_per_query
    queries = {"qids": list(per_query), **{name: [values[name] for values in per_query.values()] for name in PER_QUERY},
               "rank": [evaluator.last_ranks[qid] for qid in per_query]}
    return {name: metrics[name] for name in METRICS}, cost, queries


# -------------------------------------------------------------------------------------------------------- training
def train_student(
    setting: Setting, method: str, bitext: datasets.Dataset, teacher: SentenceTransformer, config: TrainConfig,
    device: str, strategies: dict[str, Any] | None = None, auxiliary: datasets.Dataset | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train a fresh student (initialised from ``setting.student_path`` or ``setting.model_path``) with ``method`` on
    ``bitext``. MSE's labels are the teacher's embeddings of ``bitext["target"]``. ``strategies`` (``--strategy``, OT
    only): hybrid batches and code-switching options; the code-switched pairs are aligned by the untrained student and
    share the recipe's number of optimizer steps (a hybrid run keeps it by construction). ``auxiliary``: English
    (question, passage) pairs the student also trains on with ``MultipleNegativesRankingLoss`` (multi-dataset training,
    the recipe's number of optimizer steps shared between the two datasets in proportion to their sizes).

    Returns:
        The trained SentenceTransformer and ``{"steps", "train_seconds", "trainable_params", "train_loss"}``.
    """
    torch.manual_seed(config.seed)
    student = load_model(setting.student_path or setting.model_path, device, config.max_seq_length)
    if config.freeze_embeddings:
        student[0].auto_model.get_input_embeddings().weight.requires_grad_(False)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)

    query_prompt, teacher_prompt = setting.query_prompt, setting.teacher_prompt
    options = strategies or {}
    max_steps = config.max_steps
    if (options.get("code_switch_p") is not None or auxiliary is not None) and max_steps is None:
        # equal optimizer steps: the code-switched variants double the pairs (an auxiliary task adds its own), so the
        # run takes the recipe's step count over the union instead of more steps
        max_steps = math.ceil(config.epochs * math.ceil(len(bitext) / config.batch_size))
    with tempfile.TemporaryDirectory(prefix="optical-quality-") as output_dir:
        train_size = len(bitext) * (2 if method == "mse" and setting.mse_both_sides else 1)
        args = SentenceTransformerTrainingArguments(
            output_dir=output_dir, num_train_epochs=config.epochs, max_steps=max_steps or -1,
            per_device_train_batch_size=config.batch_size, learning_rate=config.lr, warmup_steps=config.warmup,
            seed=config.seed, data_seed=config.seed,
            prompts={"source": query_prompt} if method == "mse" and query_prompt else None,
            save_strategy="no", report_to="none", logging_steps=max(1, math.ceil(train_size / config.batch_size) // 5),
            use_cpu=device == "cpu", dataloader_num_workers=0,
        )
        if method == "mse":
            labels = teacher.encode(list(bitext["target"]), prompt=teacher_prompt, batch_size=64,
                                    convert_to_tensor=True, show_progress_bar=False).cpu().tolist()
            sources = list(bitext["source"])
            if setting.mse_both_sides:  # the student also learns to map the English side onto the teacher
                sources, labels = sources + list(bitext["target"]), labels + labels
            train = datasets.Dataset.from_dict({"source": sources, "label": labels})
            trainer = SentenceTransformerTrainer(model=student, args=args, train_dataset=train, loss=MSELoss(student))
        else:  # the library's own recipe (optical-hf distill's trainer), the teacher run once over the bitext
            hybrid = HybridBatchArguments(**{k: v for k, v in options.items() if k.startswith("hybrid_")})
            switching = CodeSwitchArguments(**{k: v for k, v in options.items() if k.startswith("code_switch_")})
            if switching.code_switch_p is not None:
                bitext = code_switched_bitext(bitext, student, switching, config.seed)
            tasks = None if auxiliary is None else {
                "aux_train_qa": (auxiliary, MultipleNegativesRankingLoss(student))}
            trainer = build_trainer(student, teacher, bitext, args, OTLossConfig(**dict(config.loss)),
                                    Prompts(query=query_prompt or "", teacher=teacher_prompt or ""), hybrid=hybrid,
                                    auxiliary=tasks)
        started = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - started
    student.eval()
    return student, {"steps": output.global_step, "train_seconds": seconds, "trainable_params": trainable,
                     "train_loss": output.training_loss}


# ------------------------------------------------------------------------------------------------------ experiment
def gap_closed(student: dict[str, float], floor: dict[str, float], oracle: dict[str, float]) -> dict[str, float]:
    """(student - floor) / (oracle - floor) per metric (NaN when the oracle does not beat the floor)."""
    return {m: (student[m] - floor[m]) / (oracle[m] - floor[m]) if oracle[m] > floor[m] else float("nan")
            for m in METRICS}


def parse_budget(value: str) -> int | None:
    """A budget in pairs (``None`` for ``all``)."""
    if value == "all":
        return None
    try:
        pairs = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets: {value!r} is neither a number of pairs nor 'all'") from None
    if pairs < 1:
        raise argparse.ArgumentTypeError(f"--budgets: {value!r} must be >= 1")
    return pairs


def parse_comparison(value: str) -> tuple[str, str]:
    """``"ot [recipe] vs mse [lr2e-4]"`` -> ``("ot [recipe]", "mse [lr2e-4]")``."""
    first, sep, second = value.partition(" vs ")
    if not (sep and first.strip() and second.strip()):
        raise argparse.ArgumentTypeError(f"expected 'SYSTEM vs SYSTEM', got {value!r}")
    return first.strip(), second.strip()


def parse_override(value: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--loss``: the value is read as JSON (``0.5``, ``true``) or else kept as a string."""
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--loss: {value!r} is not KEY=VALUE")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def ot_config(overrides: list[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """Every ``OTLossConfig`` field with ``overrides`` applied (``1`` read as ``1.0`` for a float field): stored whole,
    so a later change of the library's defaults never matches (and skips) a run made with the old ones."""
    defaults = asdict(OTLossConfig())
    overrides = [(k, float(v) if type(v) is int and type(defaults.get(k)) is float else v) for k, v in overrides]
    try:
        return tuple(asdict(OTLossConfig(**dict(overrides))).items())
    except (TypeError, ValueError) as error:
        raise SystemExit(f"quality.py: --loss {' '.join(f'{k}={v}' for k, v in overrides)}: {error}") from None


STRATEGY_OPTIONS = {f.name: arguments for arguments in (HybridBatchArguments, CodeSwitchArguments)
                    for f in fields(arguments)}
"""``--strategy`` keys: the training strategies' options (``hybrid_*``, ``code_switch_*``), and ``aux_train_qa``
(:func:`english_qa_pairs`: an auxiliary task, the benchmark's; ``optical-hf distill --aux_pairs FILE`` in the CLI)."""


def strategy_config(overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """The ``--strategy`` options, checked by their dataclasses; ``{}`` when none (the plain recipe: no key change)."""
    unknown = [k for k, _ in overrides if k not in STRATEGY_OPTIONS and k != "aux_train_qa"]
    if unknown:
        raise SystemExit(f"quality.py: --strategy {unknown[0]}: not an option of hybrid batches, code-switching or "
                         f"auxiliary tasks ({', '.join([*STRATEGY_OPTIONS, 'aux_train_qa'])})")
    values = {k: float(v) if type(v) is int else v for k, v in overrides}
    if values.get("aux_train_qa", True) is not True:
        raise SystemExit("quality.py: --strategy aux_train_qa: expected true (an auxiliary task is on or absent)")
    if "aux_train_qa" in values and values.get("hybrid_alpha") is not None:
        raise SystemExit("quality.py: --strategy aux_train_qa and hybrid_alpha cannot be combined (the hybrid sampler "
                         "draws from the bitext alone)")
    try:
        for arguments in (HybridBatchArguments, CodeSwitchArguments):
            arguments(**{k: v for k, v in values.items() if STRATEGY_OPTIONS.get(k) is arguments})
    except ValueError as error:
        raise SystemExit(f"quality.py: --strategy: {error}") from None
    return dict(sorted(values.items()))


def record_key(**fields: Any) -> str:
    """Stable id of a run: a hash of everything that defines its result."""
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RecordStore:
    """Append-only JSON-lines file of finished runs, so a long table can be built over several sittings.

    Each record carries a ``key`` (see :func:`record_key`); a run whose key is already stored is skipped. With
    ``require_per_query``, a record stored without per-query values (made before they were kept; for a floor or an
    oracle, without the per-query ranks) counts as missing: the run is made again and its new record, appended,
    replaces the old one (the last record of a key wins).
    """

    def __init__(self, path: Path, require_per_query: bool = False) -> None:
        self.path = path
        self.require_per_query = require_per_query
        self._keys: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise SystemExit(f"quality.py: {path}, line {number}: not JSON ({error.msg})") from None
                    self._keys[record["key"]] = record

    @property
    def records(self) -> list[dict[str, Any]]:
        """The stored records, one per key (the last one written), in the order their keys first appeared."""
        return list(self._keys.values())

    def get(self, key: str) -> dict[str, Any] | None:
        record = self._keys.get(key)
        if record is not None and self.require_per_query and (
                "per_query" not in record or "pairs" not in record and not _has_ranks(record)):
            return None  # a floor or oracle is cheap to redo (no training): one stored before ranks were kept is
        return record    # made again for the language-bias table; a student's is not (the table leaves it out)

    def check_label(self, system: str, config: TrainConfig, strategies: dict[str, Any] | None = None) -> None:
        """Refuse a ``system`` label (method and ``--tag``) that already names another configuration (training
        config and ``--strategy`` options): the tables pool a label's records over seeds, so one label must mean one
        configuration up to the seed."""
        mine = json.loads(json.dumps({**asdict(config), "seed": None, "strategies": strategies or {}}))  # as stored
        for record in self.records:
            if record["system"] != system or "config" not in record:
                continue
            theirs = json.loads(json.dumps({**record["config"], "seed": None,
                                            "strategies": record.get("strategies", {})}))
            if theirs != mine:
                diff = sorted(k for k in theirs if theirs[k] != mine.get(k))
                raise SystemExit(f"quality.py: --tag: {system!r} already labels another configuration in {self.path} "
                                 f"(differs in {', '.join(diff)}); choose another --tag")

    def add(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")
        self._keys[record["key"]] = record


def eval_fingerprint(data: RetrievalData) -> str:
    """Hash of the evaluated queries and the pool, so results on another copy of the data never mix."""
    return record_key(queries=sorted(data.queries.items()), pool=sorted(data.corpus))


def run(args: argparse.Namespace, store: RecordStore, command: str) -> None:
    """Every floor, oracle and student of the command not already in ``store``; each is appended as it finishes.

    A student is trained once and scored with every ``--scoring`` mode (one record per mode); it is trained only when
    one of those records is missing."""
    settings = make_settings(args.settings, args.e5_path, custom_setting(args) if "custom" in args.settings else None)
    label = lambda method: f"{method} [{args.tag}]" if args.tag else method  # noqa: E731
    strategies = strategy_config(args.strategy)
    configs = {  # one per (method, seed): the same in every setting, language and budget
        (method, seed): TrainConfig(
            epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size, warmup=args.warmup,
            seed=seed, max_seq_length=args.max_seq_length, freeze_embeddings=args.freeze_embeddings,
            loss=ot_config(args.loss) if method == "ot" else (),
        )
        for method in args.methods for seed in args.seeds
    }
    for (method, _), config in configs.items():
        store.check_label(label(method), config, strategies if method == "ot" else None)
    tasks = {lang: split_retrieval(args.data_dir, lang, args.split) for lang in args.langs}
    bitexts = {lang: language_bitext(args.data_dir, lang, set(data.queries.values())) for lang, data in tasks.items()}
    if strategies.get("aux_train_qa") and args.split == "train":
        raise SystemExit("quality.py: --strategy aux_train_qa trains on the train split's questions and passages: "
                         "evaluate another --split")
    auxiliary = {lang: english_qa_pairs(args.data_dir, lang) for lang in args.langs
                 if strategies.get("aux_train_qa") and "ot" in args.methods}
    for name, setting in settings.items():
        teacher = untrained = None  # untrained: the student's initialisation when it is not the teacher (cross)
        for lang in args.langs:
            data = tasks[lang]
            bitext, info = bitexts[lang]
            student_model = {"student": setting.student_path} if setting.student_path else {}
            if name.startswith("custom:"):  # its prompts are flags: the record keeps them (and its key covers them)
                student_model["prompts"] = [setting.query_prompt, setting.doc_prompt, setting.teacher_prompt]
            bases = {scoring: {"setting": name if scoring == "dense" else f"{name}, {scoring}", "lang": lang,
                               "split": args.split, "eval": eval_fingerprint(data), "model": setting.model_path,
                               **student_model}
                     for scoring in args.scoring}
            refs = {(scoring, system): record_key(**base, system=system, doc_max_length=args.doc_max_length)
                    for scoring, base in bases.items() for system in ("floor", "oracle")}
            students = []
            for method, pairs, seed in [(m, p, s) for p in args.budgets for m in args.methods for s in args.seeds]:
                sample_size = min(pairs or len(bitext), len(bitext))
                config = configs[method, seed]
                strategy = {"strategies": strategies} if strategies and method == "ot" else {}
                keys = {scoring: record_key(**base, method=method, pairs=sample_size, config=asdict(config), **strategy,
                                            doc_max_length=args.doc_max_length) for scoring, base in bases.items()}
                if all(store.get(key) for key in keys.values()):
                    logger.info("[%s %s] %s, %d pairs, seed %d: already in %s, skipped", name, lang, method,
                                sample_size, seed, store.path)
                else:
                    students.append((method, pairs, config, strategy, keys))
            if all(store.get(key) for key in refs.values()) and not students:
                continue
            if teacher is None:
                teacher = load_model(setting.model_path, args.device, args.max_seq_length)
            docs = {}
            for scoring in args.scoring:
                index = doc_index(teacher, setting, data.corpus, args.doc_max_length, args.encode_batch_size,
                                  args.cache_dir, scoring)
                docs[scoring] = index.to(args.device) if SCORINGS[scoring] is None else index
            references = {}
            for scoring, base in bases.items():
                for system in ("floor", "oracle"):
                    key = refs[scoring, system]
                    if not store.get(key):
                        # floor: the untrained student (the teacher itself in a same-model setting) on native queries
                        if system == "floor" and setting.student_path and untrained is None:
                            untrained = load_model(setting.student_path, args.device, args.max_seq_length)
                        metrics, search, per_query = retrieval_metrics(
                            untrained if system == "floor" and untrained is not None else teacher, teacher, setting,
                            data, docs[scoring], scoring, use_translations=system == "oracle")
                        store.add({"key": key, **base, "system": system, "command": command,
                                   "queries": len(data.queries), "pool_passages": len(data.corpus),
                                   "metrics": metrics, "search": search, "per_query": per_query})
                    references[scoring, system] = store.get(key)["metrics"]
                logger.info("[%s %s] %s floor %s %.4f, oracle %.4f", name, lang, scoring, PRIMARY,
                            references[scoring, "floor"][PRIMARY], references[scoring, "oracle"][PRIMARY])
            for method, pairs, config, strategy, keys in tqdm(students, desc=f"{name} {lang}", unit="run"):
                sample = sample_bitext(bitext, pairs, config.seed)
                logger.info("[%s %s] training %s on %d pairs, seed %d", name, lang, method, len(sample), config.seed)
                student, stats = train_student(setting, method, sample, teacher, config, args.device,
                                               strategies=strategy.get("strategies"),
                                               auxiliary=auxiliary.get(lang) if method == "ot" else None)
                for scoring, key in keys.items():
                    if store.get(key):
                        continue
                    metrics, search, per_query = retrieval_metrics(student, teacher, setting, data, docs[scoring],
                                                                   scoring)
                    record = {"key": key, **bases[scoring], "system": label(method), "method": method,
                              "pairs": len(sample), "seed": config.seed, "config": asdict(config), "command": command,
                              **strategy, "bitext": info, **stats, "metrics": metrics, "search": search,
                              "per_query": per_query, "gap_closed": gap_closed(metrics, references[scoring, "floor"],
                                                                               references[scoring, "oracle"])}
                    store.add(record)
                    logger.info("[%s %s] %s (%s, %d pairs, seed %d, %d steps, %.0f s): %s %.4f, gap closed %.1f%%",
                                name, lang, record["system"], scoring, len(sample), config.seed, stats["steps"],
                                stats["train_seconds"], PRIMARY, metrics[PRIMARY], 100 * record["gap_closed"][PRIMARY])
                del student
        del teacher, untrained


# --------------------------------------------------------------------------------------------------------- reports
Records = list[dict[str, Any]]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], rule: str | None = None) -> list[str]:
    """Markdown lines of a table: ``header``, ``rule`` (default: the first column left-aligned, the others
    right-aligned), then ``rows``."""
    rule = rule or "|---|" + "---:|" * (len(header) - 1)
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(row) + " |" for row in rows)]


def _mean_sd(values: list[float]) -> str:
    """``0.512`` for one value, ``0.512 ± 0.004 (3)`` (sample sd, number of seeds) for several."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {statistics.stdev(values):.3f} ({len(values)})"


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.0f}%"


def _tested(test: Any) -> str:
    """A paired test as ``difference [95% interval] p=...``, marked **win** / *loss* where p < :data:`ALPHA`."""
    mark = {"win": " **win**", "loss": " *loss*", "level": ""}[test.verdict(ALPHA)]
    return f"{test.difference:+.3f} [{test.low:+.3f}, {test.high:+.3f}] p={test.p_value:.3f}{mark}"


def _langs(records: Records, setting: str) -> list[str]:
    """The languages of ``setting``, sorted: every table of a report has the same columns."""
    return sorted({r["lang"] for r in records if r["setting"] == setting})


def _students(records: Records, setting: str, lang: str | None = None) -> Records:
    """The trained students' records of ``setting`` (on ``lang`` when given)."""
    return [r for r in records if r["setting"] == setting and (lang is None or r["lang"] == lang) and "pairs" in r]


def _has_ranks(record: dict[str, Any]) -> bool:
    return "rank" in record.get("per_query", {})


def _largest_budget_runs(records: Records, setting: str, lang: str, system: str) -> Records:
    """The records of ``system`` on ``lang`` at the language's largest budget (over every system)."""
    runs = _students(records, setting, lang)
    largest = max((r["pairs"] for r in runs), default=None)
    return [r for r in runs if r["system"] == system and r["pairs"] == largest]


def _largest_budget_scores(records: Records, setting: str, lang: str, system: str) -> dict[int, float]:
    """``{seed: MRR@10}`` of ``system`` on ``lang`` at the language's largest budget (the last record of a seed)."""
    return {r["seed"]: r["metrics"][PRIMARY] for r in _largest_budget_runs(records, setting, lang, system)}


def _per_query(records: Records, setting: str, lang: str, system: str) -> dict[int, dict[str, float]]:
    """``{seed: {qid: reciprocal rank}}`` of ``system`` on ``lang`` at the largest budget (records with per-query
    values only)."""
    return {r["seed"]: dict(zip(r["per_query"]["qids"], r["per_query"][PRIMARY]))
            for r in _largest_budget_runs(records, setting, lang, system) if "per_query" in r}


def main_table(records: Records, setting: str, systems: Sequence[str] | None = None, compared: bool = False,
               ) -> list[str]:
    """Markdown rows, one per system (floor, oracle, then each trained system of ``systems``, default all), one
    column per language (with ``compared``, only the languages where at least two of the systems ran, if any: a
    language with one trained system compares nothing). A student cell is the MRR@10 at the language's largest budget over
    the seeds run (:func:`_mean_sd`) and the gap closed by that mean; the mean column is shown for systems run on
    every column's language.
    """
    students, langs = _students(records, setting), _langs(records, setting)
    systems = [s for s in dict.fromkeys(r["system"] for r in students) if systems is None or s in systems]
    if compared:  # every language when none has two systems
        langs = [lang for lang in langs if sum(bool(_largest_budget_runs(records, setting, lang, s)) for s in systems)
                 >= 2] or langs
    largest = {lang: max(r["pairs"] for r in students if r["lang"] == lang) for lang in {r["lang"] for r in students}}
    refs = {}  # MRR@10 of the last floor and oracle record of each language
    for r in records:
        if r["setting"] == setting and r["system"] in ("floor", "oracle"):
            refs[r["lang"], r["system"]] = r["metrics"][PRIMARY]
    rows = []
    for system in ("floor", "oracle"):
        values = [refs.get((lang, system)) for lang in langs]
        rows.append([system, *(f"{v:.3f}" for v in values), f"{statistics.fmean(values):.3f}"])
    for system in systems:
        cells, means = [], []
        for lang in langs:
            values = list(_largest_budget_scores(records, setting, lang, system).values())
            if not values:
                cells.append("-")
                continue
            floor, oracle = refs.get((lang, "floor")), refs.get((lang, "oracle"))
            means.append(statistics.fmean(values))
            cells.append(f"{_mean_sd(values)} ({_pct((means[-1] - floor) / (oracle - floor))})")
        rows.append([system, *cells, f"{statistics.fmean(means):.3f}" if len(means) == len(langs) else "-"])
    header = ["system", *[f"{lang} ({largest[lang]} pairs)" if lang in largest else lang for lang in langs], "mean"]
    return _table(header, rows)


def family(system: str) -> str:
    """The system ``system`` belongs to, its learning-rate tag removed (:data:`LR_TAG`)."""
    return LR_TAG.sub("", system).replace(" []", "")


def _base(setting: str) -> str:
    return setting.split(", ")[0]


def tuning_table(
    records: Records, setting: str, lang: str, families: Sequence[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The learning-rate grid of every family on the tuning language ``lang`` (seed 0, largest budget) and the
    selection: each family's label whose MRR@10, averaged over the :data:`SELECTION_SCORINGS` stored for the base
    ``setting``, is highest; ties go to the smaller learning rate. ``families`` limits the rows (default: all).

    Returns:
        Markdown rows (one per family, one column per learning rate, ``*`` on the selected one) and
        ``{family: selected system label}``."""
    scores: dict[str, dict[float, dict[str, float]]] = {}  # family -> lr -> scoring group -> MRR@10
    labels: dict[tuple[str, float], str] = {}
    for group in (setting, *(f"{setting}, {scoring}" for scoring in SELECTION_SCORINGS if scoring != "dense")):
        runs = [r for r in _students(records, group, lang) if r["seed"] == 0]
        largest = max((r["pairs"] for r in runs), default=None)
        for r in runs:
            if r["pairs"] == largest and (families is None or family(r["system"]) in families):
                lr = r["config"]["lr"]
                scores.setdefault(family(r["system"]), {}).setdefault(lr, {})[group] = r["metrics"][PRIMARY]
                labels[family(r["system"]), lr] = r["system"]
    if not scores:
        return [], {}
    lrs = sorted({lr for grid in scores.values() for lr in grid})
    selected, rows = {}, []
    for name, grid in scores.items():
        means = {lr: statistics.fmean(by_scoring.values()) for lr, by_scoring in grid.items()}
        best = max(sorted(means), key=lambda lr: means[lr])
        selected[name] = labels[name, best]
        rows.append([name, *("-" if lr not in means else f"{means[lr]:.4f}" + (" *" if lr == best else "")
                             for lr in lrs)])
    return _table(["system", *(f"lr {lr:g}" for lr in lrs)], rows), selected


def margin_table(
    records: Records, setting: str, comparisons: Sequence[tuple[str, str]], selected: dict[str, str] | None = None,
) -> list[str]:
    """Markdown rows, one per comparison ``(a, b)`` with both systems run: MRR@10 of ``a`` minus ``b`` per language.

    ``a`` and ``b`` are families resolved through ``selected`` (:func:`tuning_table`) or system labels. A cell
    compares the seeds both systems ran at the language's largest budget: the paired test over queries
    (:func:`_tested`; differences averaged over the seeds with per-query values, which the cell names when only some
    have them), or the mean difference and ``(no per-query data)``, or ``-`` when no seed ran for both.
    ``wins / level / losses`` counts the tested cells; ``mean`` is the mean difference over the languages;
    ``pooled`` is the paired test over every tested query of every language (each query once, over its seeds).
    """
    selected = selected or {}
    langs = _langs(records, setting)
    rows = []
    for a, b in comparisons:
        first_label, second_label = selected.get(a, a), selected.get(b, b)
        margins, cells, verdicts, pooled_a, pooled_b = [], [], [], [], []
        for lang in langs:
            first, second = (_largest_budget_scores(records, setting, lang, s) for s in (first_label, second_label))
            paired = sorted(set(first) & set(second))
            if not paired:
                cells.append("-")
                continue
            margins.append(statistics.fmean(first[k] - second[k] for k in paired))
            queries_a, queries_b = (_per_query(records, setting, lang, s) for s in (first_label, second_label))
            tested = [k for k in paired if k in queries_a and k in queries_b]
            if not tested:
                cells.append(f"{margins[-1]:+.3f} (no per-query data)")
                continue
            qids = list(queries_a[tested[0]])
            seeds_a = [[queries_a[k][q] for q in qids] for k in tested]
            seeds_b = [[queries_b[k][q] for q in qids] for k in tested]
            test = paired_test(seeds_a, seeds_b)
            pooled_a += [statistics.fmean(v) for v in zip(*seeds_a)]  # per query, over the tested seeds
            pooled_b += [statistics.fmean(v) for v in zip(*seeds_b)]
            verdicts.append(test.verdict(ALPHA))
            seeds = (f" ({len(tested)} seeds)" if len(tested) > 1 else "") + (
                f" (seed{'s' if len(tested) > 1 else ''} {', '.join(map(str, tested))} of {len(paired)} with "
                "per-query values)" if len(tested) < len(paired) else "")
            cells.append(_tested(test) + seeds)
        if margins:
            counts = "/".join(str(verdicts.count(v)) for v in ("win", "level", "loss")) if verdicts else "-"
            resolved = f" ({first_label} − {second_label})" if (a, b) != (first_label, second_label) else ""
            pooled = "-"
            if pooled_a:
                test = paired_test(pooled_a, pooled_b)
                pooled = f"{_tested(test)} ({test.n} queries)"
            rows.append([f"{a} − {b}{resolved}", *cells, counts, f"{statistics.fmean(margins):+.3f}", pooled])
    return _table(["comparison", *langs, "wins / level / losses", "mean", "pooled"], rows) if rows else []


def language_bias_table(records: Records, setting: str) -> list[str]:
    """Markdown rows, one per trained system with ranks stored: its language bias per language, ``mean / p90`` of
    ``|rank of the gold passage for the native question (student) - its rank for the human English translation
    (oracle: the teacher)|`` over the queries (ranks beyond the run's depth count as depth + 1), averaged over the
    seeds at the language's largest budget. 0 means the student ranks every gold passage where the teacher does on
    English."""
    langs = _langs(records, setting)
    oracle = {lang: next((dict(zip(r["per_query"]["qids"], r["per_query"]["rank"])) for r in records
                          if r["setting"] == setting and r["lang"] == lang and r["system"] == "oracle"
                          and _has_ranks(r)), None) for lang in langs}
    rows = []
    for system in dict.fromkeys(r["system"] for r in _students(records, setting) if _has_ranks(r)):
        cells = []
        for lang in langs:
            runs = [r for r in _largest_budget_runs(records, setting, lang, system) if _has_ranks(r)]
            if not runs or oracle[lang] is None:
                cells.append("-")
                continue
            gaps = [[abs(rank - oracle[lang][qid]) for qid, rank in zip(r["per_query"]["qids"], r["per_query"]["rank"])]
                    for r in runs]
            mean = statistics.fmean(statistics.fmean(gap) for gap in gaps)
            p90 = statistics.fmean(statistics.quantiles(gap, n=10, method="inclusive")[-1] for gap in gaps)
            cells.append(f"{mean:.1f} / {p90:.0f}")
        if any(cell != "-" for cell in cells):
            rows.append([system, *cells])
    return _table(["system", *langs], rows) if rows else []


def budget_table(records: Records, setting: str, lang: str) -> list[str]:
    """Markdown rows, one per budget (pairs) of ``lang``: each system's MRR@10 (mean ± sd over seeds)."""
    runs = _students(records, setting, lang)
    sizes = sorted({r["pairs"] for r in runs})
    if len(sizes) < 2:
        return []
    systems = list(dict.fromkeys(r["system"] for r in runs))
    rows = []
    for size in sizes:
        scores = {s: [r["metrics"][PRIMARY] for r in runs if r["system"] == s and r["pairs"] == size] for s in systems}
        rows.append([str(size), *(_mean_sd(scores[s]) for s in systems)])
    return _table(["pairs", *systems], rows, rule="|---:|" + "---:|" * len(systems))


def render_markdown(
    records: Records, machine: dict[str, Any], title: str, comparisons: Sequence[tuple[str, str]] = (),
    tune_lang: str = DEFAULT_TUNE_LANG,
) -> str:
    """The report of every stored record: commands, protocol, learning-rate selection, final table (the selected
    systems), margins with paired tests, every configuration, budget curves, every run."""
    commands = list(dict.fromkeys(r["command"] for r in records))
    lines = [f"# {title}", "", "Commands that produced these records (each skips runs already stored):", "",
             *[f"- `{c}`" for c in commands], "",
             f"- rendered on: {machine['hardware']} ({machine['device']}), {machine['cores_available']} cores; python "
             f"{machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
             f"sentence-transformers {machine['sentence_transformers']}; {machine['date']}", "",
             "Protocol: closed-pool cross-lingual passage retrieval built from AfriQA's gold passages (**not** "
             "AfriQA's official open-retrieval task); queries = native `question_lang` of the evaluated split's "
             "gold-passage file; relevant document = that row's passage; corpus = every distinct non-empty context "
             "of every gold-passage file found. Floor = untrained student on the native question; oracle = teacher "
             "on the human English translation; gap closed = (student − floor) / (oracle − floor). Training bitext: "
             "LAFAND-MT pairs + AfriQA **train** query translations (evaluated questions dropped), a seeded sample "
             "of the stated size. Cells: MRR@10, mean ± sample sd (number of seeds) when several seeds ran.", ""]

    def section(heading: str, rows: list[str]) -> None:
        if rows:
            lines.extend([heading, "", *rows, ""])

    selections = {}
    studied = list(dict.fromkeys(name for pair in comparisons for name in pair))
    for base in dict.fromkeys(_base(r["setting"]) for r in records):
        grid, selections[base] = tuning_table(records, base, tune_lang, studied)
        if grid:
            section(f"## {base}: learning-rate selection on {tune_lang}", [
                f"Grid per system: MRR@10 on {tune_lang} (seed 0, all pairs), averaged over dense and MaxSim-content "
                "scoring; `*` marks the selected learning rate, the highest mean (ties: the smaller rate). Every "
                "system of the final table has the same rule; a system run at one rate has no choice. **Selection and "
                f"report share the dev split**: the {tune_lang} cells below are not held out from the selection.", "",
                *grid])
    for setting in dict.fromkeys(r["setting"] for r in records):
        split = next(r["split"] for r in records if r["setting"] == setting)
        selected = selections.get(_base(setting), {})
        section(f"## {setting}, split {split}: final table, each system at its selected learning rate (MRR@10, gap "
                "closed)", main_table(records, setting, [selected.get(name, name) for name in studied], compared=True))
        section(f"### {setting}: margins (MRR@10 difference, paired test over queries, p < {ALPHA} marked)",
                margin_table(records, setting, comparisons, selected))
        section(f"### {setting}: language bias (mean / 90th percentile over queries of the gold passage's rank gap, "
                "student on the native question vs teacher on its English translation; lower is better)",
                language_bias_table(records, setting))
        section(f"## {setting}, split {split}: every configuration, MRR@10 (gap closed) at each language's largest "
                "budget", main_table(records, setting))
        costs = [r["search"] for r in records if r["setting"] == setting and "search" in r]
        if costs:
            median = {k: statistics.median(c[k] for c in costs) for k in costs[0]}
            lines += [f"Search cost ({setting}, median of {len(costs)} evaluations, wall time where each ran): index "
                      f"{median['index_mib']:.1f} MiB, query encoding {median['encode_ms_per_query']:.1f} ms/query, "
                      f"search {median['search_ms_per_query']:.1f} ms/query.", ""]
        for lang in _langs(records, setting):
            section(f"## Budget curve, {setting} {lang}: MRR@10", budget_table(records, setting, lang))
    runs = [[r["setting"], r["lang"], r["system"], str(r["pairs"]), str(r["seed"]), str(r["steps"]),
             f"{r['train_seconds']:.0f}", *(f"{r['metrics'][m]:.4f}" for m in ("mrr@10", "ndcg@10", "recall@100")),
             f"`{reproduce(r)}`"] for r in records if "pairs" in r]
    header = ["setting", "lang", "system", "pairs", "seed", "steps", "train s", "MRR@10", "nDCG@10", "R@100",
              "reproduce"]
    lines += ["## Every run", "", "`reproduce` is the command that re-runs the record with the current code: its "
              "`--loss` lists the stored OT configuration's differences from today's `OTLossConfig` defaults.", "",
              *_table(header, runs, rule="|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")]
    return "\n".join(lines)


def reproduce(record: dict[str, Any]) -> str:
    """The command that re-runs ``record`` with the current code (flags that differ from today's defaults)."""
    config, defaults = record["config"], TrainConfig(1.0, None, 2e-5, 32, 0.0, 0, 64, True)
    flags = ["--langs", record["lang"], "--methods", record["method"], "--seeds", str(record["seed"]),
             "--budgets", "all" if record["pairs"] == record["bitext"]["pairs"] else str(record["pairs"])]
    for field in ("epochs", "max_steps", "lr", "batch_size", "warmup", "max_seq_length"):
        if config[field] != getattr(defaults, field):
            flags += [f"--{field.replace('_', '-')}", str(config[field])]
    if not config["freeze_embeddings"]:
        flags.append("--no-freeze-embeddings")
    if ", " in record["setting"]:
        flags += ["--scoring", record["setting"].split(", ")[1]]
    setting = record["setting"].split(", ")[0]
    if setting.startswith("custom:"):
        flags += ["--settings", "custom", "--teacher", record["model"]]
        flags += ["--student", record["student"]] if "student" in record else []
        for flag, prompt in zip(("--query-prompt", "--doc-prompt", "--teacher-prompt"), record["prompts"]):
            flags += [flag, prompt] if prompt is not None else []
    elif setting != "e5":
        flags += ["--settings", setting]
    if record["method"] == "ot":
        current = asdict(OTLossConfig())
        changed = [f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                   for k, v in config["loss"] if current.get(k) != v]
        flags += ["--loss", *changed] if changed else []
    if record.get("strategies"):
        flags += ["--strategy", *(f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                                  for k, v in record["strategies"].items())]
    if record["system"] != record["method"]:
        flags += ["--tag", record["system"].split("[", 1)[1].rstrip("]")]
    return shlex.join(["python", "benchmarks/quality.py", *flags])


# ------------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                        help="folder with afriqa/ and lafand-mt/ in the layout of ../shared/data")
    parser.add_argument("--split", default="dev", help="AfriQA split whose questions are the queries")
    parser.add_argument("--langs", nargs="+", default=None,
                        help="languages (default: every language with a gold-passage file for --split)")
    parser.add_argument("--settings", nargs="+", default=["e5"], choices=["e5", "cross", "minilm", "custom"],
                        help="e5: same-model transfer (primary); cross: all-MiniLM-L6-v2 teacher, "
                             "multilingual-e5-small student (different tokenizers and spaces); minilm: "
                             "all-MiniLM-L6-v2 as both; custom: --teacher and --student (a backbone sweep: one command "
                             "per model)")
    parser.add_argument("--teacher", help="--settings custom: the teacher's SentenceTransformer folder")
    parser.add_argument("--student", help="--settings custom: the student's initialisation (default: the teacher)")
    parser.add_argument("--query-prompt", help="--settings custom: the student's prompt on queries and bitext sources")
    parser.add_argument("--doc-prompt", help="--settings custom: the teacher's prompt on passages")
    parser.add_argument("--teacher-prompt", help="--settings custom: the teacher's prompt on the English side")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS,
                        help="trained systems (none: the floor and oracle only)")
    parser.add_argument("--scoring", nargs="+", default=["dense"], choices=list(SCORINGS),
                        help="dense: cosine of sentence embeddings; maxsim: late interaction, the student's query "
                             "token states against the teacher's passage token states (every token); maxsim-content: "
                             "the same without special and prompt tokens; several: each student is trained once and "
                             "scored with each")
    parser.add_argument("--loss", nargs="*", type=parse_override, default=[], metavar="KEY=VALUE",
                        help="OTLossConfig overrides of the ot method (default: the library's recipe)")
    parser.add_argument("--strategy", nargs="*", type=parse_override, default=[], metavar="KEY=VALUE",
                        help="training strategies of the ot method: hybrid_alpha=0.5, hybrid_granularity=entry, "
                             "hybrid_schedule=linear hybrid_alpha_end=0, code_switch_p=0.5, "
                             "code_switch_side=source ...")
    parser.add_argument("--tag", default=None, help="label added to the method names in the tables, e.g. 'eps1'")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop every run after this many steps")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=0.0, help="linear warm-up, as a fraction of the steps")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-seq-length", type=int, default=64, help="training truncation (both sides, queries)")
    parser.add_argument("--doc-max-length", type=int, default=256, help="passage truncation for the teacher")
    parser.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True,
                        help="freeze the student's word-embedding matrix (every method alike)")
    parser.add_argument("--budgets", nargs="+", type=parse_budget, default=[None], metavar="PAIRS",
                        help="training pairs per language (seeded nested samples), or 'all'")
    parser.add_argument("--e5-path", default=None, help=f"multilingual-e5-small folder (default {DEFAULT_E5})")
    parser.add_argument("--encode-batch-size", type=int, default=32)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--output-name", default="quality",
                        help="stem of the .jsonl (records, appended) and .md (report) files")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--report-only", action="store_true", help="render the report from the stored records")
    parser.add_argument("--per-query", action="store_true",
                        help="re-run stored runs whose record has no per-query values (needed by the paired tests)")
    parser.add_argument("--tune-lang", default=DEFAULT_TUNE_LANG,
                        help="language whose seed-0 MRR@10 selects each system's learning rate in the report")
    parser.add_argument("--margins", nargs="*", type=parse_comparison, default=DEFAULT_MARGINS, metavar="'A vs B'",
                        help="systems compared in the report's margin tables, as they are named there "
                             "(default: the shipped recipe against MSE, itself without OT and the other objectives)")
    args = parser.parse_args(argv)
    if not (args.data_dir / "afriqa" / "gold_passages").is_dir():
        parser.error(f"--data-dir {args.data_dir}: no afriqa/gold_passages folder there")
    custom_flags = [f"--{name.replace('_', '-')}" for name in ("teacher", "student", "query_prompt", "doc_prompt",
                                                                 "teacher_prompt") if getattr(args, name) is not None]
    if "custom" in args.settings and not args.teacher:
        parser.error("--settings custom needs --teacher (a SentenceTransformer folder)")
    if custom_flags and "custom" not in args.settings:
        parser.error(f"{custom_flags[0]} is used by --settings custom only")
    if args.teacher and not (Path(args.teacher).expanduser() / "modules.json").is_file():
        parser.error(f"--teacher {args.teacher}: not a SentenceTransformer folder (no modules.json)")
    if args.student and not (Path(args.student).expanduser() / "config.json").is_file():
        parser.error(f"--student {args.student}: not a model folder (no config.json)")
    found = split_langs(args.data_dir, args.split)
    args.langs = args.langs or found
    missing = [lang for lang in args.langs if lang not in found]
    if missing:
        parser.error(f"--langs {' '.join(missing)}: no gold-passage file for --split {args.split} in {args.data_dir} "
                     f"(found: {' '.join(found) or 'none'})")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    store = RecordStore(args.output_dir / f"{args.output_name}.jsonl", require_per_query=args.per_query)
    if not args.report_only:
        run(args, store, shlex.join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)]))
    report = args.output_dir / f"{args.output_name}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    title = f"optical_hf retrieval-quality benchmark: {args.output_name} (AfriQA gold pool)"
    report.write_text(render_markdown(store.records, machine_info(args.device), title, args.margins, args.tune_lang)
                      + "\n", encoding="utf-8")
    if args.margins is not DEFAULT_MARGINS:  # the defaults name systems that a new store does not have yet
        students = {r["system"] for r in store.records if "pairs" in r}
        for name in sorted({name for pair in args.margins for name in pair} - students):
            logger.warning("--margins: %r names no trained student in %s (the margin tables compare trained "
                           "students), so its comparisons have no row", name, store.path)
    for setting in dict.fromkeys(r["setting"] for r in store.records):
        print(f"\n{setting} (MRR@10)\n" + "\n".join(main_table(store.records, setting)))
    print(f"\n{len(store.records)} records in {store.path}; report {report}")
    return store.records


if __name__ == "__main__":
    main()
