"""Model card rendering for OPTICAL students: Hub metadata, body and the optical_hf.json round trip."""

from pathlib import Path

import pytest
import huggingface_hub.constants
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from conftest import sentence_transformer
from hub_server import online
from optical_hf import recipe
from optical_hf.export import save_student
from optical_hf.hub import push_student
from optical_hf.model_card import (
    CARD_INFO_NAME,
    PLACEHOLDER_MODEL_ID,
    TEMPLATE_PATH,
    StudentCardInfo,
    base_model_license,
    is_hub_repo_id,
    render_model_card,
    write_model_card,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
TEACHER = "sentence-transformers/all-MiniLM-L6-v2"
METRICS = [
    {
        "task_type": "information-retrieval",
        "dataset_name": "CLIRMatrix sw-en",
        "dataset_type": "clirmatrix",
        "metric_type": "mrr@10",
        "metric_name": "MRR@10",
        "value": 0.512345,
        "split": "dev",
    },
    {
        "task_type": "information-retrieval",
        "dataset_name": "CLIRMatrix sw-en",
        "dataset_type": "clirmatrix",
        "metric_type": "ndcg@10",
        "value": 0.6,
        "split": "dev",
    },
    {
        "task_type": "information-retrieval",
        "dataset_name": "Toy test",
        "dataset_type": "toy",
        "metric_type": "recall@100",
        "value": 0.91,
        "split": "test",
    },
]


@pytest.fixture(scope="module")
def model(model_dirs):
    return sentence_transformer(model_dirs["student"])


def make_info(**overrides) -> StudentCardInfo:
    values = dict(
        language="sw",
        teacher=TEACHER,
        base_model="FacebookAI/xlm-roberta-base",
        license="mit",
        datasets=["Helsinki-NLP/opus-100"],
        train_pairs=12345,
        training_data="Swahili-English sentence pairs from OPUS-100.",
        ot={"reg": 0.05, "n_iters": 50, "marginals": "uniform", "grad": "envelope", "sentence_weight": 1.0},
        training={"steps": 1000, "batch_size": 32, "lr": 2e-5, "lora": {"r": 8, "alpha": 16}},
        metrics=METRICS,
        query_prompt="query: ",
        model_id="org/optical-xlmr-sw",
    )
    values.update(overrides)
    return StudentCardInfo(**values)


def test_card_metadata_has_required_fields_and_exact_model_index(model):
    parsed = ModelCard(str(render_model_card(make_info(), model)))
    data = parsed.data.to_dict()

    assert data["base_model"] == "FacebookAI/xlm-roberta-base"
    assert data["language"] == ["sw", "en"]
    assert data["license"] == "mit"
    assert data["library_name"] == "sentence-transformers"
    assert data["datasets"] == ["Helsinki-NLP/opus-100"]
    for tag in ("optical", "cross-lingual-retrieval", "sentence-transformers", "knowledge-distillation"):
        assert tag in data["tags"]
    assert "lora" not in data["tags"]

    model_name, results = model_index_to_eval_results(data["model-index"])
    assert model_name == "optical-xlmr-sw"
    got = sorted((r.dataset_name, r.dataset_split, r.metric_type, r.metric_value) for r in results)
    want = sorted((m["dataset_name"], m["split"], m["metric_type"], m["value"]) for m in METRICS)
    assert got == want


def test_card_body_names_teacher_usage_ot_results_and_citation(model):
    text = ModelCard(str(render_model_card(make_info(), model))).text

    assert f'teacher = SentenceTransformer("{TEACHER}")' in text
    assert 'student = SentenceTransformer("org/optical-xlmr-sw")' in text
    assert "student.encode_query(queries, prompt='query: ')" in text
    assert "teacher.encode_document(documents)" in text
    assert "model.encode(" not in text  # sentence-transformers' generic snippet encodes both sides with the student
    assert text.index("## OPTICAL: how to search") < text.index("## Usage")
    assert "Loss: <code>optical_hf.losses.OTDistillationLoss</code>" in text
    assert '"reg": 0.05' in text and '"grad": "envelope"' in text
    assert "- `lora`: {'r': 8, 'alpha': 16}" in text
    assert "12,345 sentence pairs" in text
    assert "- **Base model:** [FacebookAI/xlm-roberta-base](https://huggingface.co/FacebookAI/xlm-roberta-base)" in text
    assert "- **License:** mit" in text
    assert "| CLIRMatrix sw-en | dev | MRR@10 | 0.5123 |" in text
    assert "@inproceedings{huang2023optical," in text
    assert "doi={10.1145/3539597.3570468}" in text


def test_card_without_metrics_or_repo_id(model):
    card = render_model_card(make_info(metrics=[], model_id=None, query_prompt=None), model)

    assert "model-index" not in card.data.to_dict()
    assert "No evaluation results were recorded" in card.text
    assert f'SentenceTransformer("{PLACEHOLDER_MODEL_ID}")' in card.text
    assert "student.encode_query(queries)" in card.text


def test_datasets_must_be_hub_ids(model):
    with pytest.raises(ValueError, match="'my private bitext' is not a Hub dataset id"):
        make_info(datasets=["my private bitext"])
    card = render_model_card(make_info(datasets=["Helsinki-NLP/opus-100"]), model)
    assert card.data.datasets == ["Helsinki-NLP/opus-100"]


def test_hub_dataset_decision_is_made_where_the_bitext_was_loaded(tmp_path, monkeypatch):
    (tmp_path / "train.sw").write_text("habari\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    decided = recipe._hub_dataset_id("train.sw", None)  # decided in the working directory of the load
    monkeypatch.chdir(tmp_path.parent)
    assert decided is None
    assert recipe._hub_dataset_id("Helsinki-NLP/opus-100", None) == "Helsinki-NLP/opus-100"
    assert recipe._hub_dataset_id("train.sw", "train.en") is None
    assert not is_hub_repo_id(str(tmp_path / "train.sw"))


def test_adapter_only_card_tags_and_requires_base_model(model):
    data = ModelCard(str(render_model_card(make_info(), model, adapter_only=True))).data.to_dict()
    assert {"peft", "lora"} <= set(data["tags"])
    assert data["base_model"] == "FacebookAI/xlm-roberta-base"
    assert data["base_model_relation"] == "adapter"

    with pytest.raises(ValueError, match="base_model"):
        render_model_card(make_info(base_model=None), model, adapter_only=True)


def test_card_yaml_validates_with_base_model_language_license_and_model_index(tmp_path, model, hub, monkeypatch):
    model.save(str(tmp_path), create_model_card=False)
    readme = write_model_card(tmp_path, make_info())
    card = ModelCard.load(readme)
    with online(monkeypatch, hub):
        card.validate(repo_type="model")
    assert len(hub.validated_readmes) == 1

    data = ModelCardData(**metadata_load(readme))
    assert (data.base_model, data.language, data.license) == ("FacebookAI/xlm-roberta-base", ["sw", "en"], "mit")
    assert data.model_name == "optical-xlmr-sw" and len(data.eval_results) == len(METRICS)
    assert data.library_name == "sentence-transformers" and data.pipeline_tag == "sentence-similarity"


def test_save_student_without_card_writes_a_pushable_optical_card(model, tmp_path, hub, monkeypatch):
    folder = save_student(model, tmp_path / "student", teacher=TEACHER)

    text = (folder / "README.md").read_text(encoding="utf-8")
    assert f'teacher = SentenceTransformer("{TEACHER}")' in text
    assert "student.encode_query(queries)" in text and "teacher.encode_document(documents)" in text
    assert "model.encode(" not in text and "## OPTICAL: how to search" in text
    assert StudentCardInfo.load(folder) == StudentCardInfo(teacher=TEACHER)
    with online(monkeypatch, hub):
        push_student(folder, "org/plain-student", endpoint=hub.endpoint)
    assert {"README.md", "optical_hf.json", "model.safetensors"} <= hub.uploaded_files("org/plain-student")


def test_base_model_license_comes_from_its_card(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "e5").mkdir()
    (tmp_path / "e5" / "README.md").write_text("---\nlicense: mit\nlanguage: [sw]\n---\n# e5\n", encoding="utf-8")
    (tmp_path / "no-card").mkdir()
    assert base_model_license(str(tmp_path / "e5")) == "mit"
    assert base_model_license(str(tmp_path / "no-card")) is None
    assert base_model_license("org/not-in-the-cache") is None  # offline and never downloaded


def test_write_model_card_and_info_round_trip(tmp_path, model):
    model.save(str(tmp_path), create_model_card=False)
    info = make_info()
    readme = write_model_card(tmp_path, info)

    assert StudentCardInfo.load(tmp_path) == info
    metadata = metadata_load(readme)
    assert metadata["model-index"] == render_model_card(info, model).data.to_dict()["model-index"]
    assert (tmp_path / CARD_INFO_NAME).is_file()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"language": "Swahili"}, "language"),
        ({"metrics": [{"task_type": "information-retrieval", "value": 0.5}]}, r"metrics\[0\]"),
        ({"model_id": "not a repo id"}, "model_id"),
    ],
)
def test_invalid_info_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_info(**overrides)


def test_local_path_base_model_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="base_model"):
        make_info(base_model=str(tmp_path))


def test_load_rejects_unknown_fields(tmp_path):
    (tmp_path / CARD_INFO_NAME).write_text('{"language": "sw", "teacher": "t", "colour": "red"}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"optical_hf\.json.*colour"):
        StudentCardInfo.load(tmp_path)


def test_packaged_template_is_the_model_cards_template():
    assert TEMPLATE_PATH.read_text(encoding="utf-8") == (REPO_ROOT / "model_cards" / "optical_student.md").read_text(
        encoding="utf-8"
    )


def test_a_maxsim_students_card_says_how_it_is_searched(model):
    dense = render_model_card(make_info(), model)
    maxsim = render_model_card(make_info(scoring="maxsim"), model)
    assert "dense" in dense.data.tags and "late-interaction" not in dense.data.tags
    assert "late-interaction" in maxsim.data.tags and "dense" not in maxsim.data.tags
    assert "**Similarity Function:** Cosine Similarity" in dense.text
    assert "**Similarity Function:** MaxSim (late interaction" in maxsim.text
    assert 'scoring="maxsim"' in maxsim.text and "retrieve(" not in dense.text
