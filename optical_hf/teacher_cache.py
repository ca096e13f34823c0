"""Teacher-output cache: run the frozen teacher once over the English side of the bitext, not at every step.

The teacher is frozen, so its outputs on a sentence are a pure function of (teacher weights and architecture,
tokenizer, text, prompt, max length). :func:`build_teacher_cache` encodes every distinct English sentence once and
stores, per sentence, its token ids, its token states ``(n_tokens, dim)`` and (sentence-transformers teachers) its
pooled ``sentence_embedding`` ``(dim,)``, in fp16. The collators
(:class:`optical_hf.OTDistillationDataCollator`, for both front ends) look the rows of a batch up by
their text and pad them; the losses then skip the teacher forward. The token ids are kept so the marginal masks
(special and prompt tokens, :func:`optical_hf.losses.content_mask`) are computed exactly as online.

Storage: one ``torch.save`` file ``<cache_dir>/<fingerprint>.pt`` holding the sorted distinct texts, the token
states of all sentences concatenated into one ``(total_tokens, dim)`` fp16 tensor with ``offsets`` ``(n + 1,)``
marking each sentence's slice, the token ids ``(total_tokens,)`` and the sentence embeddings ``(n, dim)``. It is
loaded with ``torch.load(mmap=True)``: a batch lookup is one gather from the memory-mapped tensor (pages are read on
demand and shared between DataLoader workers), with no per-float decoding as a ragged ``datasets`` column would need.
It is written to a temporary file and renamed, so concurrent processes (``torchrun``) never see a partial file.

The fingerprint (blake2b) covers every byte of every weight tensor (names, dtypes, shapes, values), the module tree
and model configs, the tokenizer, the front end's tokenization settings (prompt, max length) and the distinct
texts. Hashing the weights reads them once: about 0.1 s for a 22M-parameter fp32 model (all-MiniLM-L6-v2), about
1 s per GB of weights. Default folder: ``$XDG_CACHE_HOME/optical_hf/teacher`` (``~/.cache/optical_hf/teacher``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import OpticalInputError
from .fingerprint import fingerprint_tensors, hash_tensor

__all__ = [
    "DamagedCacheError",
    "TeacherCache",
    "build_teacher_cache",
    "default_cache_dir",
    "distinct_texts",
    "encode_teacher_outputs",
    "load_or_encode",
    "teacher_fingerprint",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: with a checksum of the tensors
_TENSORS = ("offsets", "input_ids", "token_embeddings", "sentence_embeddings")

Encoder = Callable[[list[str]], dict[str, Any]]
"""Runs the teacher on a batch of texts: ``input_ids`` and ``attention_mask`` ``(batch, m)``, ``token_embeddings``
``(batch, m, dim)``, optionally ``sentence_embedding`` ``(batch, dim)`` and ``prompt_length`` (int)."""


class DamagedCacheError(ValueError):
    """A teacher cache file that cannot be used as it is; :func:`load_or_encode` encodes it again."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/optical_hf/teacher``, by default ``~/.cache/optical_hf/teacher``."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "optical_hf" / "teacher"


class TeacherCache:
    """The teacher's outputs on a fixed set of texts, looked up by text.

    Args:
        texts: the ``n`` distinct texts, row order of the tensors.
        offsets: ``(n + 1,)`` int64; text ``i`` owns rows ``offsets[i]:offsets[i + 1]`` of the token tensors.
        input_ids: ``(total_tokens,)`` token ids of the (prompted, truncated) texts.
        token_embeddings: ``(total_tokens, dim)`` fp16 teacher token states.
        sentence_embeddings: ``(n, dim)`` fp16 pooled teacher embeddings, or ``None``.
        prompt: the prompt the texts were encoded with; lookups must use the same.
        max_length: the truncation length the texts were encoded with; lookups that pass one must use the same.
        prompt_length: the prompt's leading positions as the tokenizer reported them (``None``: no prompt).
        fingerprint: the key the cache is stored under (see :func:`teacher_fingerprint`).
    """

    def __init__(
        self,
        texts: list[str],
        offsets: Tensor,
        input_ids: Tensor,
        token_embeddings: Tensor,
        sentence_embeddings: Tensor | None,
        prompt: str | None,
        max_length: int | None,
        prompt_length: int | None,
        fingerprint: str,
    ) -> None:
        self.texts, self.offsets, self.input_ids = texts, offsets, input_ids
        self.token_embeddings, self.sentence_embeddings = token_embeddings, sentence_embeddings
        self.prompt, self.max_length, self.prompt_length = prompt or None, max_length, prompt_length
        self.fingerprint = fingerprint
        self._rows = {text: row for row, text in enumerate(texts)}
        self._warned_miss = False

    def __len__(self) -> int:
        return len(self.texts)

    def __contains__(self, text: str) -> bool:
        return text in self._rows

    def lookup(
        self, texts: list[str], prompt: str | None = None, max_length: int | None = None
    ) -> dict[str, Any] | None:
        """The cached teacher outputs of ``texts``, right-padded, or ``None`` if a text is not cached.

        ``prompt`` (and ``max_length`` when given) must be those the cache was built with. A miss is logged once:
        the caller then runs the teacher online for that batch.

        Returns:
            ``input_ids`` and ``attention_mask`` ``(batch, m)`` int64, ``token_embeddings`` ``(batch, m, dim)``
            fp16 (zeros on padding), plus ``sentence_embedding`` ``(batch, dim)`` fp16 and ``prompt_length`` when
            cached.
        """
        if (prompt or None) != self.prompt:
            raise ValueError(
                f"the teacher cache was built with prompt {self.prompt!r} but the batch uses prompt {prompt!r}: "
                "build the cache with the collator's prompt"
            )
        if max_length is not None and max_length != self.max_length:
            raise ValueError(
                f"the teacher cache was built with max_length {self.max_length} but the batch uses {max_length}"
            )
        rows = [self._rows.get(text) for text in texts]
        if None in rows:
            if not self._warned_miss:
                logger.warning("English text %r is not in the teacher cache: batches with uncached texts run the "
                               "teacher online (cache every dataset the trainer uses)", texts[rows.index(None)])
                self._warned_miss = True
            return None
        rows_t = torch.tensor(rows)
        starts, lengths = self.offsets[rows_t], self.offsets[rows_t + 1] - self.offsets[rows_t]
        positions = torch.arange(int(lengths.max()))
        mask = positions < lengths.unsqueeze(1)
        flat = (starts.unsqueeze(1) + positions)[mask]
        tokens = self.token_embeddings.new_zeros(*mask.shape, self.token_embeddings.shape[1])
        tokens[mask] = self.token_embeddings[flat]
        input_ids = torch.zeros(mask.shape, dtype=torch.long)
        input_ids[mask] = self.input_ids[flat].long()
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask.long(), "token_embeddings": tokens}
        if self.sentence_embeddings is not None:
            out["sentence_embedding"] = self.sentence_embeddings[rows_t]
        if self.prompt_length is not None:
            out["prompt_length"] = self.prompt_length
        return out

    def save(self, path: Path) -> None:
        """Write atomically to ``path`` (a per-process temporary file in the same folder, then renamed)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        state = {
            "format_version": FORMAT_VERSION, "texts": self.texts, "offsets": self.offsets,
            "input_ids": self.input_ids, "token_embeddings": self.token_embeddings,
            "sentence_embeddings": self.sentence_embeddings, "prompt": self.prompt,
            "max_length": self.max_length, "prompt_length": self.prompt_length, "fingerprint": self.fingerprint,
            "checksum": self.checksum(),
        }
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def checksum(self) -> str:
        """blake2b of the texts and every tensor: :meth:`load` recomputes it to detect a damaged file."""
        hasher = hashlib.blake2b(digest_size=16)
        for text in self.texts:
            hasher.update(text.encode() + b"\0")
        for name in _TENSORS:
            if (tensor := getattr(self, name)) is not None:
                hash_tensor(hasher, name, tensor)
        return hasher.hexdigest()

    @classmethod
    def load(cls, path: Path) -> TeacherCache:
        """Read a cache written by :meth:`save`, memory-mapped.

        Raises:
            DamagedCacheError: ``path`` is not a complete cache file of this format (truncated, overwritten, of an
                earlier version), or its content does not match its checksum (a damaged file).
        """
        try:
            state = torch.load(path, mmap=True, weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
            raise DamagedCacheError(f"{path}: not a complete teacher cache file ({' '.join(str(err).split())})") from err
        if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
            version = state.get("format_version") if isinstance(state, dict) else None
            raise DamagedCacheError(f"{path}: teacher cache format {version}, expected {FORMAT_VERSION}")
        try:
            cache = cls(
                state["texts"], state["offsets"], state["input_ids"], state["token_embeddings"],
                state["sentence_embeddings"], state["prompt"], state["max_length"], state["prompt_length"],
                state["fingerprint"],
            )
            expected = state["checksum"]
        except KeyError as err:
            raise DamagedCacheError(f"{path}: the teacher cache file lacks {err}") from err
        if cache.checksum() != expected:
            raise DamagedCacheError(f"{path}: the teacher cache does not match its checksum (the file is damaged)")
        return cache


def distinct_texts(texts: Iterable[str]) -> list[str]:
    """The distinct texts, sorted (the cache key does not depend on the order or repetition of the bitext)."""
    return sorted(set(texts))


def _model_description(model: nn.Module) -> str:
    """The module tree (layer types, sizes, eps, ...) and the configs of the transformers models inside."""
    configs = [
        {k: v for k, v in module.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        for module in model.modules() if isinstance(module, PreTrainedModel)
    ]
    return repr(model) + json.dumps(configs, sort_keys=True, default=str)


def _tokenizer_description(tokenizer: PreTrainedTokenizerBase) -> str:
    """Vocabulary, normalizer, pre-/post-processing; not the truncation/padding a previous call left set."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        vocab = json.dumps(state, sort_keys=True)
    else:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    settings = {"class": type(tokenizer).__name__, "padding_side": tokenizer.padding_side,
                "special": tokenizer.all_special_ids}
    return vocab + json.dumps(settings)


def teacher_fingerprint(
    teacher: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], **settings: Any
) -> str:
    """Key of the teacher's outputs on ``texts``: changes with any weight, the architecture, the tokenizer, a setting.

    Args:
        teacher: the frozen teacher; all bytes of its ``state_dict`` are hashed, but for the pooler head that
            sentence-transformers never uses (:func:`optical_hf.fingerprint.fingerprint_tensors`).
        tokenizer: the tokenizer the texts are encoded with.
        texts: the distinct texts (:func:`distinct_texts`).
        **settings: JSON-serialisable encoding settings, e.g. ``front_end``, ``prompt``, ``max_length``.

    Returns:
        32 hex digits (blake2b, 16-byte digest).
    """
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(json.dumps({"format_version": FORMAT_VERSION, **settings}, sort_keys=True).encode())
    hasher.update(_model_description(teacher).encode())
    hasher.update(_tokenizer_description(tokenizer).encode())
    for name, tensor in fingerprint_tensors(teacher):
        hash_tensor(hasher, name, tensor)
    for text in texts:
        hasher.update(text.encode() + b"\0")
    return hasher.hexdigest()


def _check_fp16(tokens: Tensor, where: str) -> Tensor:
    half = tokens.half()
    if not torch.isfinite(half).all():
        raise ValueError(f"teacher {where} overflow fp16 (|x| > 65504): train with the online teacher")
    return half


@torch.no_grad()
def encode_teacher_outputs(
    texts: list[str], encode: Encoder, prompt: str | None, max_length: int | None, fingerprint: str,
    batch_size: int = 64,
) -> TeacherCache:
    """Run ``encode`` over ``texts`` (longest first, ``batch_size`` at a time) and collect a :class:`TeacherCache`."""
    if not texts:
        raise ValueError("no texts to encode for the teacher cache (is the English column empty?)")
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    ids: list[Tensor | None] = [None] * len(texts)
    tokens: list[Tensor | None] = [None] * len(texts)
    pooled: list[Tensor | None] = [None] * len(texts)
    prompt_length = None
    for start in tqdm(range(0, len(texts), batch_size), desc="Caching teacher outputs", unit="batch"):
        batch = order[start : start + batch_size]
        out = encode([texts[i] for i in batch])
        real = out["attention_mask"].bool().cpu()
        token_states = _check_fp16(out["token_embeddings"].cpu(), "token embeddings")
        sentence = out.get("sentence_embedding")
        sentence = None if sentence is None else _check_fp16(sentence.cpu(), "sentence embeddings")
        prompt_length = out.get("prompt_length")
        for j, i in enumerate(batch):
            ids[i] = out["input_ids"][j].cpu()[real[j]].int()
            tokens[i] = token_states[j][real[j]]
            pooled[i] = None if sentence is None else sentence[j]
    lengths = torch.tensor([len(t) for t in ids], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return TeacherCache(
        texts, offsets, torch.cat(ids), torch.cat(tokens),
        None if pooled[0] is None else torch.stack(pooled), prompt, max_length, prompt_length, fingerprint,
    )


def load_or_encode(
    texts: list[str], encode: Encoder, prompt: str | None, max_length: int | None, fingerprint: str,
    cache_dir: str | Path | None = None, batch_size: int = 64,
) -> TeacherCache:
    """The cache stored under ``fingerprint`` in ``cache_dir``; encoded and saved first if absent.

    A damaged cache file (truncated, overwritten, not matching its checksum) is named in a warning, deleted and
    encoded again. A folder that cannot be written when the cache must be built is an
    :class:`~optical_hf.errors.OpticalInputError`, raised before the teacher runs.
    """
    folder = Path(cache_dir or default_cache_dir()).expanduser()
    path = folder / f"{fingerprint}.pt"
    if path.is_file():
        try:
            cache = TeacherCache.load(path)
        except DamagedCacheError as err:
            logger.warning("Discarding the damaged teacher cache %s and encoding it again: %s", path, err)
            path.unlink()
        else:
            logger.info("Teacher outputs of %d texts read from %s", len(texts), path)
            return cache
    _check_writable(folder)
    logger.info("Encoding %d distinct texts with the teacher once; cache: %s", len(texts), path)
    encode_teacher_outputs(texts, encode, prompt, max_length, fingerprint, batch_size).save(path)
    return TeacherCache.load(path)


def _check_writable(folder: Path) -> None:
    """Raise :class:`OpticalInputError` unless a file can be created in ``folder`` (created if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise OpticalInputError(
            f"teacher cache folder {folder} cannot be written ({err.strerror or err}): pass a writable folder with "
            "--teacher_cache_dir, or run the teacher at every step with --cache_teacher false"
        ) from err


def _sentence_transformer_encoder(teacher: SentenceTransformer, prompt: str | None) -> Encoder:
    """The online path of :class:`optical_hf.OTDistillationLoss`: ``teacher.preprocess`` then ``teacher(features)``."""

    def encode(texts: list[str]) -> dict[str, Any]:
        features = teacher.preprocess(texts, prompt=prompt)
        features = {k: v.to(teacher.device) if isinstance(v, Tensor) else v for k, v in features.items()}
        return teacher(features)

    return encode


def build_teacher_cache(
    teacher: SentenceTransformer,
    texts: Iterable[str],
    prompt: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
) -> TeacherCache:
    """Teacher outputs on ``texts`` for the sentence-transformers front end, computed once and stored on disk.

    Pass the result to ``OTDistillationDataCollator(..., teacher_cache=cache)``; ``prompt`` must be the prompt of
    the collator's English column and the teacher's ``max_seq_length`` the one used in training.

    Args:
        teacher: the frozen English SentenceTransformer.
        texts: the English side of every dataset the collator will see (train and eval); repeats are fine.
        prompt: prefix of the English column (e.g. ``"query: "``), or ``None``.
        cache_dir: folder of the cache files (default :func:`default_cache_dir`).
        batch_size: sentences per teacher forward while encoding.

    Example::

        cache = build_teacher_cache(teacher, list(train["target"]) + list(evaluation["target"]))
        collator = OTDistillationDataCollator(student.preprocess, teacher.preprocess, teacher_cache=cache)
    """
    texts, prompt, max_length = distinct_texts(texts), prompt or None, teacher.max_seq_length
    fingerprint = teacher_fingerprint(
        teacher, teacher.tokenizer, texts, front_end="sentence-transformers", prompt=prompt, max_length=max_length
    )
    teacher.eval()
    return load_or_encode(texts, _sentence_transformer_encoder(teacher, prompt), prompt, max_length, fingerprint,
                          cache_dir, batch_size)
