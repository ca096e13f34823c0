"""Shared fixtures: tiny random models with their own tokenizers and a toy bitext, all built offline in seconds."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

WORDS = (
    "the cat dog eats sees a big small red house tree water runs sleeps under near bird fish green old "
    "man woman child school market road rain sun city river book reads writes buys sells"
).split()


def foreign(word: str) -> str:
    """A made-up 'low-resource language': a fixed, invertible respelling of each English word."""
    return "ki" + word[::-1] + "wa"


def toy_bitext(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (foreign, English) pairs of 3-8 word sentences."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        pairs.append((" ".join(foreign(w) for w in words), " ".join(words)))
    return pairs


def _tokenizer(kind: str, texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "wordpiece":  # BERT-like: [CLS] ... [SEP]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]",
        )
    tok = Tokenizer(models.BPE(unk_token="<unk>"))  # XLM-R-like: <s> ... </s>
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        cls_token="<s>", sep_token="</s>", mask_token="<mask>",
    )


def tiny_bert(folder: Path, tokenizer, hidden: int = 32, seed: int = 0, dropout: float = 0.1) -> Path:
    """Save a tiny random BertModel and its tokenizer to ``folder``."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread (and much faster on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def teacher_cache_in_tmp(monkeypatch, tmp_path):
    """Teacher caches (``$XDG_CACHE_HOME/optical_hf/teacher`` by default) go to the test's temporary folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="session")
def toy_pairs() -> list[tuple[str, str]]:
    return toy_bitext(96, seed=0)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, toy_pairs) -> dict[str, Path]:
    """Folders of tiny random models: ``student`` (BPE over the foreign side), ``teacher`` (WordPiece, English)."""
    root = tmp_path_factory.mktemp("models")
    every = toy_bitext(400, seed=1) + toy_pairs
    student_tok = _tokenizer("bpe", [s for s, _ in every] + [t for _, t in every])
    teacher_tok = _tokenizer("wordpiece", [t for _, t in every])
    return {
        "student": tiny_bert(root / "student", student_tok, seed=1),
        "teacher": tiny_bert(root / "teacher", teacher_tok, seed=2),
        "student_no_dropout": tiny_bert(root / "student_no_dropout", student_tok, seed=1, dropout=0.0),
    }


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A loopback fake Hub (tests/hub_server.py); fails the test if the client called an unimplemented endpoint."""
    import huggingface_hub.constants
    from hub_server import FakeHub

    # Without telemetry, huggingface_hub does not fetch its agent-harness registry (/api/agent-harnesses) on the first
    # request of a process that has no cached copy.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    with FakeHub(tmp_path / "hub") as server:
        yield server
    assert server.unknown_requests == [], "the client called endpoints the fake Hub does not implement"


@pytest.fixture
def bitext(toy_pairs):
    from optical_hf import bitext_from_pairs

    return bitext_from_pairs(toy_pairs)


def sentence_transformer(folder: Path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(folder))
    return SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")], device="cpu")


@pytest.fixture
def nan_loss_from_step(monkeypatch):
    """``nan_loss_from_step(k)``: the distillation loss of both front ends turns NaN at the k-th training step."""
    import torch

    import optical_hf.losses

    def install(step: int) -> None:
        real = optical_hf.losses.distillation_losses
        training_calls = []

        def losses(*args, **kwargs):
            components = real(*args, **kwargs)
            if torch.is_grad_enabled():  # a training step (evaluation runs without gradients)
                training_calls.append(None)
                if len(training_calls) >= step:
                    return {name: value * float("nan") for name, value in components.items()}
            return components

        monkeypatch.setattr(optical_hf.losses, "distillation_losses", losses)  # the one core of both front ends

    return install
