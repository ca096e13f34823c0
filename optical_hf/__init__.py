"""optical_hf: OPTICAL optimal-transport distillation of an English retriever into low-resource-language students.

Huang, Yu & Allan, "Improving Cross-lingual Information Retrieval on Low-Resource Languages via Optimal Transport
Distillation", WSDM 2023 (arXiv 2301.12566).
"""

from .data import BitextError, bitext_from_pairs, load_bitext
from .export import save_student
from .losses import (
    CITATION,
    OTDistillationDataCollator,
    OTDistillationLoss,
    OTLossConfig,
    distillation_losses,
    pooling_weights,
)
from .ot import DivergenceResult, OTResult, pairwise_cost, sinkhorn, sinkhorn_divergence
from .trainer import BitextCollator, OTDistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "CITATION",
    "BitextCollator",
    "BitextError",
    "DivergenceResult",
    "OTDistillationDataCollator",
    "OTDistillationLoss",
    "OTDistillationTrainer",
    "OTLossConfig",
    "OTResult",
    "bitext_from_pairs",
    "distillation_losses",
    "load_bitext",
    "pairwise_cost",
    "pooling_weights",
    "save_student",
    "sinkhorn",
    "sinkhorn_divergence",
]
