"""The ``optical-hf`` command: ``distill`` a student, ``evaluate`` it, ``push`` it to the Hub.

    optical-hf distill --student intfloat/multilingual-e5-small --bitext train.sw --bitext_target train.en
    optical-hf evaluate --model optical-student-sw --afriqa dev.json --afriqa_pool train.json dev.json --oracle
    optical-hf push optical-student-sw --repo_id my-org/optical-minilm-sw

Expected failures print one ``optical-hf: error: ...`` message on stderr, without a traceback, and exit with
:data:`EXIT_BAD_INPUT` (bad file, flag value, model path..., or a training whose loss became NaN) or
:data:`EXIT_PUSH_FAILED` (the Hub upload failed; the message says how to retry). Ctrl-C prints one line, what was kept
(the previous student folder, the last complete checkpoint) and the command that resumes, and exits with
:data:`EXIT_INTERRUPTED` (130). ``optical-hf --debug COMMAND ...`` or
``OPTICAL_HF_DEBUG=1`` shows the traceback instead. Any other exception is a bug (ours or a library's) and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .arguments import RetrieverArguments, add_flags
from .errors import NonFiniteLossError, OpticalInputError

if TYPE_CHECKING:
    from .model_card import StudentCardInfo

# torch, transformers and the rest are imported inside the commands, so that --help and --version answer at once.

PROG = "optical-hf"
EXIT_PUSH_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C
#: Errors reported as bad input: the library's checks of the user's input (OpticalInputError, which BitextError and
#: CorpusFormatError are), a user path that is missing or unusable, and a training whose loss or gradients became NaN
#: (the usual causes are flag values: learning rate, OT epsilon).
INPUT_ERRORS = (
    OpticalInputError, NonFiniteLossError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError
)
#: The evaluation data flags of ``optical-hf evaluate`` (exactly one is given).
TASKS = ("bitext", "beir", "afriqa", "flores")


def run(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`optical_hf.recipe.run`, imported on first use."""
    from .recipe import run

    return run(*args, **kwargs)


def _distill(argv: list[str]) -> None:
    """Parse ``argv`` with the recipe's HfArgumentParser (the flags of examples/distill.py) and run it."""
    if {"-h", "--help"} & set(argv) and "--help-all" not in argv and (text := _stored_distill_help()) is not None:
        print(text, end="")
        raise SystemExit(0)
    from .recipe import build_parser, use_cpu_processes_if_no_gpu

    parser = build_parser()
    parser.prog = f"{PROG} distill"
    if "--help-all" in argv:
        argv = ["--help" if arg == "--help-all" else arg for arg in argv]
    elif {"-h", "--help"} & set(argv):
        _hide_rare_training_flags(parser)
    use_cpu_processes_if_no_gpu()
    distill_args, loss_config, training_args, unknown = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True, look_for_args_file=False
    )
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        run(distill_args, loss_config, training_args)
    except KeyboardInterrupt:
        raise Interrupted(_kept_after_interrupt(Path(training_args.output_dir), argv)) from None


COMMON_TRAINING_FLAGS = (
    "output_dir", "num_train_epochs", "max_steps", "learning_rate", "warmup_ratio", "per_device_train_batch_size",
    "gradient_accumulation_steps", "seed", "bf16", "fp16", "use_cpu", "logging_steps", "eval_strategy", "eval_steps",
    "save_strategy", "save_steps", "save_total_limit", "resume_from_checkpoint", "push_to_hub", "hub_model_id",
    "hub_private_repo", "report_to",
)
"""The ``TrainingArguments`` flags that ``distill --help`` lists; ``--help-all`` lists every one."""


def _hide_rare_training_flags(parser: argparse.ArgumentParser) -> None:
    """Keep the recipe's own flags and :data:`COMMON_TRAINING_FLAGS` in ``--help``; say how many others
    ``--help-all`` shows."""
    from sentence_transformers import SentenceTransformerTrainingArguments

    from .recipe import DistillArguments
    from .options import OTLossConfig

    ours = {f.name for cls in (DistillArguments, OTLossConfig) for f in dataclasses.fields(cls)}
    training = {f.name for f in dataclasses.fields(SentenceTransformerTrainingArguments)} - ours
    hidden = [action for action in parser._actions if action.dest in training - set(COMMON_TRAINING_FLAGS)]
    for action in hidden:
        action.help = argparse.SUPPRESS
    parser.epilog = (f"{len(hidden)} more transformers TrainingArguments flags (optimizer, ...): "
                     f"{PROG} distill --help-all")


DISTILL_HELP = Path(__file__).parent / "resources" / "distill_help.txt"
"""``distill --help`` as :func:`render_distill_help` writes it, printed without importing transformers (building the
parser imports it: seconds). Its first line names the versions it was rendered with; with any other installed, the
help is built live. ``tests/test_cli.py`` checks that it equals the live help."""
HELP_WIDTH = 120


def _help_versions() -> str:
    """The versions the distill help depends on, read from the installed metadata (no import)."""
    from importlib.metadata import version

    return " ".join(f"{name}=={version(name)}" for name in ("optical-hf", "transformers", "sentence-transformers"))


def render_distill_help() -> str:
    """``optical-hf distill --help`` built live, :data:`HELP_WIDTH` columns wide, under its versions line (the content
    of :data:`DISTILL_HELP`)."""
    from .recipe import build_parser

    parser = build_parser()
    parser.prog = f"{PROG} distill"
    _hide_rare_training_flags(parser)
    parser.formatter_class = functools.partial(parser.formatter_class, width=HELP_WIDTH)
    return f"# {_help_versions()}\n{parser.format_help()}"


def _stored_distill_help() -> str | None:
    """The stored help when it was rendered with the installed versions, else ``None``."""
    try:
        versions, text = DISTILL_HELP.read_text(encoding="utf-8").split("\n", 1)
    except (OSError, ValueError):
        return None
    return text if versions == f"# {_help_versions()}" else None


class Interrupted(Exception):
    """Ctrl-C: the message says what was kept and how to go on; ``optical-hf`` exits with :data:`EXIT_INTERRUPTED`."""


def _kept_after_interrupt(output_dir: Path, argv: list[str]) -> str:
    """What an interrupted ``distill`` left in ``output_dir`` and the command that goes on from there."""
    from .export import is_student_folder
    from .recipe import last_complete_checkpoint

    kept = []
    if output_dir.is_dir() and is_student_folder(output_dir):
        kept.append(f"the previous student in {output_dir} is unchanged")
    try:
        checkpoint = last_complete_checkpoint(output_dir)
    except OpticalInputError:
        checkpoint = None
    rest = [arg for i, arg in enumerate(argv) if not (arg.startswith("--resume_from_checkpoint")
                                                       or (i and argv[i - 1] == "--resume_from_checkpoint"))]
    if checkpoint is None:
        kept.append("no complete checkpoint was saved yet (see --save_strategy); start again with: "
                    + shlex.join([PROG, "distill", *rest]))
    else:
        kept.append(f"the last complete checkpoint is {checkpoint}; resume with: "
                    + shlex.join([PROG, "distill", *rest, "--resume_from_checkpoint", "latest"]))
    return "interrupted: " + "; ".join(kept)


def _card_defaults(model: str) -> StudentCardInfo | None:
    """The ``optical_hf.json`` of a local student folder ``--model``, or None when it has none."""
    from .model_card import CARD_INFO_NAME, StudentCardInfo

    if not (Path(model) / CARD_INFO_NAME).is_file():
        return None
    try:
        return StudentCardInfo.load(model)
    except ValueError as err:
        raise OpticalInputError(f"--model {model}: {err}") from err


def _card_teacher(card: StudentCardInfo) -> str:
    """The teacher named by a student card; the packaged copy of all-MiniLM-L6-v2 when the card names it and it is
    installed (so that evaluation works offline)."""
    from .recipe import PACKAGED_TEACHER_ID, packaged_teacher_path

    if card.teacher == PACKAGED_TEACHER_ID:
        with contextlib.suppress(OpticalInputError):
            return packaged_teacher_path()
    return card.teacher


def _evaluate(args: argparse.Namespace) -> None:
    """Score ``--model`` (queries / sources) against ``--teacher`` (documents / English targets); print the table.

    The teacher, the prompts and the scoring (``dense`` or ``maxsim``) default to those of ``--model``'s
    ``optical_hf.json`` (a student folder written by ``optical-hf distill``); flags override them.
    """
    from .corpora import flores_pairs, load_afriqa_gold, load_beir
    from .data import load_bitext
    from .evaluation import bitext_retrieval, evaluate_clir, format_metrics_table
    from .late_interaction import bitext_retrieval_maxsim, evaluate_clir_maxsim
    from .recipe import load_sentence_transformer, packaged_teacher_path

    if args.oracle and not args.afriqa:
        raise OpticalInputError("--oracle needs --afriqa (the English query translations come from AfriQA)")
    if args.bitext_target and not args.bitext:
        raise OpticalInputError("--bitext_target needs --bitext")
    task = next(name for name in TASKS if getattr(args, name))
    if (args.index or args.index_factory or args.qdrant) and task not in ("afriqa", "beir"):
        raise OpticalInputError("--index, --index_factory and --qdrant apply to --afriqa and --beir (a document corpus)")
    if args.index_factory and not args.index:
        raise OpticalInputError("--index_factory needs --index (the folder the new index is saved to)")
    if args.qdrant and not args.index:
        raise OpticalInputError("--qdrant needs --index (the name of the collection)")
    if args.qdrant and args.index_factory:
        raise OpticalInputError("--index_factory is a FAISS option; a --qdrant collection takes none")
    # Data first, so that a bad file fails before the models are loaded.
    if task == "bitext":
        pairs = load_bitext(args.bitext, args.bitext_target)
        sources, targets = pairs["source"], pairs["target"]
    elif task == "flores":
        sources, targets = flores_pairs(args.flores, args.flores_lang)
    else:
        data = load_beir(args.beir, args.split) if task == "beir" else load_afriqa_gold(args.afriqa, args.afriqa_pool)
    card = _card_defaults(args.model)
    # a pair folder is the whole retriever: its encode_document is the teacher
    teacher_name = args.teacher or (args.model if card and card.export == "pair" else None) or (
        card and _card_teacher(card)) or packaged_teacher_path()
    query_prompt = args.query_prompt if args.query_prompt is not None else card and card.query_prompt
    document_prompt = args.document_prompt if args.document_prompt is not None else card and card.document_prompt
    teacher_prompt = args.teacher_prompt if args.teacher_prompt is not None else card and card.teacher_prompt
    scoring = args.scoring or (card.scoring if card else "dense")
    model = load_sentence_transformer(args.model, "--model")
    teacher = load_sentence_transformer(teacher_name, "--teacher")
    common = {"batch_size": args.batch_size, "show_progress_bar": True}

    if task in ("bitext", "flores"):
        mine = bitext_retrieval_maxsim if scoring == "maxsim" else bitext_retrieval  # maxsim: src->tgt P@1 only
        rows = {"model": mine(model, teacher, sources, targets, query_prompt=query_prompt,
                              teacher_prompt=teacher_prompt, **common)}
    else:
        with contextlib.ExitStack() as open_clients:  # a Qdrant local-mode folder stays locked until its client closes
            index = args.index and _search_index(args, teacher, data, scoring, document_prompt, open_clients)
            clir = functools.partial(evaluate_clir_maxsim if scoring == "maxsim" else evaluate_clir,
                                     doc_model=teacher, data=data, query_prompt=query_prompt,
                                     doc_prompt=document_prompt, **common, **({"index": index} if index else {}))
            rows = {"model": clir(model)}
            if args.oracle:
                rows["oracle"] = clir(teacher, use_translations=True)

    print(f"model: {args.model}\nteacher (documents / English side): {teacher_name}\nscoring: {scoring}")
    print(format_metrics_table(rows))
    if args.output_json:
        report = {"task": task, "model": args.model, "teacher": teacher_name, "scoring": scoring, "metrics": rows}
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"Metrics written to {args.output_json}")


def _search_index(args: argparse.Namespace, teacher: Any, data: Any, scoring: str, prompt: str | None,
                  open_clients: contextlib.ExitStack) -> Any:
    """The search index of ``--index``: a FAISS folder, or with ``--qdrant`` a collection of that name. Loaded when it
    exists (the evaluator checks that the teacher, prompt and corpus are the ones in use), else built from the corpus
    (FAISS: with ``--index_factory``) and saved there."""
    from .faiss_index import build_search_index, load_search_index
    from .qdrant_index import QdrantIndex

    qdrant = args.qdrant and (open_clients.enter_context(contextlib.closing(_qdrant_client(args.qdrant))), args.index)
    where = f"Qdrant {args.qdrant} collection {args.index}" if qdrant else args.index
    if qdrant and qdrant[0].collection_exists(args.index) or not qdrant and Path(args.index).exists():
        if args.index_factory:
            raise OpticalInputError(f"--index {args.index} exists; --index_factory only applies to a new index")
        index = QdrantIndex(*qdrant) if qdrant else load_search_index(args.index)
        print(f"index: {where} ({index.kind}, {getattr(index, 'factory', 'Qdrant')}, {index.num_passages} passages)")
        return index
    index = build_search_index(teacher, list(data.corpus.values()), list(data.corpus), scoring=scoring, prompt=prompt,
                               factory=args.index_factory, batch_size=args.batch_size, show_progress_bar=True,
                               qdrant=qdrant or None)
    if not qdrant:
        index.save(args.index)
    print(f"index: {where} (new: {index.kind}, {getattr(index, 'factory', 'Qdrant')}, {index.num_passages} passages)")
    return index


def _qdrant_client(location: str) -> Any:
    """A client of ``--qdrant``: a server's URL (its API key, if any, from the ``QDRANT_API_KEY`` environment variable,
    so that it never appears in a command line or a log) or a local folder (Qdrant's local mode, no server)."""
    from qdrant_client import QdrantClient

    if location.startswith(("http://", "https://")):
        return QdrantClient(url=location, api_key=os.environ.get("QDRANT_API_KEY"))
    return QdrantClient(path=location)


def _push(args: argparse.Namespace) -> None:
    """Upload a student folder with :func:`optical_hf.hub.push_student`; print the commit URL."""
    from .hub import push_student

    try:
        url = push_student(
            args.folder, args.repo_id, adapter_only=args.adapter_only, base_model=args.base_model,
            private=True if args.private else None, token=args.token, endpoint=args.endpoint, revision=args.revision,
        )
    except ValueError as err:  # push_student checks its arguments and the folder first; upload errors are HubPushError
        raise OpticalInputError(str(err)) from err
    print(url)


def _evaluate_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "evaluate", help="cross-lingual retrieval / bitext-mining metrics of a student",
        description="The model encodes the queries (or low-resource sentences), the teacher the documents (or English "
                    "sentences); prints ranking metrics (MRR@10, nDCG@10, Recall@k) or bitext P@1.")
    parser.add_argument("--model", required=True, help="student to evaluate (folder or Hub id)")
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--bitext", help="bitext file(s) as in `distill --bitext` (TSV/CSV/JSONL, or a text file + "
                                       "--bitext_target): P@1 of retrieving each translation")
    task.add_argument("--beir", metavar="DIR", help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    task.add_argument("--afriqa", nargs="+", metavar="QUERY_FILE",
                      help="AfriQA gold-passage file(s) whose native questions are the queries (gold-pool CLIR)")
    task.add_argument("--flores", metavar="ROOT", help="FLORES-200/SIB-200 folder (ROOT/LANG/SPLIT.tsv): bitext P@1 "
                                                       "against eng_Latn")
    parser.add_argument("--bitext_target", help="English side when --bitext is a plain-text file")
    parser.add_argument("--split", default="test", help="qrels split of --beir (default: test)")
    parser.add_argument("--afriqa_pool", nargs="+", metavar="POOL_FILE",
                        help="gold-passage files whose passages form the corpus (default: the --afriqa files)")
    parser.add_argument("--flores_lang", default="swh_Latn", help="FLORES language folder (default: swh_Latn)")
    add_flags(parser, RetrieverArguments)  # --teacher, the prompts, --scoring: declared once, as distill's
    parser.add_argument("--oracle", action="store_true",
                        help="add the teacher on the human English translations of the queries (AfriQA upper bound)")
    parser.add_argument("--index", metavar="DIR",
                        help="search index of the corpus (--afriqa/--beir): a FAISS folder (or with --qdrant, a collection "
                             "name), searched when it exists (it must have been built by the same teacher and "
                             "prompt), else built and saved there")
    parser.add_argument("--qdrant", metavar="URL_OR_DIR",
                        help="search a Qdrant collection named --index instead of a FAISS folder: a server's URL "
                             "(API key from QDRANT_API_KEY) or a local folder (Qdrant's local mode); built from the "
                             "corpus when the collection does not exist")
    parser.add_argument("--index_factory", metavar="FACTORY",
                        help="FAISS factory string of a new --index, e.g. Flat, HNSW32 (dense) or IVF1024,PQ32np "
                             "(maxsim token vectors). Default: by corpus size (optical_hf.faiss_index.default_factory)")
    parser.add_argument("--batch_size", type=int, default=64, help="encoding batch size (default: 64)")
    _log_level_flag(parser)
    parser.add_argument("--output_json", metavar="FILE", help="also write the metrics to this JSON file")
    return parser


def _push_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "push", help="upload a trained student folder to the Hugging Face Hub",
        description="Upload a student folder (without checkpoints and training leftovers) with its model card; "
                    "the local folder is never modified, so a failed push can simply be retried.")
    parser.add_argument("folder", help="student folder written by `optical-hf distill`")
    parser.add_argument("--repo_id", required=True, help="Hub model repo, namespace/name")
    parser.add_argument("--adapter_only", action="store_true", help="upload only the LoRA adapter of folder/adapter")
    parser.add_argument("--base_model", help="Hub id the student was initialised from (needed by --adapter_only when "
                                             "optical_hf.json has none)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    parser.add_argument("--token", help="Hub token (default: the saved login)")
    parser.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    _log_level_flag(parser)
    return parser


def _log_level_flag(parser: argparse.ArgumentParser) -> None:
    """``--log_level`` as distill has it (the Trainer's flag): optical_hf's messages at that level, the libraries'
    (transformers, datasets, sentence-transformers) at WARNING unless a lower level is asked for."""
    parser.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                        help="optical_hf's log level (default: info); transformers and datasets log at warning "
                             "unless a lower level is given")


def make_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and the parser of each subcommand (``distill`` takes the recipe's flags, parsed later)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="OPTICAL optimal-transport distillation of an English retriever into a low-resource-"
                               "language query encoder (Huang, Yu & Allan, WSDM 2023).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too "
                                                             "(or set OPTICAL_HF_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    distill = commands.add_parser(
        "distill", add_help=False, help="distill a teacher into a student on bitext (`optical-hf distill --help`: "
                                        "OT, LoRA and all Trainer flags)")
    return parser, {"distill": distill, "evaluate": _evaluate_parser(commands), "push": _push_parser(commands)}


def _exit_status(err: Exception) -> int | None:
    """The exit status of an expected error (a failed upload, bad input), None for a bug."""
    if isinstance(err, INPUT_ERRORS):
        return EXIT_BAD_INPUT
    from .hub import HubPushError  # imported already when `push` raised it

    return EXIT_PUSH_FAILED if isinstance(err, HubPushError) else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``optical-hf``; returns the exit status (argparse usage errors exit 2 by themselves)."""
    parser, subparsers = make_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "distill" and rest:
        subparsers[args.command].error(f"unrecognized arguments: {' '.join(rest)}")
    debug = args.debug or os.environ.get("OPTICAL_HF_DEBUG", "").lower() in ("1", "true", "yes")
    try:
        if args.command == "distill":
            _distill(rest)  # logging from the training args (--log_level, --log_level_replica), as in run()
        else:
            from .recipe import setup_logging

            level = getattr(logging, args.log_level.upper())
            setup_logging(level, None if args.log_level == "info" else level)
            if args.command == "evaluate":
                _evaluate(args)
            else:
                _push(args)
    except Interrupted as interrupted:
        print(f"{PROG}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted: nothing was changed", file=sys.stderr)  # evaluate writes last; push is one commit
        return EXIT_INTERRUPTED
    except Exception as err:
        status = _exit_status(err)
        if status is None or debug:
            raise
        message = str(err) if status == EXIT_PUSH_FAILED else " ".join(str(err).split())  # input errors: one line
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return status
    return 0
