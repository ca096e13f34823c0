"""Model cards for OPTICAL students, built on sentence-transformers' own card generator.

A student folder carries ``optical_hf.json`` (the serialized :class:`StudentCardInfo`) and a ``README.md`` rendered
from it and the saved model with :func:`render_model_card`: sentence-transformers' template and
``SentenceTransformerModelCardData`` (language, license, model name, base model, training dataset with the loss's
configuration, citations, architecture, framework versions) with the OPTICAL section (how to search: the teacher
encodes the documents, the student the queries; results) inserted before its "Usage" section. The OPTICAL section is
the Jinja template ``optical_hf/resources/model_card_template.md``; the usage snippet is OPTICAL's (student for
queries, teacher for documents), never sentence-transformers' generic one. ``model-index`` comes from
``StudentCardInfo.metrics`` through ``huggingface_hub.EvalResult``, so it follows the Hub schema.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from textwrap import indent
from typing import Any

from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import HFValidationError, validate_repo_id
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData

from .vocabulary import CITATION, EXPORTS, SCORINGS, check_choice


logger = logging.getLogger(__name__)

CARD_INFO_NAME = "optical_hf.json"
MODEL_CARD_NAME = "README.md"
TEMPLATE_PATH = Path(__file__).resolve().parent / "resources" / "model_card_template.md"
# Heading of sentence-transformers' template before which the OPTICAL section goes.
ST_USAGE_HEADING = "\n## Usage\n"
PLACEHOLDER_MODEL_ID = "path/to/optical-student"
PLACEHOLDER_TEACHER_ID = "path/to/english-teacher"
LOSS_NAME = "optical_hf.losses.OTDistillationLoss"
CARD_TAGS = (
    "sentence-transformers",
    "sentence-similarity",
    "feature-extraction",
    "dense",
    "optical",
    "cross-lingual-retrieval",
    "knowledge-distillation",
    "optimal-transport",
    "loss:OTDistillationLoss",
)
MAXSIM_TAGS = tuple("late-interaction" if tag == "dense" else tag for tag in CARD_TAGS)
"""A MaxSim student's tags: searched by late interaction, not by its dense embedding."""
MAXSIM_SIMILARITY = ("MaxSim (late interaction: the sum over the query's tokens of the best cosine with a document "
                     "token; `optical_hf.retrieve`); `model.similarity` is the cosine of sentence embeddings")
ADAPTER_TAGS = ("peft", "lora")

_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}$")
_REQUIRED_METRIC_KEYS = ("task_type", "dataset_name", "dataset_type", "metric_type", "value")
_OPTIONAL_METRIC_KEYS = ("metric_name", "split", "task_name", "dataset_config")


def is_hub_repo_id(value: str) -> bool:
    """Whether ``value`` is spelled like a Hub repo id (``name`` or ``namespace/name``).

    A check of the spelling only, the same in every working directory: whether a name was loaded from the Hub or from
    a local folder is decided where it was loaded (see ``StudentCardInfo.datasets``).
    """
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def read_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error names the file and line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: invalid JSON ({err.msg}).") from err


def base_model_license(name_or_path: str) -> str | None:
    """The ``license`` of a base model's card: ``README.md`` front matter of a local folder, else the Hub card (the
    local Hugging Face cache when offline); None when there is none or the card cannot be read."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        readme = local / MODEL_CARD_NAME
        metadata = metadata_load(readme) if readme.is_file() else None
    elif is_hub_repo_id(name_or_path):
        try:
            metadata = ModelCard.load(name_or_path).data.to_dict()
        except (OSError, EntryNotFoundError, HfHubHTTPError, ValueError) as err:
            logger.info("No license found for %s (its Hub card could not be read: %s)", name_or_path, err)
            return None
    else:
        return None
    license_ = (metadata or {}).get("license")
    return str(license_) if license_ else None


@dataclass
class StudentCardInfo:
    """Everything the model card of a trained OPTICAL student says; stored as ``optical_hf.json`` in the student folder.

    ``language`` (ISO 639 code of the queries), ``teacher`` (Hub id of the English teacher) and ``license`` may be
    None when unknown (a card written by :func:`optical_hf.save_student` without card info). ``datasets`` holds only
    Hub dataset ids the student was trained on, decided where the data was loaded (a local file never goes there;
    ``training_data`` describes the data in words). ``metrics`` holds one dict per measured value, with keys
    ``task_type``, ``dataset_name``, ``dataset_type``, ``metric_type``, ``value`` (required) and ``metric_name``,
    ``split``, ``task_name``, ``dataset_config`` (optional), e.g. ``{"task_type": "information-retrieval",
    "dataset_name": "CLIRMatrix sw-en", "dataset_type": "clirmatrix", "metric_type": "mrr@10", "metric_name": "MRR@10",
    "value": 0.51, "split": "dev"}``. Prompts (``""`` or None: none): ``query_prompt`` the student's (saved as its
    ``"query"`` prompt), ``teacher_prompt`` the teacher's on the English side of the training bitext,
    ``document_prompt`` the teacher's for documents (saved as the student's ``"document"`` prompt, for the pairing).
    """

    language: str | list[str] | None = None
    teacher: str | None = None
    base_model: str | None = None
    license: str | None = None
    datasets: list[str] = field(default_factory=list)
    train_pairs: int | None = None
    training_data: str = ""
    ot: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    query_prompt: str | None = None
    teacher_prompt: str | None = None
    document_prompt: str | None = None
    model_id: str | None = None
    scoring: str = "dense"
    export: str = "student"
    teacher_fingerprint: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.scoring, SCORINGS, "StudentCardInfo.scoring")
        check_choice(self.export, EXPORTS, "StudentCardInfo.export")
        if self.language is not None and not (self.languages and all(map(_LANGUAGE_CODE.match, self.languages))):
            raise ValueError(
                f"StudentCardInfo.language={self.language!r} is not an ISO 639-1/639-3 code or a non-empty list of "
                "them (2 or 3 lowercase letters, e.g. 'sw' or ['sw', 'ha'])."
            )
        if self.base_model is not None and not is_hub_repo_id(self.base_model):
            raise ValueError(
                f"StudentCardInfo.base_model={self.base_model!r} is not a Hub model id (it is a local path or "
                "malformed); card metadata needs the Hub id the student was initialised from, or None when unknown."
            )
        if self.model_id is not None and not is_hub_repo_id(self.model_id):
            raise ValueError(f"StudentCardInfo.model_id={self.model_id!r} is not a Hub repo id like 'org/name'.")
        for dataset in self.datasets:
            if not is_hub_repo_id(dataset):
                raise ValueError(
                    f"StudentCardInfo.datasets entry {dataset!r} is not a Hub dataset id; describe local data in "
                    "training_data instead."
                )
        for index, metric in enumerate(self.metrics):
            _metric_to_eval_result(metric, index)

    @property
    def languages(self) -> list[str]:
        """The student's language codes: ``[language]``, ``language`` when it learned several, ``[]`` when unknown."""
        if self.language is None:
            return []
        return [self.language] if isinstance(self.language, str) else list(self.language)

    def to_json(self) -> str:
        """The info as the JSON text stored in ``optical_hf.json``."""
        return json.dumps(asdict(self), indent=2, ensure_ascii=False, default=_json_scalar) + "\n"

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/optical_hf.json`` and return its path."""
        path = Path(folder) / CARD_INFO_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> StudentCardInfo:
        """Read ``folder/optical_hf.json``."""
        path = Path(folder) / CARD_INFO_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the folder holds no OPTICAL card info (optical_hf.save_student and "
                "OTDistillationTrainer.save_model write it; so does optical_hf.model_card.write_model_card(folder, info))."
            )
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown}; expected some of {sorted(known)}.")
        return cls(**data)


def render_model_card(info: StudentCardInfo, model: SentenceTransformer, *, adapter_only: bool = False,
                      name: str | None = None) -> ModelCard:
    """The README of a student: sentence-transformers' card for ``model`` with the OPTICAL section and usage snippet.

    ``model`` is the saved student (its architecture, dimensions and maximum length go into the card).
    ``adapter_only`` renders the card of a repository that holds only the LoRA adapter: it requires
    ``info.base_model`` and adds the ``peft``/``lora`` tags and an installation note.
    """
    if adapter_only and info.base_model is None:
        raise ValueError("An adapter-only card needs StudentCardInfo.base_model (the Hub id the adapter applies to).")
    model_id = info.model_id or PLACEHOLDER_MODEL_ID
    model_name = model_id.rsplit("/", 1)[-1] if info.model_id else (
        name or f"optical-student-{'-'.join(info.languages) or 'xx'}")
    card_data = _card_data(info, model, model_name, adapter_only)
    teacher = info.teacher or PLACEHOLDER_TEACHER_ID
    language = ", ".join(info.languages) or "low-resource-language"
    card = ModelCard.from_template(
        card_data,
        template_str=_template(info.scoring),
        hf_emoji="🤗",
        usage_snippet=_usage_snippet(model_id, teacher, language, info),
        optical_language=language,
        teacher=teacher,
        teacher_url=f"https://huggingface.co/{info.teacher}" if info.teacher and is_hub_repo_id(info.teacher) else None,
        adapter_only=adapter_only,
        query_prompt_literal=repr(info.query_prompt) if info.query_prompt else None,
        document_prompt_literal=repr(info.document_prompt) if info.document_prompt else None,
        training_data=info.training_data,
        train_pairs_text=f"{info.train_pairs:,}" if info.train_pairs is not None else None,
        metric_rows=[_metric_row(metric) for metric in info.metrics],
        maxsim_snippet=_maxsim_snippet(model_id, teacher, info) if info.scoring == "maxsim" else None,
    )
    if info.metrics:
        card.data.model_name = model_name
        card.data.eval_results = [_metric_to_eval_result(metric, index) for index, metric in enumerate(info.metrics)]
    if info.base_model is not None:
        card.data.base_model_relation = "adapter" if adapter_only else "finetune"
    return card


def write_model_card(folder: str | Path, info: StudentCardInfo, name: str | None = None) -> Path:
    """Write ``folder/README.md`` rendered from ``info`` and the student saved in ``folder``, and
    ``folder/optical_hf.json``; return the README path. ``name``: the card's title when ``info`` has no Hub id
    (default: the folder's name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"Cannot write a model card into {folder}: not a directory.")
    card = render_model_card(info, SentenceTransformer(str(folder), device="cpu", local_files_only=True),
                             name=name or folder.name)
    info.save(folder)
    path = folder / MODEL_CARD_NAME
    card.save(path)
    return path


def _card_data(
    info: StudentCardInfo, model: SentenceTransformer, model_name: str, adapter_only: bool
) -> SentenceTransformerModelCardData:
    """sentence-transformers' card data for the student, offline (nothing is looked up on the Hub)."""
    card_data = SentenceTransformerModelCardData(
        language=list(dict.fromkeys([*info.languages, "en"])) if info.languages else [],
        license=info.license,
        model_name=model_name,
        model_id=info.model_id,
        train_datasets=[_train_dataset(info)],
        task_name=f"cross-lingual retrieval: {', '.join(info.languages) or 'low-resource-language'} queries against English "
                  "documents encoded by the teacher",
        tags=[*(MAXSIM_TAGS if info.scoring == "maxsim" else CARD_TAGS), *(ADAPTER_TAGS if adapter_only else ())],
        local_files_only=True,
        generate_widget_examples=False,
    )
    card_data.register_model(model)
    card_data.base_model = info.base_model
    card_data.datasets = list(info.datasets)
    prompts = {"query_prompt": info.query_prompt, "teacher_prompt": info.teacher_prompt,
               "document_prompt": info.document_prompt}
    card_data.all_hyperparameters = {**info.training, **{key: value for key, value in prompts.items() if value}}
    card_data.citations = {"OPTICAL (OTDistillationLoss)": CITATION, **_sentence_transformers_citation()}
    return card_data


def _train_dataset(info: StudentCardInfo) -> dict[str, Any]:
    """The training-dataset entry of sentence-transformers' card, with the OT loss and its configuration."""
    hub_ids = list(info.datasets)
    dataset: dict[str, Any] = {
        "name": info.training_data or (", ".join(hub_ids) if hub_ids else f"{'-'.join(info.languages) or 'xx'}-en bitext"),
        "columns": ["<code>source</code> (student)", "<code>target</code> (teacher, English)"],
        "loss": {"fullname": LOSS_NAME},
    }
    if len(hub_ids) == 1:
        dataset["id"] = hub_ids[0]
    if info.train_pairs is not None:
        dataset["size"] = info.train_pairs
    if info.ot:
        config = json.dumps(info.ot, indent=4, default=_json_scalar)
        dataset["loss"]["config_code"] = indent(f"```json\n{config}\n```", "  ")
    return dataset


def _sentence_transformers_citation() -> dict[str, str]:
    """sentence-transformers' own citation, as its card data sets it."""
    card_data = SentenceTransformerModelCardData(local_files_only=True)
    card_data.set_losses([])
    return card_data.citations


def _template(scoring: str = "dense") -> str:
    """sentence-transformers' card template with the OPTICAL section inserted before its "Usage" section; for a
    MaxSim student, its "Similarity Function" says how the student is searched (:data:`MAXSIM_SIMILARITY`)."""
    st_template = SentenceTransformerModelCardData.template_path.read_text(encoding="utf-8")
    if scoring == "maxsim":
        st_template = st_template.replace("{{ similarity_fn_name }}", MAXSIM_SIMILARITY)
    section = TEMPLATE_PATH.read_text(encoding="utf-8")
    head, usage, tail = st_template.partition(ST_USAGE_HEADING)
    if not usage:
        raise RuntimeError(
            f"sentence-transformers' card template {SentenceTransformerModelCardData.template_path} has no "
            f"{ST_USAGE_HEADING.strip()!r} section to put the OPTICAL section before."
        )
    return f"{head}\n{section}{usage}{tail}"


def _usage_snippet(model_id: str, teacher: str, language: str, info: StudentCardInfo) -> str:
    """The OPTICAL usage code block: the student encodes the queries, the teacher the English documents (one model
    when the folder holds the pair)."""
    if info.export == "pair":
        lines = [
            "from sentence_transformers import SentenceTransformer",
            "",
            f'model = SentenceTransformer("{model_id}")  # {language} queries: the student; English documents: {teacher}',
            f'query_embeddings = model.encode_query(["<a query in {language}>"])',
            'document_embeddings = model.encode_document(["<an English document>", "<another English document>"])',
            "print(model.similarity(query_embeddings, document_embeddings))  # shape (n_queries, n_documents)",
        ]
        return "```python\n" + "\n".join(lines) + "\n```"
    query_prompt = f", prompt={info.query_prompt!r}" if info.query_prompt else ""
    document_prompt = f", prompt={info.document_prompt!r}" if info.document_prompt else ""
    lines = [
        "from sentence_transformers import SentenceTransformer",
        "",
        f'student = SentenceTransformer("{model_id}")  # encodes {language} queries',
        f'teacher = SentenceTransformer("{teacher}")  # encodes English documents',
        "",
        f'queries = ["<a query in {language}>"]',
        'documents = ["<an English document>", "<another English document>"]',
        "",
        f"query_embeddings = student.encode_query(queries{query_prompt})",
        f"document_embeddings = teacher.encode_document(documents{document_prompt})",
        "scores = teacher.similarity(query_embeddings, document_embeddings)  # shape (n_queries, n_documents)",
        "print(scores)",
    ]
    return "```python\n" + "\n".join(lines) + "\n```"


def _maxsim_snippet(model_id: str, teacher: str, info: StudentCardInfo) -> str:
    """The late-interaction code block: :func:`optical_hf.retrieve` with the student's query tokens against the
    teacher's document tokens (a pair folder holds both; a student-only folder names its teacher)."""
    pair = info.export == "pair"  # one model: encode_query is the student's, encode_document the teacher's
    query_prompt = "" if pair or not info.query_prompt else f", query_prompt={info.query_prompt!r}"
    document = "" if pair else (f', document_model=SentenceTransformer("{teacher}")'
                                + (f", document_prompt={info.document_prompt!r}" if info.document_prompt else ""))
    lines = [
        "from sentence_transformers import SentenceTransformer",
        "from optical_hf import retrieve",
        "",
        f'model = SentenceTransformer("{model_id}")'
        + ("  # encode_query: the student; encode_document: the teacher" if pair else "  # the student"),
        'queries, documents = ["<a query>"], ["<an English document>", "<another English document>"]',
        "# MaxSim: sum_i max_j cos(q_i, d_j) over content tokens (no special or prompt tokens); an index of many",
        "# documents: optical_hf.late_interaction.build_index(...), index.save(folder), load_search_index(folder)",
        f'hits = retrieve(model, queries, documents, top_k=10, scoring="maxsim"{query_prompt}{document})',
    ]
    return "```python\n" + "\n".join(lines) + "\n```"


def _metric_to_eval_result(metric: dict[str, Any], index: int) -> EvalResult:
    """Map one ``StudentCardInfo.metrics`` entry to a ``huggingface_hub.EvalResult``."""
    if not isinstance(metric, dict):
        raise ValueError(f"StudentCardInfo.metrics[{index}] must be a dict, got {type(metric).__name__}.")
    missing = [key for key in _REQUIRED_METRIC_KEYS if metric.get(key) is None]
    unknown = sorted(set(metric) - set(_REQUIRED_METRIC_KEYS) - set(_OPTIONAL_METRIC_KEYS))
    if missing or unknown:
        raise ValueError(
            f"StudentCardInfo.metrics[{index}] = {metric!r}: missing key(s) {missing}, unknown key(s) {unknown}; "
            f"required {list(_REQUIRED_METRIC_KEYS)}, optional {list(_OPTIONAL_METRIC_KEYS)}."
        )
    return EvalResult(
        task_type=metric["task_type"],
        dataset_type=metric["dataset_type"],
        dataset_name=metric["dataset_name"],
        metric_type=metric["metric_type"],
        metric_value=metric["value"],
        metric_name=metric.get("metric_name"),
        task_name=metric.get("task_name"),
        dataset_config=metric.get("dataset_config"),
        dataset_split=metric.get("split"),
    )


def _metric_row(metric: dict[str, Any]) -> dict[str, str]:
    """One row of the card's results table."""
    value = metric["value"]
    return {
        "dataset": _cell(metric["dataset_name"]),
        "split": _cell(metric.get("split") or ""),
        "metric": _cell(metric.get("metric_name") or metric["metric_type"]),
        "value": f"{value:.4f}" if isinstance(value, float) else _cell(value),
    }


def _cell(value: Any) -> str:
    """A value made safe for a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _json_scalar(value: Any) -> Any:
    """JSON fallback for numpy/torch scalars (anything with ``.item()``); other objects are rejected by name."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"Cannot store {value!r} ({type(value).__name__}) in {CARD_INFO_NAME}: use plain JSON values.")
