"""Weight-space editing: lazy checkpoints, task vectors, merge methods, LiNeS.

>>> from layerwise.editing import TaskVector, merge_models, apply_lines, open_checkpoint  # doctest: +SKIP

Submodules: ``checkpoints`` (readers and the sharded safetensors writer), ``task_vector``, ``merge``
(registry, methods, streaming driver), ``lines`` (block discovery and scaling), ``config`` (YAML merge
configs for ``layerwise merge``), ``linearize`` (tangent-space models), ``disentanglement``, ``evaluation``
(validation searches), ``finetune`` and ``workflow`` (``layerwise finetune``), ``clip`` (Hugging Face CLIP).
"""

from .checkpoints import (
    Checkpoint,
    ShardedSafetensorsWriter,
    check_compatible,
    load_state_dict,
    open_checkpoint,
    save_checkpoint,
)
from .disentanglement import disentanglement_error
from .finetune import FinetuneConfig, finetune
from .linearize import LinearizedModel
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
    "LinearizedModel",
    "disentanglement_error",
    "FinetuneConfig",
    "finetune",
]
