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
* anything else is taken as a Hugging Face Hub dataset id and loaded with ``datasets.load_dataset``.

All text is stripped of surrounding whitespace; a side that is empty after stripping raises
:class:`BitextError` naming the file and line (or row), as do undecodable bytes, unparsable JSON lines,
missing columns, differing line counts and missing paths.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets

from .errors import OpticalInputError

logger = logging.getLogger(__name__)

FEATURES = datasets.Features({"source": datasets.Value("string"), "target": datasets.Value("string")})
_TABLE_DIALECTS = {".tsv": "excel-tab", ".csv": "excel"}
_JSON_SUFFIXES = (".jsonl", ".json")
_FILE_SUFFIXES = (*_TABLE_DIALECTS, *_JSON_SUFFIXES, ".txt")
_STRING_TYPES = ("string", "large_string")


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


def _side(value: object, where: str, column: str) -> str:
    """Return ``value`` stripped, or raise if it is not a string or is empty/whitespace-only."""
    if not isinstance(value, str):
        raise BitextError(f"{where}: {column!r} must be a string, got {type(value).__name__} {value!r}")
    text = value.strip()
    if not text:
        raise BitextError(f"{where}: {column!r} is empty or whitespace-only")
    return text


def _missing_columns(where: str, present: Sequence[str], wanted: Sequence[str]) -> None:
    missing = [column for column in wanted if column not in present]
    if missing:
        raise BitextError(
            f"{where}: missing column(s) {missing}; columns present: {list(present)}. "
            "Pass source_column=/target_column= to name the columns to read."
        )


def _read_text_pair(source: Path, target: Path) -> tuple[list[str], list[str]]:
    source_lines = [line for _, line in _read_lines(source)]
    target_lines = [line for _, line in _read_lines(target)]
    if len(source_lines) != len(target_lines):
        raise BitextError(
            f"line counts differ: {source} has {len(source_lines)} lines but {target} has {len(target_lines)} lines; "
            "the two files must be line-aligned"
        )
    sources, targets = [], []
    for number, (source_line, target_line) in enumerate(zip(source_lines, target_lines), start=1):
        sources.append(_side(source_line, f"{source}, line {number}", "source"))
        targets.append(_side(target_line, f"{target}, line {number}", "target"))
    return sources, targets


def _table_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(1-based line number, fields)`` of each CSV/TSV record; a record spanning lines is an error."""
    reader = csv.reader((line for _, line in _read_lines(path)), dialect=_TABLE_DIALECTS[path.suffix.lower()])
    start = 1
    try:
        for row in reader:
            if reader.line_num != start:
                raise BitextError(
                    f"{path}, line {start}: a quoted field runs on to line {reader.line_num}; fields cannot span "
                    "lines (is a '\"' at the start of a field unbalanced? double it, or quote the whole field)"
                )
            yield start, row
            start = reader.line_num + 1
    except csv.Error as error:
        raise BitextError(f"{path}, line {reader.line_num}: {error}") from None


def _read_table(path: Path, source_column: str, target_column: str) -> tuple[list[str], list[str]]:
    rows = _table_rows(path)
    first = next(rows, None)
    if first is None:
        raise BitextError(f"{path}: empty file; expected a header row naming the columns")
    header = [name.strip() for name in first[1]]
    where = f"{path}, line 1 (header row)"
    _missing_columns(where, header, (source_column, target_column))
    for column in (source_column, target_column):
        if header.count(column) > 1:
            raise BitextError(f"{where}: column {column!r} appears {header.count(column)} times; rename all but one")
    source_index, target_index = header.index(source_column), header.index(target_column)
    sources, targets = [], []
    for number, row in rows:
        if not row:
            continue
        where = f"{path}, line {number}"
        if len(row) != len(header):
            raise BitextError(f"{where}: {len(row)} fields but the header row has {len(header)}")
        sources.append(_side(row[source_index], where, source_column))
        targets.append(_side(row[target_index], where, target_column))
    return sources, targets


def _read_json_lines(path: Path, source_column: str, target_column: str) -> tuple[list[str], list[str]]:
    sources, targets = [], []
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
        _missing_columns(where, list(record), (source_column, target_column))
        sources.append(_side(record[source_column], where, source_column))
        targets.append(_side(record[target_column], where, target_column))
    return sources, targets


def _read_dataset(
    loaded: datasets.Dataset | datasets.DatasetDict, name: str, split: str, source_column: str, target_column: str
) -> tuple[list[str], list[str]]:
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise BitextError(f"{name}: no split {split!r}; splits present: {list(loaded)}")
        loaded = loaded[split]
    _missing_columns(name, loaded.column_names, (source_column, target_column))
    for column in (source_column, target_column):
        dtype = getattr(loaded.features[column], "dtype", type(loaded.features[column]).__name__)
        if dtype not in _STRING_TYPES:
            raise BitextError(f"{name}: column {column!r} holds {dtype}, not strings")
    sources, targets = [], []
    for number, (source_text, target_text) in enumerate(zip(loaded[source_column], loaded[target_column]), start=1):
        where = f"{name}, row {number}"
        sources.append(_side(source_text, where, source_column))
        targets.append(_side(target_text, where, target_column))
    return sources, targets


def _read_folder(path: Path, split: str, source_column: str, target_column: str) -> tuple[list[str], list[str]]:
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise BitextError(
            f"{path}: not a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk ({error})"
        ) from None
    return _read_dataset(loaded, str(path), split, source_column, target_column)


def _read_hub(dataset_id: str, split: str, source_column: str, target_column: str) -> tuple[list[str], list[str]]:
    try:
        loaded = datasets.load_dataset(dataset_id)
    except (FileNotFoundError, ConnectionError) as error:
        raise BitextError(
            f"{dataset_id}: not found locally (no such file or folder) nor on the Hugging Face Hub ({error})"
        ) from None
    return _read_dataset(loaded, f"Hub dataset {dataset_id}", split, source_column, target_column)


def _read(
    source: str | os.PathLike, target: str | os.PathLike | None, source_column: str, target_column: str, split: str
) -> tuple[list[str], list[str]]:
    """Dispatch on the input kind; return the stripped source and target sides."""
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
    return _read_hub(str(source), split, source_column, target_column)


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
    split: str = "train",
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
        source_column, target_column: columns to read from table, JSON-lines and ``datasets`` inputs.
        split: split to read from a ``DatasetDict`` folder or Hub dataset.
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
    """
    if max_length_ratio is not None and max_length_ratio < 1:
        raise OpticalInputError(f"max_length_ratio must be >= 1 (a max/min length ratio), got {max_length_ratio}")
    if max_pairs is not None and max_pairs < 1:
        raise OpticalInputError(f"max_pairs must be a positive number of pairs, got {max_pairs}")
    sources, targets = _read(source, target, source_column, target_column, split)
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
