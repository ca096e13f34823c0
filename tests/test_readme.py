"""The Python snippets of the README and the guide run as written on the CPU build, with tiny models and temporary
data files.

Each ```python block of README.md, then of docs/guide.md, is executed in order (a later snippet may use the folder an
earlier one saved), in a temporary working folder, after the textual substitutions of :data:`SUBSTITUTIONS`: Hub model
ids become the tiny random models of ``conftest.model_dirs``, and step counts shrink so the whole file runs in
seconds. Data file names
(``train.sw``, ``bitext.tsv`` ...) are left as written: the test creates those files in the working folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO_ROOT, toy_bitext

README = REPO_ROOT / "README.md"
GUIDE = REPO_ROOT / "docs" / "guide.md"

# README text -> replacement; "{student}" / "{teacher}" are the tiny model folders of conftest.model_dirs.
SUBSTITUTIONS = {
    '"intfloat/multilingual-e5-small"': '"{student}"',
    '"xlm-roberta-base"': '"{student}"',
    '"sentence-transformers/all-MiniLM-L6-v2"': '"{teacher}"',
    '"sentence-transformers/all-mpnet-base-v2"': '"{teacher}"',
    "max_steps=1000": "max_steps=2",
    "max_steps=2000": "max_steps=2",
}
DATA_FILES = ("train.sw", "train.en", "bitext.tsv", "dev.tsv")


def python_snippets(*files: Path) -> list[str]:
    """The bodies of the ```python blocks of ``files``, in order."""
    text = "\n".join(path.read_text(encoding="utf-8") for path in files)
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def substituted(snippet: str, model_dirs: dict[str, Path]) -> str:
    for old, new in SUBSTITUTIONS.items():
        snippet = snippet.replace(old, new.format(student=model_dirs["student"], teacher=model_dirs["teacher"]))
    return snippet


def write_data_files(folder: Path) -> None:
    """The data files the snippets name, from a toy bitext: line-aligned text files and TSV tables."""
    pairs = toy_bitext(48, seed=5)
    (folder / "train.sw").write_text("".join(f"{source}\n" for source, _ in pairs), encoding="utf-8")
    (folder / "train.en").write_text("".join(f"{target}\n" for _, target in pairs), encoding="utf-8")
    table = "source\ttarget\n" + "".join(f"{source}\t{target}\n" for source, target in pairs)
    for name in ("bitext.tsv", "dev.tsv"):
        (folder / name).write_text(table, encoding="utf-8")


def test_the_substitutions_and_data_files_match_the_readme():
    text = "\n".join(python_snippets(README, GUIDE))
    assert [old for old in SUBSTITUTIONS if old not in text] == []
    assert [name for name in DATA_FILES if f'"{name}"' not in text] == []
    hub_ids = set(re.findall(r'"([\w.-]+/[\w.-]+)"', text))
    assert hub_ids <= {old.strip('"') for old in SUBSTITUTIONS}, "a README model id has no tiny substitute"


def test_readme_python_snippets_run(model_dirs, tmp_path, monkeypatch, capsys):
    assert len(python_snippets(README)) >= 3 and len(python_snippets(GUIDE)) >= 2
    snippets = python_snippets(README, GUIDE)
    monkeypatch.chdir(tmp_path)
    write_data_files(tmp_path)
    for index, snippet in enumerate(snippets):
        code = compile(substituted(snippet, model_dirs), f"README.md/docs/guide.md python snippet {index + 1}", "exec")
        exec(code, {"__name__": f"readme_snippet_{index + 1}"})
    printed = capsys.readouterr().out
    assert "Soko hufunguliwa saa ngapi?" in printed  # the retrieval example printed its ranking
    assert "MaxSim: Mto hufurika lini?" in printed  # and its late-interaction ranking
    assert all(f"{engine}:" in printed for engine in ("FAISS MaxSim", "FAISS dense", "Qdrant MaxSim"))
    assert (tmp_path / "optical-e5-sw-index" / "index.json").is_file()
    assert (tmp_path / "optical-e5-sw" / "modules.json").is_file()
    assert (tmp_path / "optical-xlmr-sw" / "modules.json").is_file()
