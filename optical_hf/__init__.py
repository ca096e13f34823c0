"""optical_hf: OPTICAL optimal-transport distillation of an English retriever into low-resource-language students.

Huang, Yu & Allan, "Improving Cross-lingual Information Retrieval on Low-Resource Languages via Optimal Transport
Distillation", WSDM 2023 (arXiv 2301.12566).
"""

from .callbacks import NonFiniteLossCallback
from .collation import BitextCollator, OTDistillationDataCollator, pooling_weights
from .config import OTDistillationConfig
from .data import BitextError, bitext_from_pairs, load_bitext
from .errors import NonFiniteLossError, OpticalInputError
from .export import add_lora, save_student
from .losses import CITATION, OTDistillationLoss, OTLossConfig, distillation_losses
from .ot import DivergenceResult, OTResult, pairwise_cost, sinkhorn, sinkhorn_divergence
from .teacher_cache import TeacherCache, build_teacher_cache
from .trainer import OTDistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "CITATION",
    "BitextCollator",
    "BitextError",
    "DivergenceResult",
    "NonFiniteLossCallback",
    "NonFiniteLossError",
    "OTDistillationConfig",
    "OTDistillationDataCollator",
    "OTDistillationLoss",
    "OTDistillationTrainer",
    "OTLossConfig",
    "OTResult",
    "OpticalInputError",
    "TeacherCache",
    "add_lora",
    "bitext_from_pairs",
    "build_teacher_cache",
    "distillation_losses",
    "load_bitext",
    "pairwise_cost",
    "pooling_weights",
    "save_student",
    "sinkhorn",
    "sinkhorn_divergence",
]
