"""Folder size of a saved student, ``--export pair`` (the whole retriever: student and teacher) against ``--export
student`` (the query encoder alone), for the packaged teacher and multilingual-e5-small:

    python benchmarks/export_size.py [--e5 ~/.cache/optical-bench/multilingual-e5-small]

Writes ``benchmarks/results/export_size.md``. Untrained students: a saved folder's size does not depend on training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO_ROOT))

from sentence_transformers import SentenceTransformer  # noqa: E402

from benchmarks.common import DEFAULT_E5, machine_info, write_report  # noqa: E402
from optical_hf import StudentCardInfo, save_student  # noqa: E402
from optical_hf.recipe import packaged_teacher_path  # noqa: E402


def folder_mib(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--e5", type=Path, default=DEFAULT_E5,
                        help="multilingual-e5-small folder (python ../shared/tools/build_multilingual_e5_small.py)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "export_size.md")
    args = parser.parse_args(argv)
    if not (args.e5 / "modules.json").is_file():
        parser.error(f"--e5 {args.e5}: not a SentenceTransformer folder")
    minilm, e5 = packaged_teacher_path(), str(args.e5)
    pairs = {"all-MiniLM-L6-v2 → all-MiniLM-L6-v2": (minilm, minilm), "multilingual-e5-small → same": (e5, e5),
             "all-MiniLM-L6-v2 teacher, multilingual-e5-small student": (minilm, e5)}
    machine = machine_info("cpu")
    lines = ["# Saved folder size: `--export pair` against `--export student`", "",
             f"Command: `{machine['command']}`; {machine['date']}. Sizes in MiB (every file of the folder: weights, "
             "tokenizer, config, model card).", "",
             "| teacher → student | student folder | pair folder | pair / student |", "|---|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, (teacher_path, student_path) in pairs.items():
            student, teacher = (SentenceTransformer(path, device="cpu") for path in (student_path, teacher_path))
            card = StudentCardInfo(language="sw", teacher=teacher_path)
            sizes = [folder_mib(save_student(student, Path(tmp) / f"{name}-{export}", card=card,
                                             teacher_model=teacher if export == "pair" else None))
                     for export in ("student", "pair")]
            lines.append(f"| {name} | {sizes[0]:.1f} | {sizes[1]:.1f} | {sizes[1] / sizes[0]:.2f} |")
    return write_report(lines, args.output)


if __name__ == "__main__":
    main()
