"""optical_hf: OPTICAL optimal-transport distillation of an English retriever into low-resource-language students.

Huang, Yu & Allan, "Improving Cross-lingual Information Retrieval on Low-Resource Languages via Optimal Transport
Distillation", WSDM 2023 (arXiv 2301.12566).
"""

from .callbacks import NonFiniteLossCallback
from .data import BitextError, bitext_from_pairs, load_bitext
from .errors import NonFiniteLossError, OpticalInputError
from .export import add_lora, save_student
from .hub import HubPushError, push_student
from .losses import (
    CITATION,
    OTDistillationDataCollator,
    OTDistillationLoss,
    OTLossConfig,
    distillation_losses,
    pooling_weights,
)
from .model_card import StudentCardInfo
from .ot import DivergenceResult, OTResult, pairwise_cost, sinkhorn, sinkhorn_divergence
from .teacher_cache import TeacherCache, build_teacher_cache
from .trainer import BitextCollator, OTDistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "CITATION",
    "BitextCollator",
    "BitextError",
    "DivergenceResult",
    "HubPushError",
    "NonFiniteLossCallback",
    "NonFiniteLossError",
    "OTDistillationDataCollator",
    "OTDistillationLoss",
    "OTDistillationTrainer",
    "OTLossConfig",
    "OTResult",
    "OpticalInputError",
    "StudentCardInfo",
    "TeacherCache",
    "add_lora",
    "bitext_from_pairs",
    "build_teacher_cache",
    "distillation_losses",
    "load_bitext",
    "pairwise_cost",
    "pooling_weights",
    "push_student",
    "save_student",
    "sinkhorn",
    "sinkhorn_divergence",
]
