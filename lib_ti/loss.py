"""The diffusion objective, the fixed validation batch and the DVAR flatness test."""

from __future__ import annotations

import statistics

import torch


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target_for(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               alphas: torch.Tensor) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"unknown prediction type '{prediction_type}'")


def snr_weight(t: torch.Tensor, alphas: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min-SNR-gamma (Hang et al. 2023), as kohya applies it: per-sample loss multiplier."""
    a = alphas[t]
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # fp32 regardless of autocast: the loss of a few vectors is small and fp16 rounding shows
    return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def flattened(values: list[float], window: int, threshold: float) -> bool:
    """DVAR (Voronov et al. 2023): the validation loss has flattened when the variance of its last
    `window` values is below `threshold` times the variance of all of them."""
    if len(values) <= window:
        return False
    total = statistics.pvariance(values)
    if total == 0:
        return True
    return statistics.pvariance(values[-window:]) / total < threshold
