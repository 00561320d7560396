"""The Random Hierarchy Model and everything that reasons about it."""

from .bp import BPResult, UpwardMessages, belief_propagation, sample_posterior, upward_pass
from .datafile import load_dataset, save_dataset
from .forward_backward import BPDenoiser, Denoiser, ForwardBackwardResult, LevelResult
from .noise import NOISE_PROCESSES, NoiseProcess, make_noise_process
from .rhm import RHM, RHMDataset, RHMSample, one_hot, sample_rules

__all__ = [
    "RHM",
    "RHMSample",
    "RHMDataset",
    "load_dataset",
    "save_dataset",
    "one_hot",
    "sample_rules",
    "BPResult",
    "UpwardMessages",
    "belief_propagation",
    "sample_posterior",
    "upward_pass",
    "NOISE_PROCESSES",
    "NoiseProcess",
    "make_noise_process",
    "BPDenoiser", "Denoiser", "ForwardBackwardResult", "LevelResult",
]
