"""Bitext loading: parallel sentences as a ``datasets.Dataset`` with columns ``source`` and ``target``.

``source`` is the low-resource-language side (encoded by the student), ``target`` its English translation
(encoded by the teacher). Text files are read as UTF-8 with universal line endings: ``\n``, ``\r\n`` and a lone ``\r``
(classic Mac) each end a line, as in Python's text mode. Accepted inputs, chosen by :func:`load_bitext`:

* two line-aligned UTF-8 plain-text files (``source`` and ``target`` both given): line *i* of one file
  translates line *i* of the other; every line is a pair, so a blank line is an error;
* a ``.tsv`` or ``.csv`` file whose **first row is a header** naming the columns. Headerless files are not
  guessed at: a first row that lacks ``source_column``/``target_column`` is an error listing the columns it
  has (add a header line such as ``source<TAB>target``, or pass the names it has); so is a header that names
  ``source_column`` or ``target_column`` twice. Both use the standard CSV quoting rules (a field that starts
  with ``"`` is quoted, ``""`` inside it is a literal quote), which is what pandas and ``datasets`` write, but
  a field may not span lines: a quoted field that runs over a line break (typically an unbalanced ``"`` at the
  start of a sentence) is an error naming the line where it starts. Extra columns are ignored; blank lines
  are skipped;
* a ``.jsonl`` or ``.json`` file of JSON lines (one object per line; blank lines are skipped);
* a local folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``split`` picks the
  split of a ``DatasetDict``);
* anything else is taken as a Hugging Face Hub dataset id and loaded with ``datasets.load_dataset`` (``name``
  picks the dataset config, e.g. ``"en-swa"`` of ``masakhane/lafand-mt``).

Nested columns: a dotted column name reads a field of a struct column. The Hub translation layout (opus-100,
lafand-mt, wmt*) is a ``translation`` column of ``{language code: sentence}`` dicts; ``source_lang="sw",
target_lang="en"`` reads it, as shorthand for ``source_column="translation.sw", target_column="translation.en"``
(in ``datasets`` folders, Hub datasets and JSON lines such as ``{"translation": {"en": "Hi", "sw": "Habari"}}``).

All text is stripped of surrounding whitespace; a side that is empty after stripping raises
:class:`BitextError` naming the file and line (or row), as do undecodable bytes, unparsable JSON lines,
missing columns, differing line counts and missing paths.

How files are read: ``datasets.load_dataset("text" / "csv" / "json")`` parses every file, and one validation pass
over the loaded columns (:func:`_check_pairs`) strips the text and names the line of an empty side. Three things
those readers cannot report, so a pre-validation pass over the raw file checks them first:

* the line of a UTF-8 error (the readers raise a bare ``UnicodeDecodeError``): the text reader is re-read line by
  line only when it fails, CSV/TSV and JSON-lines files are decoded line by line in their pre-pass;
* for CSV/TSV (pandas), a quoted field spanning lines (pandas silently joins the lines), a repeated header name
  (pandas renames it ``name.1``), a row with the wrong field count and the line number of each record (pandas
  skips blank lines and does not report where a row came from);
* for JSON lines (pyarrow), a line that is not an object, a line missing a column and a non-string value (pyarrow
  fills a missing key with null, and the ``datasets`` reader re-encodes a column of mixed types as JSON strings,
  so ``3`` and ``"3"`` would both load as text).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import datasets
from datasets.exceptions import DatasetGenerationError

from .errors import OpticalInputError

logger = logging.getLogger(__name__)

FEATURES = datasets.Features({"source": datasets.Value("string"), "target": datasets.Value("string")})
TRANSLATION_COLUMN = "translation"
_TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})
_TABLE_DIALECTS = {".tsv": "excel-tab", ".csv": "excel"}
_JSON_SUFFIXES = (".jsonl", ".json")
_FILE_SUFFIXES = (*_TABLE_DIALECTS, *_JSON_SUFFIXES, ".txt")
_STRING_TYPES = ("string", "large_string")

BitextSpec = Union[str, os.PathLike, tuple[Union[str, os.PathLike], Union[str, os.PathLike]], Mapping[str, Any]]


class BitextError(OpticalInputError):
    """Bad bitext input; the message names the file (or dataset) and, where there is one, the line or row."""


def _raw_lines(path: Path) -> Iterator[bytes]:
    """Yield the lines of ``path`` as bytes with their endings; ``\\n``, ``\\r\\n`` and a lone ``\\r`` end a line."""
    with path.open("rb") as handle:
        for chunk in handle:  # ends with b"\n", so a b"\r\n" is never split across chunks
            yield from chunk.splitlines(keepends=True)


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, decoded line with its line ending)`` (universal line endings)."""
    offset = 0
    for number, raw in enumerate(_raw_lines(path), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            bad = raw[error.start : error.end]
            raise BitextError(
                f"{path}, line {number}: not valid UTF-8 (byte {bad!r} at byte offset {offset + error.start} "
                "of the file); re-encode the file as UTF-8"
            ) from None
        offset += len(raw)
        yield number, text.lstrip("\ufeff") if number == 1 else text


def _require_string(value: object, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise BitextError(f"{where}: {column!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def _side(value: object, where: str, column: str) -> str:
    """Return ``value`` stripped, or raise if it is not a string or is empty/whitespace-only."""
    text = _require_string(value, where, column).strip()
    if not text:
        raise BitextError(f"{where}: {column!r} is empty or whitespace-only")
    return text


def _check_pairs(
    sources: Sequence[object], targets: Sequence[object], columns: tuple[str, str], where: Callable[[int, int], str]
) -> tuple[list[str], list[str]]:
    """The validation pass: strip every pair of loaded sentences; ``where(row, side)`` names row ``row`` of side 0/1."""
    checked: tuple[list[str], list[str]] = ([], [])
    for row, pair in enumerate(zip(sources, targets)):
        for side, value in enumerate(pair):
            checked[side].append(_side(value, where(row, side), columns[side]))
    return checked


def _missing_columns(where: str, present: Sequence[str], wanted: Sequence[str]) -> None:
    missing = [column for column in wanted if column not in present]
    if missing:
        raise BitextError(
            f"{where}: missing column(s) {missing}; columns present: {list(present)}. Pass source_column=/"
            "target_column= to name the columns to read "
            f"(source_lang=/target_lang= for a {TRANSLATION_COLUMN!r} column)."
        )


def _load_file(builder: str, path: Path, **config: Any) -> datasets.Dataset:
    """Parse one local file with ``datasets.load_dataset(builder)`` (the ``train`` split it makes of it).

    Each read gets a fresh, temporary cache folder and keeps the result in memory: ``datasets`` keys its cache of a
    local file on the path and modification time only, so a file rewritten within one timestamp would otherwise load
    its old pairs. The "Generating train split" progress bar of that read is not shown (a local file parses in
    seconds; the bar, new at every read, would be the noisiest line of a run).
    """
    shown = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="optical-hf-bitext-") as cache_dir:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir,
                                         keep_in_memory=True, **config)
    finally:
        if shown:
            datasets.enable_progress_bars()


def _text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (universal line endings, BOM dropped), via ``load_dataset("text")``."""
    if path.stat().st_size == 0:  # load_dataset cannot build a split without rows
        return []
    try:
        return _load_file("text", path, encoding="utf-8-sig", features=_TEXT_FEATURES)["text"]
    except DatasetGenerationError as error:
        if isinstance(error.__cause__, UnicodeDecodeError):
            for _ in _read_lines(path):  # raises the BitextError naming the line and byte offset
                pass
        raise


def _read_text_pair(source: Path, target: Path) -> tuple[list[str], list[str]]:
    source_lines, target_lines = _text_lines(source), _text_lines(target)
    if len(source_lines) != len(target_lines):
        raise BitextError(
            f"line counts differ: {source} has {len(source_lines)} lines but {target} has {len(target_lines)} lines; "
            "the two files must be line-aligned"
        )
    paths = (source, target)
    return _check_pairs(
        source_lines, target_lines, ("source", "target"), lambda row, side: f"{paths[side]}, line {row + 1}"
    )


def _scan_table(path: Path) -> tuple[list[str], list[int]]:
    """Pre-validation pass over a CSV/TSV file: its header row and the 1-based line number of each data record.

    Blank (or whitespace-only) lines are skipped, as pandas does; a record spanning lines, a record whose field count
    differs from the header's and undecodable bytes are errors naming the line.
    """
    reader = csv.reader((line for _, line in _read_lines(path)), dialect=_TABLE_DIALECTS[path.suffix.lower()])
    header: list[str] | None = None
    numbers, start = [], 1
    try:
        for row in reader:
            if reader.line_num != start:
                raise BitextError(
                    f"{path}, line {start}: a quoted field runs on to line {reader.line_num}; fields cannot span "
                    "lines (is a '\"' at the start of a field unbalanced? double it, or quote the whole field)"
                )
            if header is None:
                header = row
            elif len(row) > 1 or (row and row[0].strip()):
                if len(row) != len(header):
                    raise BitextError(f"{path}, line {start}: {len(row)} fields but the header row has {len(header)}")
                numbers.append(start)
            start = reader.line_num + 1
    except csv.Error as error:
        raise BitextError(f"{path}, line {reader.line_num}: {error}") from None
    if header is None:
        raise BitextError(f"{path}: empty file; expected a header row naming the columns")
    return header, numbers


def _read_table(path: Path, source_column: str, target_column: str) -> tuple[list[str], list[str]]:
    header, numbers = _scan_table(path)
    names = [name.strip() for name in header]
    where = f"{path}, line 1 (header row)"
    _missing_columns(where, names, (source_column, target_column))
    for column in (source_column, target_column):
        if names.count(column) > 1:
            raise BitextError(f"{where}: column {column!r} appears {names.count(column)} times; rename all but one")
    if not numbers:
        return [], []
    indexes = sorted({names.index(source_column), names.index(target_column)})
    loaded = _load_file(
        "csv", path, sep="\t" if path.suffix.lower() == ".tsv" else ",", encoding="utf-8-sig", na_filter=False,
        usecols=[header[index] for index in indexes],
        features=datasets.Features({header[index]: datasets.Value("string") for index in indexes}),
    )
    if len(loaded) != len(numbers):
        raise BitextError(f"{path}: the CSV reader found {len(loaded)} rows where the file has {len(numbers)} records")
    columns = (source_column, target_column)
    raw = [header[names.index(column)] for column in columns]
    return _check_pairs(loaded[raw[0]], loaded[raw[1]], columns, lambda row, _: f"{path}, line {numbers[row]}")


def _fields(record: dict, prefix: str = "") -> dict[str, object]:
    """Every field of a JSON object by dotted path, nested objects included: ``translation``, ``translation.sw``..."""
    fields: dict[str, object] = {}
    for key, value in record.items():
        fields[prefix + key] = value
        if isinstance(value, dict):
            fields.update(_fields(value, f"{prefix}{key}."))
    return fields


def _scan_json_lines(path: Path, columns: tuple[str, str]) -> list[int]:
    """Pre-validation pass over a JSON-lines file: the 1-based line number of each record (blank lines skipped);
    a line that is not a JSON object, lacks a column or holds a non-string in one is an error naming the line."""
    numbers = []
    for number, line in _read_lines(path):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BitextError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise BitextError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
        fields = _fields(record)
        _missing_columns(where, list(fields), columns)
        for column in columns:
            _require_string(fields[column], where, column)
        numbers.append(number)
    return numbers


def _read_json_lines(path: Path, source_column: str, target_column: str) -> tuple[list[str], list[str]]:
    columns = (source_column, target_column)
    numbers = _scan_json_lines(path, columns)
    if not numbers:
        return [], []
    loaded = _load_file("json", path).flatten()
    return _check_pairs(loaded[source_column], loaded[target_column], columns,
                        lambda row, _: f"{path}, line {numbers[row]}")


def _read_dataset(
    loaded: datasets.Dataset | datasets.DatasetDict, name: str, split: str, source_column: str, target_column: str
) -> tuple[list[str], list[str]]:
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise BitextError(f"{name}: no split {split!r}; splits present: {list(loaded)}")
        loaded = loaded[split]
    loaded = loaded.flatten()  # a struct column's fields become dotted columns: translation -> translation.sw, ...
    columns = (source_column, target_column)
    _missing_columns(name, loaded.column_names, columns)
    for column in columns:
        dtype = getattr(loaded.features[column], "dtype", type(loaded.features[column]).__name__)
        if dtype not in _STRING_TYPES:
            raise BitextError(f"{name}: column {column!r} holds {dtype}, not strings")
    return _check_pairs(loaded[source_column], loaded[target_column], columns, lambda row, _: f"{name}, row {row + 1}")


def _read_folder(path: Path, split: str, source_column: str, target_column: str) -> tuple[list[str], list[str]]:
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise BitextError(
            f"{path}: not a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk ({error})"
        ) from None
    return _read_dataset(loaded, str(path), split, source_column, target_column)


def _read_hub(
    dataset_id: str, name: str | None, split: str, source_column: str, target_column: str
) -> tuple[list[str], list[str]]:
    try:
        loaded = datasets.load_dataset(dataset_id, name=name)
    except (FileNotFoundError, ConnectionError) as error:
        raise BitextError(
            f"{dataset_id}: not found locally (no such file or folder) nor on the Hugging Face Hub ({error})"
        ) from None
    except ValueError as error:  # e.g. an unknown config name; the message lists the configs there are
        raise BitextError(f"Hub dataset {dataset_id} (config {name!r}): {error}") from None
    described = f"Hub dataset {dataset_id}" + (f" (config {name!r})" if name else "")
    return _read_dataset(loaded, described, split, source_column, target_column)


def _read(
    source: str | os.PathLike, target: str | os.PathLike | None, source_column: str, target_column: str, split: str,
    name: str | None,
) -> tuple[list[str], list[str]]:
    """Dispatch on the input kind; return the stripped source and target sides."""
    if name is not None and (target is not None or Path(source).expanduser().exists()):
        raise BitextError(f"{source}: name={name!r} picks a Hub dataset config; it does not apply to local files")
    if target is not None:
        paths = Path(source).expanduser(), Path(target).expanduser()
        for path in paths:
            if not path.is_file():
                raise BitextError(f"{path}: no such file (with target=, source and target must be plain-text files)")
        return _read_text_pair(*paths)
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path, split, source_column, target_column)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in _TABLE_DIALECTS:
            return _read_table(path, source_column, target_column)
        if suffix in _JSON_SUFFIXES:
            return _read_json_lines(path, source_column, target_column)
        raise BitextError(
            f"{path}: unsupported single-file format {suffix!r}; use .tsv, .csv, .jsonl or .json, "
            "or pass two line-aligned plain-text files as source= and target="
        )
    looks_like_path = path.is_absolute() or str(source).startswith((".", "~")) or suffix in _FILE_SUFFIXES
    if isinstance(source, os.PathLike) or looks_like_path:
        raise BitextError(f"{path}: no such file or folder")
    return _read_hub(str(source), name, split, source_column, target_column)


def _language_column(lang: str | None, column: str, side: str) -> str:
    """``translation.<lang>`` when a language is given (``side``: "source"/"target", the default column name)."""
    if lang is None:
        return column
    if column != side:
        raise BitextError(f"give {side}_lang= or {side}_column=, not both (got {lang!r} and {column!r})")
    return f"{TRANSLATION_COLUMN}.{lang}"


def bitext_from_pairs(pairs: Sequence[tuple[str, str]]) -> datasets.Dataset:
    """Build a bitext ``Dataset`` from in-memory ``(source, target)`` string pairs (stripped, none empty).

    Example:
        >>> bitext_from_pairs([("Habari ya asubuhi", "Good morning")])[0]
        {'source': 'Habari ya asubuhi', 'target': 'Good morning'}
    """
    sources, targets = [], []
    for index, pair in enumerate(pairs):
        if len(pair) != 2:
            raise BitextError(f"pairs[{index}]: expected a (source, target) pair, got {len(pair)} items")
        sources.append(_side(pair[0], f"pairs[{index}]", "source"))
        targets.append(_side(pair[1], f"pairs[{index}]", "target"))
    return datasets.Dataset.from_dict({"source": sources, "target": targets}, features=FEATURES)


def load_bitext(
    source: str | os.PathLike,
    target: str | os.PathLike | None = None,
    *,
    source_column: str = "source",
    target_column: str = "target",
    source_lang: str | None = None,
    target_lang: str | None = None,
    split: str = "train",
    name: str | None = None,
    deduplicate: bool = False,
    max_length_ratio: float | None = None,
    max_pairs: int | None = None,
    seed: int | None = None,
) -> datasets.Dataset:
    """Load parallel sentences as a ``Dataset`` of N rows with exactly the string columns ``source``, ``target``.

    Args:
        source: two-file mode (``target`` given): the plain-text file of low-resource-language sentences.
            Otherwise a ``.tsv``/``.csv`` (with header row) or ``.jsonl``/``.json`` file, a ``save_to_disk``
            folder, or a Hugging Face Hub dataset id (see the module docstring for the rules).
        target: the plain-text file of English translations, line-aligned with ``source``.
        source_column, target_column: columns to read from table, JSON-lines and ``datasets`` inputs; a dotted
            name reads a field of a nested column (``translation.sw``).
        source_lang, target_lang: language keys of a ``translation`` column of ``{language: sentence}`` dicts
            (the Hub translation layout); ``source_lang="sw"`` means ``source_column="translation.sw"``.
        split: split to read from a ``DatasetDict`` folder or Hub dataset.
        name: config of a Hub dataset (``load_dataset(source, name)``), e.g. ``"en-swa"``, ``"en-sw"``.
        deduplicate: drop exact duplicate ``(source, target)`` pairs (after stripping), keeping the first.
        max_length_ratio: drop pairs whose character lengths satisfy ``max / min > max_length_ratio``
            (e.g. ``3.0``); must be >= 1.
        max_pairs: keep at most this many pairs, after filtering (and after shuffling when ``seed`` is set).
        seed: shuffle the pairs with ``Dataset.shuffle(seed=seed)``; ``None`` keeps the file order.

    Raises:
        BitextError: unreadable or malformed input; the message names the file and line (or row).
        OpticalInputError: an invalid ``max_length_ratio`` or ``max_pairs`` (BitextError is one too).

    Example (``train.swa``/``train.en`` line-aligned; ``pairs.tsv`` with a header row ``id<TAB>swa<TAB>en``)::

        bitext = load_bitext("train.swa", "train.en", deduplicate=True, max_length_ratio=3.0)
        bitext.column_names  # ['source', 'target']
        sample = load_bitext("pairs.tsv", source_column="swa", target_column="en", max_pairs=1000, seed=0)
        lafand = load_bitext("masakhane/lafand-mt", name="en-swa", source_lang="swa", target_lang="en")
    """
    if max_length_ratio is not None and max_length_ratio < 1:
        raise OpticalInputError(f"max_length_ratio must be >= 1 (a max/min length ratio), got {max_length_ratio}")
    if max_pairs is not None and max_pairs < 1:
        raise OpticalInputError(f"max_pairs must be a positive number of pairs, got {max_pairs}")
    source_column = _language_column(source_lang, source_column, "source")
    target_column = _language_column(target_lang, target_column, "target")
    sources, targets = _read(source, target, source_column, target_column, split, name)
    if not sources:
        raise BitextError(f"{source}: no sentence pairs found")
    pairs = list(zip(sources, targets))
    read = len(pairs)
    if deduplicate:
        pairs = list(dict.fromkeys(pairs))
    duplicates = read - len(pairs)
    if max_length_ratio is not None:
        pairs = [pair for pair in pairs if max(map(len, pair)) <= max_length_ratio * min(map(len, pair))]
    too_uneven = read - duplicates - len(pairs)
    bitext = datasets.Dataset.from_dict(
        {"source": [pair[0] for pair in pairs], "target": [pair[1] for pair in pairs]}, features=FEATURES
    )
    if seed is not None:
        bitext = bitext.shuffle(seed=seed)
    if max_pairs is not None and len(bitext) > max_pairs:
        bitext = bitext.select(range(max_pairs))
    logger.info(
        "Read %d pairs from %s; dropped %d duplicates, %d over length ratio %s, %d over max_pairs; kept %d",
        read, source if target is None else f"{source} + {target}", duplicates, too_uneven, max_length_ratio,
        len(pairs) - len(bitext), len(bitext),
    )
    if not len(bitext):
        logger.warning("No bitext pairs left after filtering %s", source)
    return bitext


def load_bitexts(bitexts: Mapping[str, BitextSpec], **options: Any) -> datasets.DatasetDict:
    """Load one bitext per language into a ``DatasetDict`` keyed by language code (one student, several languages).

    ``SentenceTransformerTrainer`` takes the result as ``train_dataset`` and draws each batch from one language
    (``multi_dataset_batch_sampler``), as in sentence-transformers' ``make_multilingual`` example.

    Args:
        bitexts: language code -> a file, folder or Hub id (``load_bitext(value)``), a ``(source, target)`` pair of
            line-aligned text files, or a dict of :func:`load_bitext` keyword arguments (with ``source``).
        options: :func:`load_bitext` keyword arguments for every language (``deduplicate=True``, ``max_pairs=``,
            ...); a dict value overrides them for its language.

    Example::

        train = load_bitexts({
            "sw": ("train.swa", "train.en"),
            "ha": {"source": "masakhane/lafand-mt", "name": "en-hau", "source_lang": "hau", "target_lang": "en"},
        }, deduplicate=True)
        train["ha"].column_names  # ['source', 'target']
    """
    if not bitexts:
        raise BitextError("load_bitexts: no languages given (pass {language code: bitext})")
    loaded = {}
    for language, spec in bitexts.items():
        if isinstance(spec, Mapping):
            loaded[language] = load_bitext(**{**options, **spec})
        elif isinstance(spec, tuple):
            loaded[language] = load_bitext(*spec, **options)
        else:
            loaded[language] = load_bitext(spec, **options)
    return datasets.DatasetDict(loaded)
