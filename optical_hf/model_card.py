"""Model cards for OPTICAL students.

A trained student folder carries ``optical_hf.json`` (the serialized :class:`StudentCardInfo`) and a ``README.md``
rendered from it with :func:`render_model_card`. The card's YAML metadata is built with ``huggingface_hub``'s
``ModelCardData`` and ``EvalResult`` (so ``model-index`` follows the Hub schema) and its body comes from the Jinja
template ``model_cards/optical_student.md``, shipped inside the package as
``optical_hf/resources/model_card_template.md``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id


logger = logging.getLogger(__name__)

CARD_INFO_NAME = "optical_hf.json"
MODEL_CARD_NAME = "README.md"
TEMPLATE_PATH = Path(__file__).resolve().parent / "resources" / "model_card_template.md"
PLACEHOLDER_MODEL_ID = "path/to/optical-student"
LIBRARY_NAME = "sentence-transformers"
PIPELINE_TAG = "sentence-similarity"
CARD_TAGS = (
    "sentence-transformers",
    "sentence-similarity",
    "feature-extraction",
    "optical",
    "cross-lingual-retrieval",
    "knowledge-distillation",
    "optimal-transport",
)
ADAPTER_TAGS = ("peft", "lora")

_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}$")
_REQUIRED_METRIC_KEYS = ("task_type", "dataset_name", "dataset_type", "metric_type", "value")
_OPTIONAL_METRIC_KEYS = ("metric_name", "split", "task_name", "dataset_config")


def is_hub_repo_id(value: str) -> bool:
    """Whether ``value`` is a valid Hub repo id (``name`` or ``namespace/name``, model or dataset) and not an existing
    local path."""
    if Path(value).expanduser().exists():
        return False
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


@dataclass
class StudentCardInfo:
    """Everything the model card of a trained OPTICAL student says; stored as ``optical_hf.json`` in the student folder.

    ``metrics`` holds one dict per measured value, with keys ``task_type``, ``dataset_name``, ``dataset_type``,
    ``metric_type``, ``value`` (required) and ``metric_name``, ``split``, ``task_name``, ``dataset_config`` (optional),
    e.g. ``{"task_type": "information-retrieval", "dataset_name": "CLIRMatrix sw-en", "dataset_type": "clirmatrix",
    "metric_type": "mrr@10", "metric_name": "MRR@10", "value": 0.51, "split": "dev"}``.
    """

    language: str | list[str]
    teacher: str
    base_model: str | None = None
    license: str = "apache-2.0"
    datasets: list[str] = field(default_factory=list)
    train_pairs: int | None = None
    training_data: str = ""
    ot: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    query_prompt: str | None = None
    document_prompt: str | None = None
    model_id: str | None = None

    def __post_init__(self) -> None:
        if not self.languages or not all(_LANGUAGE_CODE.match(code) for code in self.languages):
            raise ValueError(
                f"StudentCardInfo.language={self.language!r} is not an ISO 639-1/639-3 code or a non-empty list "
                "of them (2 or 3 lowercase letters, e.g. 'sw' or ['sw', 'ha'])."
            )
        if self.base_model is not None and not is_hub_repo_id(self.base_model):
            raise ValueError(
                f"StudentCardInfo.base_model={self.base_model!r} is not a Hub model id (it is a local path or "
                "malformed); card metadata needs the Hub id the student was initialised from, or None when unknown."
            )
        if self.model_id is not None and not is_hub_repo_id(self.model_id):
            raise ValueError(f"StudentCardInfo.model_id={self.model_id!r} is not a Hub repo id like 'org/name'.")
        for index, metric in enumerate(self.metrics):
            _metric_to_eval_result(metric, index)

    @property
    def languages(self) -> list[str]:
        """The student's language codes: ``[language]``, or ``language`` when the student learned several."""
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
                f"{path} not found: the folder holds no OPTICAL card info (training writes it; "
                "optical_hf.model_card.write_model_card(folder, info) does too)."
            )
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown}; expected some of {sorted(known)}.")
        return cls(**data)


def render_model_card(info: StudentCardInfo, *, adapter_only: bool = False) -> ModelCard:
    """Render the README of a student: Hub metadata (``ModelCardData`` + ``model-index``) and the OPTICAL template body.

    Only the ``info.datasets`` entries that are Hub dataset ids go into the metadata; the body lists them all.
    ``adapter_only`` renders the card of a repository that holds only the LoRA adapter: it requires ``info.base_model``
    and adds the ``peft``/``lora`` tags and an installation note.
    """
    if adapter_only and info.base_model is None:
        raise ValueError("An adapter-only card needs StudentCardInfo.base_model (the Hub id the adapter applies to).")
    if not is_hub_repo_id(info.teacher):
        logger.warning(
            "Teacher %r is not a Hub model id: the card's usage snippet points at it as is, which readers of a "
            "published card cannot load.",
            info.teacher,
        )
    model_id = info.model_id or PLACEHOLDER_MODEL_ID
    model_name = model_id.rsplit("/", 1)[-1] if info.model_id else f"optical-student-{'-'.join(info.languages)}"
    eval_results = [_metric_to_eval_result(metric, index) for index, metric in enumerate(info.metrics)]
    extra_metadata: dict[str, Any] = {}
    if info.base_model is not None:
        extra_metadata["base_model_relation"] = "adapter" if adapter_only else "finetune"
    card_data = ModelCardData(
        base_model=info.base_model,
        datasets=[dataset for dataset in info.datasets if is_hub_repo_id(dataset)] or None,
        language=list(dict.fromkeys([*info.languages, "en"])),
        license=info.license,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=[*CARD_TAGS, *(ADAPTER_TAGS if adapter_only else ())],
        model_name=model_name,
        eval_results=eval_results or None,
        **extra_metadata,
    )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE_PATH.read_text(encoding="utf-8"),
        model_id=model_id,
        model_name=model_name,
        language=", ".join(info.languages),
        teacher=info.teacher,
        teacher_url=f"https://huggingface.co/{info.teacher}" if is_hub_repo_id(info.teacher) else None,
        base_model=info.base_model,
        adapter_only=adapter_only,
        query_prompt_literal=repr(info.query_prompt) if info.query_prompt else None,
        document_prompt_literal=repr(info.document_prompt) if info.document_prompt else None,
        training_data=info.training_data,
        train_pairs_text=f"{info.train_pairs:,}" if info.train_pairs is not None else None,
        datasets=list(info.datasets),
        ot_rows=_table_rows(info.ot),
        training_rows=_table_rows(info.training),
        metric_rows=[_metric_row(metric) for metric in info.metrics],
    )


def write_model_card(folder: str | Path, info: StudentCardInfo) -> Path:
    """Write ``folder/README.md`` rendered from ``info`` and ``folder/optical_hf.json``; return the README path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"Cannot write a model card into {folder}: not a directory.")
    card = render_model_card(info)
    info.save(folder)
    path = folder / MODEL_CARD_NAME
    card.save(path)
    return path


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


def _table_rows(values: dict[str, Any]) -> list[tuple[str, str]]:
    """``(key, formatted value)`` pairs for a two-column Markdown table; nested values are shown as compact JSON."""
    return [
        (key, _cell(json.dumps(value, default=_json_scalar) if isinstance(value, (dict, list, tuple)) else value))
        for key, value in values.items()
    ]


def _cell(value: Any) -> str:
    """A value made safe for a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _json_scalar(value: Any) -> Any:
    """JSON fallback for numpy/torch scalars (anything with ``.item()``); other objects are rejected by name."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"Cannot store {value!r} ({type(value).__name__}) in {CARD_INFO_NAME}: use plain JSON values.")
