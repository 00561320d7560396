"""Weight-space editing: lazy checkpoints, task vectors, merge methods, LiNeS, LoRA, mergekit configs.

>>> from layerwise.editing import TaskVector, merge_models, apply_lines, open_checkpoint  # doctest: +SKIP

Submodules: ``checkpoints`` (readers and the sharded safetensors writer), ``task_vector``, ``merge``
(registry, methods, and the streaming merge: ``plan``, ``stream``, ``write``), ``lines`` (block discovery
and scaling), ``config`` (YAML merge configs for ``layerwise merge``), ``mergekit_config``, ``lora``,
``vocab``, ``model_card``. Tangent-space fine-tuning lives in :mod:`layerwise.tangent`, which builds on
this package (never the other way round).
"""

from .checkpoints import (
    Checkpoint,
    ShardedSafetensorsWriter,
    check_compatible,
    load_state_dict,
    open_checkpoint,
    save_checkpoint,
)
from .lines import (
    apply_lines,
    discover_blocks,
    format_lines_table,
    lines_scales,
    lines_table,
    multitask_alpha,
)
from .merge import (
    MERGE_METHODS,
    LinesSpec,
    Param,
    execute_plan,
    merge_models,
    plan_merge,
    register_merge_method,
)
from .task_vector import TaskVector

__all__ = [
    "Checkpoint",
    "ShardedSafetensorsWriter",
    "check_compatible",
    "load_state_dict",
    "open_checkpoint",
    "save_checkpoint",
    "apply_lines",
    "discover_blocks",
    "format_lines_table",
    "lines_scales",
    "lines_table",
    "multitask_alpha",
    "MERGE_METHODS",
    "LinesSpec",
    "Param",
    "execute_plan",
    "merge_models",
    "plan_merge",
    "register_merge_method",
    "TaskVector",
]
