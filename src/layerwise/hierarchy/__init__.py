"""The Random Hierarchy Model and everything that reasons about it."""

from .bp import BPResult, UpwardMessages, belief_propagation, sample_posterior, upward_pass
from .datafile import load_dataset, save_dataset
from .denoising import DenoiseResult, denoise, load_denoised, save_denoised
from .forward_backward import BPDenoiser, Denoiser, ForwardBackwardResult, LevelResult
from .noise import NOISE_PROCESSES, NoiseProcess, make_noise_process
from .rhm import RHM, RHMDataset, RHMSample, one_hot, sample_rules
from .theory import MeanField, critical_noise, level_curves, mean_field

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
    "DenoiseResult",
    "denoise",
    "save_denoised",
    "load_denoised",
    "MeanField",
    "mean_field",
    "critical_noise",
    "level_curves",
    "BPDenoiser", "Denoiser", "ForwardBackwardResult", "LevelResult",
]
