"""Reproductions of the papers' experiments, one module per experiment, found by name in a registry.

>>> from layerwise.experiments import EXPERIMENTS, run_experiment
>>> sorted(EXPERIMENTS.names())            # doctest: +SKIP
>>> run_experiment("rhm-stats", "out/")    # doctest: +SKIP
"""

from ._base import EXPERIMENTS, SCALES, Experiment, run_experiment

# Importing a module registers its experiment; keep this list in the order the report shows them.
from . import rhm_stats  # noqa: E402,F401  isort: skip
from . import phase_transition  # noqa: E402,F401  isort: skip
from . import chunks  # noqa: E402,F401  isort: skip
from . import rhm_learning  # noqa: E402,F401  isort: skip
from . import locality  # noqa: E402,F401  isort: skip
from . import deep_kernels  # noqa: E402,F401  isort: skip
from . import diffeo_stability  # noqa: E402,F401  isort: skip
from . import task_arithmetic  # noqa: E402,F401  isort: skip
from . import lines  # noqa: E402,F401  isort: skip
from . import m3id  # noqa: E402,F401  isort: skip
from . import m3id_long  # noqa: E402,F401  isort: skip

__all__ = ["EXPERIMENTS", "SCALES", "Experiment", "run_experiment"]
