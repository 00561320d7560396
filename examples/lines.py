"""LiNeS: scale a fine-tune's update layer by layer, small in shallow blocks and full in the last one.

A residual MLP of 6 blocks is pre-trained on task A and fine-tuned on task B, which degrades task A
(forgetting). LiNeS keeps ``lambda_l = alpha + beta * l / (L - 1)`` of the update of block ``l`` (single
task: ``beta = 1 - alpha``): the deep blocks keep their task-specific change, the shallow ones are pulled
back towards the pre-trained weights. The script prints the per-block scales and compares the two tasks'
errors of the pre-trained, fine-tuned and LiNeS-edited models and of a uniform scaling of the update that
reaches the same task-B error. LiNeS helps when shallow layers hold general features the fine-tune should
not disturb; on this small residual MLP it does not beat uniform scaling (the paper's claim is tested by
``layerwise reproduce lines`` on a pre-trained toy ViT). Run: ``python examples/lines.py`` (``--tiny`` for
the test size). Guide: docs/guides/merging.md (LiNeS) and docs/guides/tangent-space.md (the experiment).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.func import functional_call

from layerwise.editing import TaskVector, apply_lines, discover_blocks, format_lines_table, lines_table


class ResidualMLP(nn.Module):
    """``x -> readout(x + sum of blocks)``; parameter names ``blocks.{i}.*`` (found by LiNeS)."""

    def __init__(self, dim: int = 16, depth: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(depth))
        self.readout = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.readout(x)


def _fit(model: nn.Module, data, steps: int) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(data[0]), data[1]).backward()
        opt.step()


def _mse(model: nn.Module, state: dict, data) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(functional_call(model, state, (data[0],)), data[1]))


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the LiNeS scales and each model's errors on both tasks."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="smallest sizes (what the tests run)")
    parser.add_argument("--alpha", type=float, default=0.2, help="LiNeS alpha (scale of the first block)")
    args = parser.parse_args(argv)
    n, steps = (256, 60) if args.tiny else (2048, 400)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, 16, generator=gen)
    task_a = (x[:n], torch.sin(x[:n, :4].sum(1, keepdim=True)))
    task_b = (x[n:], torch.cos(x[n:, 4:8].sum(1, keepdim=True)))

    torch.manual_seed(0)
    model = ResidualMLP()
    _fit(model, task_a, steps)                                   # "pre-training" on task A
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.readout.requires_grad_(False)                          # the papers fine-tune under a frozen head
    _fit(model, task_b, steps)                                   # fine-tuning on task B
    theta_ft = {k: v.detach().clone() for k, v in model.state_dict().items()}

    tau = TaskVector(theta0, theta_ft)
    edited = apply_lines(tau, alpha=args.alpha)                  # single task: beta = 1 - alpha
    layout = discover_blocks(tau.keys())
    print(format_lines_table(lines_table(layout, args.alpha, 1 - args.alpha)))
    scales = {k: float((edited[k] * tau[k]).sum() / (tau[k] * tau[k]).sum()) for k in tau.keys()
              if float(tau[k].abs().sum()) > 0}

    models = {"pre-trained": theta0, "fine-tuned": theta_ft, "LiNeS": edited.apply_to(theta0)}
    errors = {name: (_mse(model, s, task_a), _mse(model, s, task_b)) for name, s in models.items()}
    # uniform scaling of the whole update with the smallest coefficient reaching LiNeS's task-B error
    target_b = errors["LiNeS"][1]
    for c in torch.linspace(0, 1, 21).tolist():
        state = tau.apply_to(theta0, scale=c)
        if _mse(model, state, task_b) <= target_b:
            errors[f"uniform x{c:.2f}"] = (_mse(model, state, task_a), _mse(model, state, task_b))
            break
    print(f"{'model':<16}{'error A':>10}{'error B':>10}")
    for name, (ea, eb) in errors.items():
        print(f"{name:<16}{ea:>10.4f}{eb:>10.4f}")
    return {"scales": scales, "errors": errors, "num_blocks": layout.towers}


if __name__ == "__main__":
    main()
