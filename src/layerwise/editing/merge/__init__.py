"""Merge methods (a registry of plain per-chunk functions) and the streaming merge that applies them
(``plan`` decides, ``stream`` runs the passes chunk by chunk, ``write`` puts the result on disk).

>>> from layerwise.editing.merge import MERGE_METHODS
>>> sorted(MERGE_METHODS.names())  # doctest: +NORMALIZE_WHITESPACE
['average', 'breadcrumbs', 'consensus', 'dare', 'della', 'karcher', 'magnitude_prune', 'model_stock',
 'multislerp', 'nearswap', 'passthrough', 'sce', 'slerp', 'tall_masks', 'task_arithmetic', 'ties']
"""

from .registry import MERGE_METHODS, REQUIRED, MergeMethod, Param, register_merge_method

# Importing a method module registers it.
from . import average, consensus, dare, magnitude, task_arithmetic, ties  # noqa: E402,F401  isort: skip
from . import breadcrumbs, della, model_stock, slerp  # noqa: E402,F401  isort: skip
from . import karcher, multislerp, nearswap, passthrough, sce  # noqa: E402,F401  isort: skip
from .data_dependent import DATA_MERGE_METHODS, merge_with_statistics  # noqa: E402
from .plan import DTYPE_CHOICES, LinesSpec, MergePlan, plan_merge  # noqa: E402
from .slices import OutputSlice, SlicedPlan, SliceSource, plan_slices  # noqa: E402
from .statistics import (  # noqa: E402
    Statistics,
    collect_fisher,
    collect_regmean_stats,
    load_statistics,
    save_statistics,
)
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
    "OutputSlice",
    "SlicedPlan",
    "SliceSource",
    "plan_slices",
    "execute_plan",
    "merge_models",
    "plan_merge",
    "uniform_draws",
    "TwoPassThreshold",
    "kth_largest_abs",
    "topk_count",
    "DATA_MERGE_METHODS",
    "merge_with_statistics",
    "Statistics",
    "collect_fisher",
    "collect_regmean_stats",
    "load_statistics",
    "save_statistics",
]
