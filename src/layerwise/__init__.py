"""layerwise: how deep networks exploit the structure of data, and how to edit trained networks.

Subpackages: ``hierarchy`` (Random Hierarchy Model, exact BP, diffusion on hierarchical data), ``editing``
(checkpoints, task vectors, merging, LiNeS), ``decoding`` (M3ID), ``experiments`` (paper reproductions).
"""

__version__ = "0.1.0"
