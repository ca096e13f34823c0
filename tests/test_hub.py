"""Pushing students to a loopback fake Hub (tests/hub_server.py): uploaded files, card, loadability, failures."""

import hashlib
import json
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from peft import LoraConfig, get_peft_model
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

from hub_server import FAKE_USER, FakeHub, online
from optical_hf.hub import HubPushError, push_student
from optical_hf.model_card import StudentCardInfo, write_model_card


REPO_ID = "org/optical-tiny-sw"
HUB_BASE_MODEL = "org/tiny-bert-base"
SENTENCES = ["habari ya asubuhi", "hello world", "the query and the document"]
METRICS = [
    {
        "task_type": "information-retrieval",
        "dataset_name": "Toy dev",
        "dataset_type": "toy",
        "metric_type": "mrr@10",
        "value": 0.4321,
        "split": "dev",
    },
    {
        "task_type": "information-retrieval",
        "dataset_name": "Toy dev",
        "dataset_type": "toy",
        "metric_type": "ndcg@10",
        "value": 0.5678,
        "split": "dev",
    },
]


@dataclass
class Student:
    folder: Path  # trained student: merged weights, adapter/, optical_hf.json, README.md, training leftovers
    base_dir: Path  # the model LoRA was applied to (stands in for HUB_BASE_MODEL)
    st_files: set[str]  # files written by SentenceTransformer.save


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """Tests run offline; `online` lifts this only around pushes to the loopback server."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Student:
    """A tiny random LoRA-trained student folder, laid out as training writes it."""
    root = tmp_path_factory.mktemp("student")
    words = "habari ya asubuhi hello world the query and document".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    torch.manual_seed(0)
    base_dir = root / "base"
    BertModel(config).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    peft_model = get_peft_model(BertModel.from_pretrained(base_dir), lora)
    peft_model.save_pretrained(root / "adapter")
    merged_dir = root / "merged"
    peft_model.merge_and_unload().save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)

    folder = root / "out"
    SentenceTransformer(modules=[Transformer(str(merged_dir)), Pooling(32, "mean")]).save(str(folder))
    st_files = files_in(folder)
    shutil.copytree(root / "adapter", folder / "adapter")
    info = StudentCardInfo(
        language="sw",
        teacher="sentence-transformers/all-MiniLM-L6-v2",
        train_pairs=3,
        training_data="Three toy Swahili-English pairs.",
        ot={"reg": 0.1, "n_iters": 20},
        training={"lora": {"r": 4, "alpha": 8}},
        metrics=METRICS,
    )
    write_model_card(folder, info)
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"stale checkpoint")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out.tfevents.1").write_bytes(b"tensorboard")
    (folder / "trainer_state.json").write_text("{}", encoding="utf-8")
    return Student(folder=folder, base_dir=base_dir, st_files=st_files)


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def hashes(folder: Path) -> dict[str, str]:
    return {path: hashlib.sha256((folder / path).read_bytes()).hexdigest() for path in files_in(folder)}


def embed(path: Path) -> np.ndarray:
    return SentenceTransformer(str(path)).encode(SENTENCES, convert_to_numpy=True)


def test_full_push_uploads_a_loadable_student(student, hub, monkeypatch):
    before = hashes(student.folder)
    with online(monkeypatch, hub):
        url = push_student(student.folder, REPO_ID, token="hf_test", endpoint=hub.endpoint)

    assert url.startswith(f"{hub.endpoint}/{REPO_ID}/commit/")
    assert hub.uploaded_files(REPO_ID) == student.st_files | {"optical_hf.json"}
    assert all(r.authorization == "Bearer hf_test" for r in hub.requests)
    assert hashes(student.folder) == before

    remote = hub.repo_dir(REPO_ID)
    card = ModelCard((remote / "README.md").read_text(encoding="utf-8"))
    assert card.data.library_name == "sentence-transformers"
    assert card.data.language == ["sw", "en"]
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert sorted((r.metric_type, r.metric_value) for r in results) == [("mrr@10", 0.4321), ("ndcg@10", 0.5678)]
    assert f'SentenceTransformer("{REPO_ID}")' in card.text
    assert json.loads((remote / "optical_hf.json").read_text(encoding="utf-8"))["model_id"] == REPO_ID

    local_embeddings = embed(student.folder)
    np.testing.assert_allclose(embed(remote), local_embeddings, atol=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(remote)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(remote)(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean_pooled = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    np.testing.assert_allclose(mean_pooled, local_embeddings, atol=1e-5)


def test_adapter_only_push_uploads_adapter_with_hub_base_model(student, hub, monkeypatch, tmp_path):
    before = hashes(student.folder)
    with online(monkeypatch, hub):
        push_student(
            student.folder,
            REPO_ID,
            adapter_only=True,
            base_model=HUB_BASE_MODEL,
            endpoint=hub.endpoint,
            revision="lora",
        )

    uploaded = hub.uploaded_files(REPO_ID, revision="lora")
    expected = (student.st_files - {"model.safetensors", "config.json"}) | {
        "optical_hf.json",
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert uploaded == expected
    assert hashes(student.folder) == before

    remote = hub.repo_dir(REPO_ID, revision="lora")
    adapter_config = json.loads((remote / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter_config["base_model_name_or_path"] == HUB_BASE_MODEL
    card = ModelCard((remote / "README.md").read_text(encoding="utf-8"))
    assert card.data.base_model == HUB_BASE_MODEL
    assert {"lora", "peft"} <= set(card.data.tags)

    # A downstream load resolves HUB_BASE_MODEL on the Hub; point it at the local base model instead.
    downloaded = tmp_path / "downloaded"
    shutil.copytree(remote, downloaded)
    adapter_config["base_model_name_or_path"] = str(student.base_dir)
    (downloaded / "adapter_config.json").write_text(json.dumps(adapter_config), encoding="utf-8")
    np.testing.assert_allclose(embed(downloaded), embed(student.folder), atol=1e-5)


@pytest.mark.parametrize("base_model", ["local-base-dir", "./models/base", None])
def test_adapter_only_push_rejects_local_or_missing_base_model(student, hub, monkeypatch, base_model):
    if base_model == "local-base-dir":
        base_model = str(student.base_dir)
    with online(monkeypatch, hub), pytest.raises(ValueError, match="base_model"):
        push_student(student.folder, REPO_ID, adapter_only=True, base_model=base_model, endpoint=hub.endpoint)
    assert hub.requests == []


@pytest.mark.parametrize("adapter_only", [False, True])
def test_failed_commit_keeps_folder_and_says_how_to_retry(student, hub, monkeypatch, adapter_only):
    hub.fail_commit = True
    before = hashes(student.folder)
    base_model = HUB_BASE_MODEL if adapter_only else None
    with online(monkeypatch, hub), pytest.raises(HubPushError) as failure:
        push_student(student.folder, REPO_ID, adapter_only=adapter_only, base_model=base_model, endpoint=hub.endpoint)

    message = str(failure.value)
    retry = f"optical-hf push {student.folder} --repo_id {REPO_ID}"
    if adapter_only:
        retry += f" --adapter_only --base_model {HUB_BASE_MODEL}"
    retry += f" --endpoint {hub.endpoint}"
    assert retry in message
    assert f"The local folder {student.folder} is intact" in message
    assert failure.value.retry_command == retry
    assert hashes(student.folder) == before
    assert hub.uploaded_files(REPO_ID) == set()


def test_push_in_offline_mode_fails_before_any_request(student, hub):
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE"):
        push_student(student.folder, REPO_ID, endpoint=hub.endpoint)
    assert hub.requests == []


def test_fake_hub_records_unknown_endpoints(tmp_path):
    with FakeHub(tmp_path / "hub") as server:
        with pytest.raises(urllib.error.HTTPError) as failure:
            no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            no_proxy.open(f"{server.endpoint}/api/models/{REPO_ID}", timeout=5)
    assert failure.value.code == 404
    assert [(r.method, r.path) for r in server.unknown_requests] == [("GET", f"/api/models/{REPO_ID}")]


def test_retry_command_after_a_failed_private_push_keeps_it_private(student, hub, monkeypatch):
    hub.fail_commit = True
    with online(monkeypatch, hub), pytest.raises(HubPushError) as failure:
        push_student(student.folder, REPO_ID, private=True, endpoint=hub.endpoint)
    assert failure.value.retry_command == (
        f"optical-hf push {student.folder} --repo_id {REPO_ID} --private --endpoint {hub.endpoint}")


def test_symlinks_to_files_outside_the_folder_are_not_uploaded(student, hub, monkeypatch, tmp_path, caplog):
    folder = tmp_path / "student"
    shutil.copytree(student.folder, folder)
    secret = tmp_path / "secrets.txt"
    secret.write_text("HF_TOKEN=hf_private", encoding="utf-8")
    (folder / "notes.txt").symlink_to(secret)
    (folder / "modules-link.json").symlink_to(folder / "modules.json")  # inside the folder: uploaded
    with online(monkeypatch, hub):
        push_student(folder, REPO_ID, endpoint=hub.endpoint)
    assert hub.uploaded_files(REPO_ID) == student.st_files | {"optical_hf.json", "modules-link.json"}
    assert f"Not uploading {folder / 'notes.txt'}: it is a symlink to {secret}" in caplog.text


@pytest.mark.parametrize("damage", ["weights-link", "weights-missing", "config-missing"])
def test_a_folder_that_would_not_load_is_refused_naming_the_file(damage, student, hub, monkeypatch, tmp_path):
    folder = tmp_path / "student"
    shutil.copytree(student.folder, folder)
    name = "config.json" if damage == "config-missing" else "model.safetensors"
    if damage == "weights-link":
        outside = tmp_path / "weights.safetensors"
        (folder / name).rename(outside)
        (folder / name).symlink_to(outside)
        expected = f"{folder / name} is a symlink to {outside}, outside {folder}: the pushed repo would lack it"
    else:
        (folder / name).unlink()
        expected = f"{folder / name} is missing: the pushed repo would not load"
    with online(monkeypatch, hub), pytest.raises(ValueError, match=re.escape(expected)):
        push_student(folder, REPO_ID, endpoint=hub.endpoint)
    assert hub.uploaded_files(REPO_ID) == set()
    assert not hub.repo_dir(REPO_ID).exists()  # refused before the repo was created


def test_second_push_deletes_files_the_first_left(student, hub, monkeypatch, tmp_path):
    folder = tmp_path / "student"
    shutil.copytree(student.folder, folder)
    (folder / "notes.json").write_text("{}", encoding="utf-8")
    with online(monkeypatch, hub):
        push_student(folder, REPO_ID, endpoint=hub.endpoint)
        assert "notes.json" in hub.uploaded_files(REPO_ID)
        (folder / "notes.json").unlink()
        push_student(folder, REPO_ID, adapter_only=True, base_model=HUB_BASE_MODEL, endpoint=hub.endpoint)

    uploaded = hub.uploaded_files(REPO_ID)
    assert "notes.json" not in uploaded
    assert {"model.safetensors", "config.json"}.isdisjoint(uploaded)  # no merged weights beside the adapter
    assert "adapter_config.json" in uploaded
    assert hub.commits[-1]["deleted"] == ["config.json", "model.safetensors", "notes.json"]


def test_bare_repo_name_goes_to_the_token_user(student, hub, monkeypatch):
    with online(monkeypatch, hub):
        url = push_student(student.folder, "optical-tiny-sw", token="hf_test", endpoint=hub.endpoint)
    assert url.startswith(f"{hub.endpoint}/{FAKE_USER}/optical-tiny-sw/commit/")
    card = ModelCard((hub.repo_dir(f"{FAKE_USER}/optical-tiny-sw") / "README.md").read_text(encoding="utf-8"))
    assert f'SentenceTransformer("{FAKE_USER}/optical-tiny-sw")' in card.text
