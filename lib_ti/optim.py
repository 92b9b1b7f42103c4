"""Optimizers for the few trainable vectors."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import torch

from lib_ti.config import TrainConfig


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum. Small enough to keep here
    instead of adding a dependency for a few thousand parameters."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


def make_optimizer(cfg: TrainConfig, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    name = cfg.optimizer_name()
    kw = cfg.optimizer_kwargs()
    if name == "AdamW":
        kw.setdefault("weight_decay", 0.0)  # A1111 trains TI without decay; AdamW's default 1e-2 shrinks vectors
        return torch.optim.AdamW(params, lr=lr, **kw)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, **kw)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, **kw)
    if name == "SGDNesterov":
        kw.setdefault("momentum", 0.9)
        return torch.optim.SGD(params, lr=lr, nesterov=True, **kw)
    if name == "Lion":
        return Lion(params, lr=lr, **kw)
    module, cls = {"Prodigy": ("prodigyopt", "Prodigy"), "DAdaptAdam": ("dadaptation", "DAdaptAdam")}[name]
    try:
        opt_cls = getattr(importlib.import_module(module), cls)
    except ImportError:
        raise ValueError(f"optimizer_type {name} needs the '{module}' package, which is not installed") from None
    return opt_cls(params, lr=lr, **kw)
