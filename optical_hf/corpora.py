"""Loaders for the evaluation corpora, returning plain Python structures.

* AfriQA "gold-pool" cross-lingual passage retrieval (:func:`load_afriqa_gold`, :func:`afriqa_files`): queries are the
  native-language questions of AfriQA's gold-passage files, each query's relevant document is its own gold English
  Wikipedia passage, and the corpus is the pool of all distinct gold passages of the files given. This is a closed-pool
  setup built from AfriQA's gold passages (see ``shared/README.md``), not AfriQA's official open-retrieval task.
* FLORES-200 / SIB-200 sentences aligned across languages by ``index_id`` (:func:`load_flores`, :func:`flores_pairs`),
  for the bitext-mining check.
* Any BEIR-formatted retrieval dataset (:func:`load_beir`), with BEIR TSV or TREC qrels.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from .errors import OpticalInputError

logger = logging.getLogger(__name__)

PathType = str | PathLike[str]

AFRIQA_GOLD_TEMPLATE = "gold_span_passages.afriqa.{lang}.en.{split}.json"
_AFRIQA_GOLD_PATTERN = re.compile(r"gold_span_passages\.afriqa\.(?P<lang>[^.]+)\.en\.(?P<split>[^.]+)\.json$")
ENGLISH_FLORES = "eng_Latn"


class CorpusFormatError(OpticalInputError):
    """A corpus file is malformed; the message names the file and, where it applies, the line."""


@dataclass
class RetrievalData:
    """One (cross-lingual) retrieval task.

    Attributes:
        queries: ``qid -> query text`` (for CLIR: in the low-resource language).
        corpus: ``docid -> document text`` (for CLIR: English).
        qrels: ``qid -> {docid: relevance}``; relevance > 0 means relevant.
        translations: ``qid -> English translation of the query``, when known (used for the translation oracle).
    """

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]
    translations: dict[str, str] = field(default_factory=dict)


def _existing_files(files: Sequence[PathType]) -> list[Path]:
    """``files`` as paths, checked to exist up front so that a typo fails before any reading (names the file)."""
    paths = [Path(path) for path in files]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"No such file: {path}")
    return paths


def _read_jsonl(path: PathType, required_keys: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSON-lines file.

    Raises:
        FileNotFoundError: the file does not exist.
        CorpusFormatError: a line is not a JSON object or lacks one of ``required_keys`` (file and line are named).
    """
    (path,) = _existing_files([path])
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CorpusFormatError(f"{path}, line {line_number}: invalid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise CorpusFormatError(
                    f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}"
                )
            missing = [key for key in required_keys if key not in record]
            if missing:
                raise CorpusFormatError(f"{path}, line {line_number}: missing key(s) {missing}")
            yield line_number, record


def _clean_text(value: Any) -> str:
    """``value`` as stripped text; ``""`` for ``null`` and ``NaN`` (AfriQA has null contexts and a NaN question)."""
    if isinstance(value, str):
        return value.strip()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def passage_id(text: str) -> str:
    """Stable document id of a passage: the first 16 hex digits of the SHA-1 of its UTF-8 text."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _afriqa_file_tag(path: Path) -> str:
    """``{lang}.{split}`` for a gold-passage file named like AfriQA's, else the file's stem (used to prefix qids)."""
    match = _AFRIQA_GOLD_PATTERN.search(path.name)
    return f"{match['lang']}.{match['split']}" if match else path.stem


def _gold_passage_root(root: PathType) -> Path:
    """Accept either ``afriqa/gold_passages`` or its parent ``afriqa``."""
    root = Path(root)
    return root / "gold_passages" if (root / "gold_passages").is_dir() else root


def afriqa_files(
    root: PathType, langs: str | Sequence[str] | None = None, splits: str | Sequence[str] | None = None
) -> list[Path]:
    """Paths of AfriQA gold-passage files ``{root}/{lang}/gold_span_passages.afriqa.{lang}.en.{split}.json``.

    Args:
        root: the ``gold_passages`` folder (one sub-folder per language), or the ``afriqa`` folder holding it.
        langs: language code(s), e.g. ``"hau"``; ``None`` means every language folder under ``root``.
        splits: split name(s), e.g. ``"dev"``; ``None`` means every split present for each language.

    Returns:
        Sorted list of existing files (languages in the given order, or alphabetical when ``langs`` is ``None``).

    Raises:
        FileNotFoundError: ``root`` is missing, or a file explicitly asked for (both ``langs`` and ``splits`` given)
            does not exist; or nothing matched.
    """
    gold_root = _gold_passage_root(root)
    if not gold_root.is_dir():
        raise FileNotFoundError(f"AfriQA gold-passage folder not found: {gold_root}")
    lang_list = [langs] if isinstance(langs, str) else langs
    split_list = [splits] if isinstance(splits, str) else splits
    if lang_list is None:
        lang_list = sorted(child.name for child in gold_root.iterdir() if child.is_dir())

    files: list[Path] = []
    for lang in lang_list:
        if split_list is None:
            pattern = AFRIQA_GOLD_TEMPLATE.format(lang=lang, split="*")
            files.extend(sorted((gold_root / lang).glob(pattern)))
            continue
        for split in split_list:
            path = gold_root / lang / AFRIQA_GOLD_TEMPLATE.format(lang=lang, split=split)
            if not path.is_file():
                raise FileNotFoundError(f"AfriQA gold-passage file not found: {path} (lang={lang!r}, split={split!r})")
            files.append(path)
    if not files:
        raise FileNotFoundError(f"No AfriQA gold-passage files under {gold_root} (langs {langs!r}, splits {splits!r})")
    return files


def _afriqa_contexts(path: Path) -> Iterator[str]:
    """Non-empty stripped ``context`` passages of one gold-passage file, in file order."""
    for _, record in _read_jsonl(path, ("context",)):
        text = _clean_text(record["context"])
        if text:
            yield text


def load_afriqa_gold(query_files: Sequence[PathType], pool_files: Sequence[PathType] | None = None) -> RetrievalData:
    """Build AfriQA "gold-pool" cross-lingual passage retrieval (protocol of ``shared/README.md``).

    * queries: ``question_lang`` (native language) of every row of ``query_files``; qid ``"{lang}.{split}:{id}"``
      (from the file name; the file stem when it is not named like AfriQA's).
    * qrels: each query's relevant document is its own row's ``context`` (relevance 1).
    * corpus: all distinct non-empty ``context`` passages of ``pool_files`` (default: ``query_files``), deduplicated by
      stripped text, docid = :func:`passage_id`. Passages of ``query_files`` missing from the pool are added so that
      every query's relevant document can be retrieved.
    * translations: ``question_translated`` (human English translation), for the translation oracle.

    Rows with an empty/null ``context`` or an empty question are skipped as queries (counted in a log line).
    This is a closed-pool setup built from AfriQA's gold passages, not AfriQA's official open-retrieval task.

    Raises:
        FileNotFoundError: a file is missing.
        CorpusFormatError: bad JSON, a missing key (``id``, ``question_lang``, ``context``) or a duplicate id; the file
            and line are named.
    """
    if not query_files:
        raise ValueError("load_afriqa_gold: query_files is empty")
    query_paths = _existing_files(query_files)
    pool_paths = _existing_files(pool_files) if pool_files is not None else query_paths
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    translations: dict[str, str] = {}
    query_passages: dict[str, str] = {}
    seen_ids: set[str] = set()
    skipped_context = skipped_question = 0
    for query_file in query_paths:
        tag = _afriqa_file_tag(query_file)
        for line_number, record in _read_jsonl(query_file, ("id", "question_lang", "context")):
            qid = f"{tag}:{record['id']}"
            if qid in seen_ids:
                raise CorpusFormatError(f"{query_file}, line {line_number}: duplicate query id {record['id']!r}")
            seen_ids.add(qid)
            context = _clean_text(record["context"])
            question = _clean_text(record["question_lang"])
            if not context:
                skipped_context += 1
                continue
            if not question:
                skipped_question += 1
                continue
            docid = passage_id(context)
            query_passages[docid] = context
            queries[qid] = question
            qrels[qid] = {docid: 1}
            translation = _clean_text(record.get("question_translated"))
            if translation:
                translations[qid] = translation

    corpus: dict[str, str] = {}
    for pool_file in pool_paths:
        for text in _afriqa_contexts(pool_file):
            corpus.setdefault(passage_id(text), text)
    added = {docid: text for docid, text in query_passages.items() if docid not in corpus}
    if added:
        logger.info("Added %d gold passages of the query files that were not in the pool files.", len(added))
        corpus.update(added)

    logger.info(
        "AfriQA gold pool: %d queries from %d file(s) (skipped %d rows with an empty context, %d with an empty "
        "question), %d distinct passages, %d queries with an English translation.",
        len(queries),
        len(query_files),
        skipped_context,
        skipped_question,
        len(corpus),
        len(translations),
    )
    return RetrievalData(queries=queries, corpus=corpus, qrels=qrels, translations=translations)


def _read_flores_split(path: Path) -> dict[str, str]:
    """``index_id -> text`` of one FLORES/SIB-200 TSV file (header ``index_id, category, text``)."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or "index_id" not in header or "text" not in header:
            raise CorpusFormatError(f"{path}, line 1: expected a header with 'index_id' and 'text', got {header}")
        id_column, text_column = header.index("index_id"), header.index("text")
        sentences: dict[str, str] = {}
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise CorpusFormatError(
                    f"{path}, line {reader.line_num}: expected {len(header)} tab-separated columns, got {len(row)}"
                )
            index_id = row[id_column]
            if index_id in sentences:
                raise CorpusFormatError(f"{path}, line {reader.line_num}: duplicate index_id {index_id!r}")
            sentences[index_id] = row[text_column]
    return sentences


def load_flores(root: PathType, lang: str, split: str | Sequence[str] | None = None) -> dict[str, str]:
    """Sentences of one language of FLORES-200 / SIB-200, ``index_id -> text``.

    Files are ``{root}/{lang}/{split}.tsv`` with header ``index_id, category, text`` (SIB-200: splits train/dev/test,
    1,004 sentences in all; FLORES-200 proper: dev/devtest). Sentences with the same ``index_id`` are translations of
    each other across languages.

    Args:
        root: folder holding one sub-folder per language (e.g. ``shared/data/flores-sib200``).
        lang: language folder, e.g. ``"swh_Latn"``.
        split: split name(s); ``None`` means every ``*.tsv`` file of the language folder.

    Raises:
        FileNotFoundError: the language folder or a requested split is missing.
        CorpusFormatError: bad header, wrong column count, or an ``index_id`` repeated (within or across splits).
    """
    lang_dir = Path(root) / lang
    if not lang_dir.is_dir():
        raise FileNotFoundError(f"FLORES language folder not found: {lang_dir}")
    if split is None:
        paths = sorted(lang_dir.glob("*.tsv"))
        if not paths:
            raise FileNotFoundError(f"No *.tsv split files in {lang_dir}")
    else:
        paths = _existing_files([lang_dir / f"{name}.tsv" for name in ([split] if isinstance(split, str) else split)])
    sentences: dict[str, str] = {}
    for path in paths:
        for index_id, text in _read_flores_split(path).items():
            if index_id in sentences:
                raise CorpusFormatError(f"{path}: index_id {index_id!r} already appears in another split of {lang_dir}")
            sentences[index_id] = text
    return sentences


def flores_pairs(
    root: PathType, lang: str, target_lang: str = ENGLISH_FLORES, split: str | Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """Aligned FLORES sentences of ``lang`` and ``target_lang`` (default English), joined on ``index_id``.

    Returns:
        ``(sources, targets)``: two lists of equal length ``N`` (ordered as ``lang``'s files), ``targets[i]`` being the
        translation of ``sources[i]``; with SIB-200's train/dev/test, ``N = 1004``. Ready for
        :func:`optical_hf.evaluation.bitext_retrieval`.
    """
    sources = load_flores(root, lang, split)
    targets = load_flores(root, target_lang, split)
    shared_ids = [index_id for index_id in sources if index_id in targets]
    unmatched = len(sources) + len(targets) - 2 * len(shared_ids)
    if unmatched:
        logger.warning("FLORES %s vs %s: %d sentences have no counterpart, left out.", lang, target_lang, unmatched)
    return [sources[index_id] for index_id in shared_ids], [targets[index_id] for index_id in shared_ids]


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """Read BEIR TSV qrels (header ``query-id corpus-id score``) or TREC qrels (``qid 0 docid rel``, no header)."""
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields or (line_number == 1 and fields[0] == "query-id"):
                continue
            if len(fields) == 3:
                qid, docid, score = fields
            elif len(fields) == 4:
                qid, _, docid, score = fields
            else:
                raise CorpusFormatError(
                    f"{path}, line {line_number}: expected 'query-id corpus-id score' or 'qid 0 docid rel', "
                    f"got {len(fields)} fields"
                )
            try:
                qrels.setdefault(qid, {})[docid] = int(score)
            except ValueError as error:
                raise CorpusFormatError(f"{path}, line {line_number}: relevance {score!r} is not an integer") from error
    return qrels


def load_beir(folder: PathType, split: str = "test", qrels_file: PathType | None = None) -> RetrievalData:
    """Load a retrieval dataset in BEIR layout.

    ``{folder}/corpus.jsonl`` (``{"_id", "title", "text"}``; document text = ``title + " " + text``, as BEIR does),
    ``{folder}/queries.jsonl`` (``{"_id", "text"}``) and ``{folder}/qrels/{split}.tsv`` (header
    ``query-id corpus-id score``). ``qrels_file`` replaces the latter and may also be a TREC qrels file
    (``qid 0 docid rel``). Only queries with at least one relevant (score > 0) document in the qrels are kept.

    Raises:
        FileNotFoundError: a file is missing.
        CorpusFormatError: bad JSON, a missing key, or a malformed qrels line (file and line named).
    """
    folder = Path(folder)
    qrels_path = Path(qrels_file) if qrels_file is not None else folder / "qrels" / f"{split}.tsv"
    corpus_path, queries_path = _existing_files([folder / "corpus.jsonl", folder / "queries.jsonl"])
    qrels = _read_qrels(_existing_files([qrels_path])[0])

    corpus = {
        str(record["_id"]): f"{_clean_text(record.get('title'))} {_clean_text(record['text'])}".strip()
        for _, record in _read_jsonl(corpus_path, ("_id", "text"))
    }
    judged = {qid for qid, judgements in qrels.items() if any(score > 0 for score in judgements.values())}
    queries = {
        str(record["_id"]): _clean_text(record["text"])
        for _, record in _read_jsonl(queries_path, ("_id", "text"))
        if str(record["_id"]) in judged
    }
    missing_queries = judged - queries.keys()
    if missing_queries:
        raise CorpusFormatError(
            f"{qrels_path}: {len(missing_queries)} judged query id(s) are not in {queries_path}, "
            f"e.g. {sorted(missing_queries)[:3]}"
        )
    qrels = {qid: qrels[qid] for qid in queries}
    unknown_docs = {docid for judgements in qrels.values() for docid in judgements if docid not in corpus}
    if unknown_docs:
        logger.warning("%s: %d judged document id(s) are not in %s.", qrels_path, len(unknown_docs), corpus_path)
    logger.info("BEIR %s (%s): %d queries, %d documents.", folder, qrels_path.name, len(queries), len(corpus))
    return RetrievalData(queries=queries, corpus=corpus, qrels=qrels)
