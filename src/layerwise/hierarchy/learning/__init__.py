"""Learning the RHM: hierarchical CNNs and baselines, a seeded trainer, synonymic sensitivity and the
correlation estimate of the sample complexity (Cagnetta et al., PRX 2024).

>>> from layerwise.hierarchy import RHM, one_hot
>>> from layerwise.hierarchy.learning import HierarchicalCNN, TrainConfig, train, evaluate
>>> rhm = RHM(v=8, n_c=8, m=2, s=2, L=3, seed=0)
>>> tr, te = rhm.train_test_split(64, 64, seed=0)
>>> net = HierarchicalCNN(rhm.v, rhm.n_c, rhm.s, rhm.L, width=32, seed=0)
>>> res = train(net, one_hot(tr.tokens, 8), tr.labels, TrainConfig(epochs=5), seed=0)
>>> sorted(evaluate(net, one_hot(te.tokens, 8), te.labels))
['error', 'loss']
"""

from .models import SCALINGS, FullyConnected, HierarchicalCNN, TransformerClassifier
from .sensitivity import (
    CorrelationEstimate,
    correlation_curve,
    correlation_sample_complexity,
    default_layers,
    layer_outputs,
    synonymic_sensitivity,
)
from .train import OPTIMIZERS, SCHEDULES, TrainConfig, TrainResult, evaluate, train

__all__ = [
    "SCALINGS",
    "HierarchicalCNN",
    "FullyConnected",
    "TransformerClassifier",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
    "default_layers",
    "layer_outputs",
    "synonymic_sensitivity",
    "CorrelationEstimate",
    "correlation_curve",
    "correlation_sample_complexity",
]
