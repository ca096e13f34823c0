"""Sanity check of the OT word alignments behind code-switching (``optical_hf.code_switch``) on FLORES sentences.

There is no gold word alignment for these languages. What can be checked: words written identically on both sides
(numbers, names, punctuation) should link to themselves. For each alignment rule this prints that rate and writes it,
with five code-switched examples, to ``benchmarks/results/code_switch.md``:

    python benchmarks/code_switch.py [--flores ../shared/data/flores-sib200] [--lang swh_Latn] [--pairs 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO_ROOT))

from sentence_transformers import SentenceTransformer  # noqa: E402

from benchmarks.common import DEFAULT_E5, machine_info, write_report  # noqa: E402
from optical_hf.code_switch import align, code_switch, identity_link_rate  # noqa: E402
from optical_hf.corpora import flores_pairs  # noqa: E402
from optical_hf.vocabulary import ALIGNMENT_RULES  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flores", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "flores-sib200")
    parser.add_argument("--lang", default="swh_Latn")
    parser.add_argument("--model", default=str(DEFAULT_E5),
                        help="the multilingual model whose token states are aligned (both sides)")
    parser.add_argument("--pairs", type=int, default=200, help="FLORES dev pairs aligned")
    parser.add_argument("--p", type=float, default=0.5, help="replacement probability of the examples")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "code_switch.md")
    args = parser.parse_args(argv)
    if not (args.flores / args.lang).is_dir():
        parser.error(f"--flores {args.flores}: no {args.lang} folder there")
    sources, targets = flores_pairs(args.flores, args.lang, split="dev")
    pairs = list(zip(sources, targets))[:args.pairs]
    model = SentenceTransformer(args.model, device="cpu")
    machine = machine_info("cpu")
    lines = [f"# Code-switching alignments: FLORES {args.lang}-eng_Latn dev, first {len(pairs)} pairs", "",
             f"Command: `{machine['command']}`; model `{args.model}` on both sides; {machine['date']}.", "",
             "No gold alignment exists for this language: the check is that words written identically on both sides "
             "(a digit or capital first, or punctuation; once per side) link to their identical counterpart.", "",
             "| rule | identical words linked to themselves | such words | links per pair |", "|---|---:|---:|---:|"]
    examples = None
    for rule in ALIGNMENT_RULES:
        alignments = align(model, pairs, rule=rule)
        rate, total = identity_link_rate(alignments)
        links = sum(len(a.links) for a in alignments) / len(alignments)
        lines.append(f"| {rule} | {rate:.3f} | {total} | {links:.1f} |")
        examples = examples or alignments
    lines += ["", f"Five examples (mutual-argmax links; English side code-switched with p = {args.p}, seed 0):", ""]
    for alignment, variant in list(zip(examples, code_switch(examples, args.p)))[:5]:
        english, foreign = alignment.words("target"), alignment.words("source")
        shown = ", ".join(f"{english[b]}→{foreign[a]}" for a, b, _ in alignment.links[:12])
        lines += [f"- {args.lang}: {alignment.source}", f"  - English: {alignment.target}",
                  f"  - links (first 12): {shown}", f"  - code-switched: {variant}"]
    return write_report(lines, args.output)


if __name__ == "__main__":
    main()
