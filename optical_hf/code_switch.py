"""Code-switched bitext from our own OT alignments (after Litschko, Artemova & Plank 2023, arXiv 2305.05295, who
replace English words by dictionary translations).

No dictionary is needed: the entropic OT plan between a model's token states of a low-resource sentence and of its
English translation is a soft token alignment. :func:`align` turns it into word links:

1. each side is tokenized with word boundaries (a fast tokenizer's ``word_ids``); special tokens carry no word;
2. the token plan ``P`` (cost ``1 - cos``, uniform marginals over the word tokens, :func:`optical_hf.sinkhorn`) is
   summed over the sub-words of each word: ``W_ab = sum_{i in a, j in b} P_ij``;
3. words ``a`` and ``b`` are linked by the mutual-argmax rule (``a``'s best ``b`` and ``b``'s best ``a``), or, with
   ``rule="threshold"``, wherever ``W_ab`` is at least ``threshold`` of row ``a``'s mass (as yukiar/OTAlign's
   unsupervised alignment thresholds its plans).

:func:`code_switch` then replaces each linked word of one side by its partner with probability ``p`` (the English side
by default: English text with low-resource words, as queries mix them). :func:`lexicon_alignments` links words from a
two-column lexicon file instead. :func:`save_alignments` / :func:`load_alignments` store the links, words and spans,
so that a run is reproducible without the model.

There is no gold word alignment for the low-resource languages here: the only check is that tokens identical on both
sides (numbers, names, punctuation) link to themselves (:func:`identity_link_rate`, ``benchmarks/code_switch.py``).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from .arguments import CodeSwitchArguments
from .errors import OpticalInputError
from .options import SinkhornOptions
from .ot import sinkhorn
from .vocabulary import ALIGNMENT_RULES, check_choice

logger = logging.getLogger(__name__)

__all__ = ["Alignment", "align", "code_switch", "code_switched_bitext", "identity_link_rate", "lexicon_alignments",
           "load_alignments", "save_alignments", "word_plan"]


@dataclass
class Alignment:
    """Word links of one pair.

    Attributes:
        source, target: the two sentences.
        source_spans, target_spans: ``[start, end)`` character spans of each word.
        links: ``[source word, target word, weight]`` triples (weight: the word plan's mass, 1.0 from a lexicon).
    """

    source: str
    target: str
    source_spans: list[tuple[int, int]]
    target_spans: list[tuple[int, int]]
    links: list[tuple[int, int, float]]

    def words(self, side: str) -> list[str]:
        text, spans = (self.source, self.source_spans) if side == "source" else (self.target, self.target_spans)
        return [text[start:end] for start, end in spans]


def word_plan(plan: torch.Tensor, source_words: Sequence[int], target_words: Sequence[int]) -> torch.Tensor:
    """``(n_source_words, n_target_words)`` word plan: the token plan ``(n, m)`` summed over the tokens of each word.

    Args:
        plan: ``(n, m)`` transport plan between the word-bearing tokens of the two sides.
        source_words, target_words: the word index of each of those tokens (``n`` and ``m`` of them).
    """
    rows = torch.zeros(max(source_words) + 1, plan.shape[0], dtype=plan.dtype)
    rows[torch.as_tensor(source_words), torch.arange(plan.shape[0])] = 1
    cols = torch.zeros(plan.shape[1], max(target_words) + 1, dtype=plan.dtype)
    cols[torch.arange(plan.shape[1]), torch.as_tensor(target_words)] = 1
    return rows @ plan @ cols


def links_from_word_plan(words: torch.Tensor, rule: str = "mutual-argmax",
                         threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """Word links of a word plan ``(n_source_words, n_target_words)`` by ``rule`` (see the module docstring)."""
    check_choice(rule, ALIGNMENT_RULES, "rule")
    if rule == "mutual-argmax":
        best_target, best_source = words.argmax(dim=1), words.argmax(dim=0)
        pairs = [(a, int(b)) for a, b in enumerate(best_target.tolist()) if int(best_source[b]) == a]
    else:
        share = words / words.sum(dim=1, keepdim=True).clamp_min(torch.finfo(words.dtype).tiny)
        pairs = [(a, b) for a, b in (share >= threshold).nonzero().tolist()]
    return [(a, b, float(words[a, b])) for a, b in pairs]


def _word_tokens(model: SentenceTransformer, texts: list[str], max_length: int, batch_size: int):
    """Per text: token states of its word-bearing tokens ``(n, dim)``, their word indices and the words' spans."""
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise OpticalInputError(f"{type(tokenizer).__name__}: word alignment needs a fast tokenizer (word_ids)")
    encoder = model[0].auto_model
    results = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        batch = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt",
                          return_offsets_mapping=True)
        offsets = batch.pop("offset_mapping")
        with torch.inference_mode():
            states = encoder(**{k: v.to(encoder.device) for k, v in batch.items()}).last_hidden_state.float().cpu()
        for k in range(len(chunk)):
            word_ids = batch.word_ids(k)
            keep = [i for i, word in enumerate(word_ids) if word is not None]
            words = sorted({word_ids[i] for i in keep})
            renumber = {word: n for n, word in enumerate(words)}
            spans = [[None, None] for _ in words]
            for i in keep:
                begin, end = offsets[k, i].tolist()
                span = spans[renumber[word_ids[i]]]
                span[0] = begin if span[0] is None else min(span[0], begin)
                span[1] = end if span[1] is None else max(span[1], end)
            results.append((states[k, keep], [renumber[word_ids[i]] for i in keep], [tuple(s) for s in spans]))
    return results


def align(
    source_model: SentenceTransformer,
    pairs: Sequence[tuple[str, str]],
    target_model: SentenceTransformer | None = None,
    *,
    options: SinkhornOptions = SinkhornOptions(reg=0.05, n_iters=1000),
    rule: str = "mutual-argmax",
    threshold: float = 0.5,
    max_length: int = 128,
    batch_size: int = 32,
) -> list[Alignment]:
    """Word alignments of ``(source, target)`` pairs from the OT plan between ``source_model``'s token states of each
    source and ``target_model``'s (default: the same model) of each target.

    A multilingual model on both sides aligns best; a student and an English-only teacher align only once the student
    is trained. Prompts are not applied. ``options``: the Sinkhorn solve (default relative ``reg`` 0.05: sharp plans).
    """
    target_model = target_model or source_model
    sources = _word_tokens(source_model, [s for s, _ in pairs], max_length, batch_size)
    targets = _word_tokens(target_model, [t for _, t in pairs], max_length, batch_size)
    alignments = []
    for (source, target), (s_states, s_words, s_spans), (t_states, t_words, t_spans) in zip(pairs, sources, targets):
        links: list[tuple[int, int, float]] = []
        if s_words and t_words:
            cost = 1 - F.normalize(s_states, dim=-1) @ F.normalize(t_states, dim=-1).T
            plan = sinkhorn(cost[None], options=options).plan[0]
            links = links_from_word_plan(word_plan(plan, s_words, t_words), rule, threshold)
        alignments.append(Alignment(source, target, s_spans, t_spans, links))
    return alignments


def _lexicon_words(text: str) -> list[tuple[int, int]]:
    """Whitespace-separated words of ``text`` with surrounding punctuation stripped, as character spans."""
    spans, position = [], 0
    for token in text.split():
        start = text.index(token, position)
        position = start + len(token)
        stripped = token.strip(".,;:!?\"'()[]«»“”‘’")
        if stripped:
            offset = token.index(stripped)
            spans.append((start + offset, start + offset + len(stripped)))
    return spans


def lexicon_alignments(pairs: Sequence[tuple[str, str]], lexicon: str | Path) -> list[Alignment]:
    """Word links from a lexicon instead of a plan: a UTF-8 file of ``source word<TAB>target word`` lines (case
    folded); a source and a target word of a pair are linked when the lexicon pairs them."""
    entries: set[tuple[str, str]] = set()
    for number, line in enumerate(Path(lexicon).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) != 2 or not all(column.strip() for column in columns):
            raise OpticalInputError(f"{lexicon}, line {number}: expected 'source word<TAB>target word'")
        entries.add((columns[0].strip().casefold(), columns[1].strip().casefold()))
    alignments = []
    for source, target in pairs:
        s_spans, t_spans = _lexicon_words(source), _lexicon_words(target)
        links = [(a, b, 1.0) for a, (sa, se) in enumerate(s_spans) for b, (ta, te) in enumerate(t_spans)
                 if (source[sa:se].casefold(), target[ta:te].casefold()) in entries]
        alignments.append(Alignment(source, target, s_spans, t_spans, links))
    return alignments


def code_switch(alignments: Iterable[Alignment], p: float, side: str = "target", seed: int = 0) -> list[str]:
    """One code-switched variant of each pair's ``side``: each linked word replaced by its partner with probability
    ``p`` (a word linked several times takes its heaviest link), deterministic by ``seed``."""
    if side not in ("source", "target"):
        raise OpticalInputError(f"side must be 'source' or 'target', got {side!r}")
    if not 0 <= p <= 1:
        raise OpticalInputError(f"p must be in [0, 1], got {p!r}")
    rng = random.Random(seed)
    variants = []
    for alignment in alignments:
        mine, theirs = (0, 1) if side == "source" else (1, 0)
        best: dict[int, tuple[float, int]] = {}
        for link in alignment.links:
            word, partner, weight = link[mine], link[theirs], link[2]
            if word not in best or weight > best[word][0]:
                best[word] = (weight, partner)
        text = alignment.source if side == "source" else alignment.target
        spans = alignment.source_spans if side == "source" else alignment.target_spans
        partner_words = alignment.words("target" if side == "source" else "source")
        chosen = [(word, partner) for word, (_, partner) in sorted(best.items()) if rng.random() < p]
        for word, partner in sorted(chosen, key=lambda item: spans[item[0]][0], reverse=True):  # right to left
            start, end = spans[word]
            text = text[:start] + partner_words[partner] + text[end:]
        variants.append(text)
    return variants


def identity_link_rate(alignments: Iterable[Alignment]) -> tuple[float, int]:
    """The share of words identical on both sides (a digit or a capital letter first, or punctuation; each string
    once per side) that the alignment links to their identical counterpart, and how many such words there were."""
    linked = total = 0
    for alignment in alignments:
        source_words, target_words = alignment.words("source"), alignment.words("target")
        links = {(a, b) for a, b, _ in alignment.links}
        for word in set(source_words) & set(target_words):
            if not (word[0].isdigit() or word[0].isupper() or not word[0].isalnum()):
                continue
            if source_words.count(word) != 1 or target_words.count(word) != 1:
                continue
            total += 1
            linked += (source_words.index(word), target_words.index(word)) in links
    return (linked / total if total else float("nan")), total


def save_alignments(path: str | Path, alignments: Iterable[Alignment]) -> None:
    """One JSON line per pair (sentences, word spans, links): what :func:`code_switch` needs, without the model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for alignment in alignments:
            out.write(json.dumps(asdict(alignment), ensure_ascii=False) + "\n")
    tmp.replace(path)


def load_alignments(path: str | Path) -> list[Alignment]:
    """The alignments :func:`save_alignments` wrote."""
    alignments = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            alignments.append(Alignment(row["source"], row["target"], [tuple(s) for s in row["source_spans"]],
                                        [tuple(s) for s in row["target_spans"]],
                                        [(int(a), int(b), float(w)) for a, b, w in row["links"]]))
        except (ValueError, KeyError, TypeError) as err:
            raise OpticalInputError(f"{path}, line {number}: not an alignment line ({err})") from err
    return alignments


def code_switched_bitext(
    bitext: datasets.Dataset, model: SentenceTransformer, options: CodeSwitchArguments, seed: int = 0,
) -> datasets.Dataset:
    """``bitext`` followed by one code-switched variant of each pair (``options.code_switch_side`` of it, words
    replaced with probability ``options.code_switch_p``) as a ``source`` paired with the pair's English ``target``.

    The links come from ``options.code_switch_alignments`` when that file exists (it must hold these pairs), else from
    ``options.code_switch_lexicon`` or the OT alignment of ``model`` on both sides (:func:`align`), and are then saved
    to ``options.code_switch_alignments`` when it is set.
    """
    pairs = list(zip(bitext["source"], bitext["target"]))
    stored = options.code_switch_alignments and Path(options.code_switch_alignments).is_file()
    if stored:
        alignments = load_alignments(options.code_switch_alignments)
        if [(a.source, a.target) for a in alignments] != pairs:
            raise OpticalInputError(f"--code_switch_alignments {options.code_switch_alignments}: its pairs are not "
                                    "this bitext's (another --bitext, --max_pairs or --seed?)")
    elif options.code_switch_lexicon:
        alignments = lexicon_alignments(pairs, options.code_switch_lexicon)
    else:
        alignments = align(model, pairs)
    if options.code_switch_alignments and not stored:
        save_alignments(options.code_switch_alignments, alignments)
    variants = code_switch(alignments, options.code_switch_p, options.code_switch_side, seed)
    linked = sum(bool(a.links) for a in alignments)
    logger.info("Code-switching: %d of %d pairs have word links (%.1f per pair), p %.2f on the %s side",
                linked, len(pairs), sum(len(a.links) for a in alignments) / max(len(pairs), 1),
                options.code_switch_p, options.code_switch_side)
    extra = datasets.Dataset.from_dict({"source": variants, "target": list(bitext["target"])})
    return datasets.concatenate_datasets([bitext.select_columns(["source", "target"]), extra.cast(
        bitext.select_columns(["source", "target"]).features)])
