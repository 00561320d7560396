"""Merge methods (a registry of plain per-chunk functions) and the streaming merge that applies them
(``plan`` decides, ``stream`` runs the passes chunk by chunk, ``write`` puts the result on disk).

>>> from layerwise.editing.merge import MERGE_METHODS
>>> sorted(MERGE_METHODS.names())  # doctest: +NORMALIZE_WHITESPACE
['average', 'breadcrumbs', 'consensus', 'dare', 'della', 'magnitude_prune', 'model_stock', 'slerp',
 'tall_masks', 'task_arithmetic', 'ties']
"""

from .registry import MERGE_METHODS, REQUIRED, MergeMethod, Param, register_merge_method

# Importing a method module registers it.
from . import average, consensus, dare, magnitude, task_arithmetic, ties  # noqa: E402,F401  isort: skip
from . import breadcrumbs, della, model_stock, slerp  # noqa: E402,F401  isort: skip
from .plan import DTYPE_CHOICES, LinesSpec, MergePlan, plan_merge  # noqa: E402
from .stream import MergeResult, uniform_draws  # noqa: E402
from .topk import TwoPassThreshold, kth_largest_abs, topk_count  # noqa: E402
from .write import execute_plan, merge_models  # noqa: E402

__all__ = [
    "MERGE_METHODS",
    "REQUIRED",
    "MergeMethod",
    "Param",
    "register_merge_method",
    "DTYPE_CHOICES",
    "LinesSpec",
    "MergePlan",
    "MergeResult",
    "execute_plan",
    "merge_models",
    "plan_merge",
    "uniform_draws",
    "TwoPassThreshold",
    "kth_largest_abs",
    "topk_count",
]
