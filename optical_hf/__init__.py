"""optical_hf: OPTICAL optimal-transport distillation of an English retriever into low-resource-language students.

Huang, Yu & Allan, "Improving Cross-lingual Information Retrieval on Low-Resource Languages via Optimal Transport
Distillation", WSDM 2023 (arXiv 2301.12566).

The public names below are imported from their submodules on first use (PEP 562), so that ``import optical_hf`` and
``optical-hf --help`` do not load torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> submodule that defines it.
_EXPORTS = {
    "build_search_index": "faiss_index",
    "build_index": "late_interaction",
    "load_search_index": "faiss_index",
    "QdrantIndex": "qdrant_index",
    "FaissMaxSimIndex": "faiss_index",
    "FaissDenseIndex": "faiss_index",
    "CITATION": "vocabulary",
    "AuxiliaryLoss": "auxiliary",
    "BitextError": "data",
    "BitextRetrievalEvaluator": "evaluation",
    "CLIREvaluator": "evaluation",
    "DivergenceResult": "ot",
    "AlphaSchedule": "hybrid",
    "HubPushError": "hub",
    "HybridBatchSampler": "hybrid",
    "MaxSimCLIREvaluator": "late_interaction",
    "NonFiniteLossCallback": "callbacks",
    "NonFiniteLossError": "errors",
    "OTDistillationConfig": "config",
    "OTDistillationDataCollator": "collation",
    "OTDistillationLoss": "losses",
    "OTDistillationTrainer": "trainer",
    "OTLossConfig": "options",
    "OTResult": "ot",
    "PairedTest": "significance",
    "Prompts": "vocabulary",
    "OpticalInputError": "errors",
    "SinkhornOptions": "options",
    "StudentCardInfo": "model_card",
    "TeacherCache": "teacher_cache",
    "TokenIndex": "late_interaction",
    "add_lora": "export",
    "bitext_from_pairs": "data",
    "build_teacher_cache": "teacher_cache",
    "check_index": "late_interaction",
    "code_switched_bitext": "code_switch",
    "distillation_losses": "losses",
    "load_bitext": "data",
    "load_bitexts": "data",
    "maxsim_retrieve": "late_interaction",
    "model_fingerprint": "fingerprint",
    "paired_test": "significance",
    "pairwise_cost": "ot",
    "per_query_metrics": "evaluation",
    "pooling_weights": "collation",
    "push_student": "hub",
    "retrieve": "retrieval",
    "save_student": "export",
    "sinkhorn": "ot",
    "sinkhorn_divergence": "ot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule defining the public ``name`` on first access and cache the value in this module."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
