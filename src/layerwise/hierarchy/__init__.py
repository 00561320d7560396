"""The Random Hierarchy Model and everything that reasons about it."""

from .rhm import RHM, RHMSample, one_hot, sample_rules

__all__ = ["RHM", "RHMSample", "one_hot", "sample_rules"]
