"""Task arithmetic and merging: fine-tune one model on two tasks, add the task vectors, merge with TIES.

A linear model (random initialisation standing in for pre-training) is fine-tuned separately on two
regression tasks that use different inputs. The task vector of each fine-tune is ``theta_ft - theta_0``;
adding both to the pre-trained weights gives one model that does both tasks better than either fine-tune
alone. The same
checkpoints go through the streaming merge (TIES, with multi-task LiNeS). Run:
``python examples/task_arithmetic.py`` (``--tiny`` for the test size). Guide: docs/guides/merging.md.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from layerwise.editing import LinesSpec, TaskVector, merge_models


def _net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 1))   # key names "0.weight", "0.bias": block 0 for LiNeS


def _task(k: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Task k: inputs live on coordinates 4k..4k+3 only; the target is a fixed linear function of them."""
    x = torch.zeros(n, 8)
    x[:, 4 * k:4 * k + 4] = torch.randn(n, 4, generator=gen)
    w = torch.tensor([1.0, -2.0, 0.5, 1.5]) if k == 0 else torch.tensor([-1.0, 0.5, 2.0, -0.5])
    return x, (x[:, 4 * k:4 * k + 4] @ w).unsqueeze(1)


def _loss(state: dict, data) -> float:
    net = _net(0)
    net.load_state_dict(state)
    with torch.no_grad():
        return float(nn.functional.mse_loss(net(data[0]), data[1]))


def _finetune(state: dict, data, steps: int) -> dict:
    net = _net(0)
    net.load_state_dict(state)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(net(data[0]), data[1]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns each model's loss on the two tasks."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="smallest sizes (what the tests run)")
    args = parser.parse_args(argv)
    n, steps = (128, 50) if args.tiny else (1024, 200)
    gen = torch.Generator().manual_seed(0)
    tasks = [_task(0, n, gen), _task(1, n, gen)]

    theta0 = {k: v.detach().clone() for k, v in _net(0).state_dict().items()}
    fine = [_finetune(theta0, data, steps) for data in tasks]
    tau = [TaskVector(theta0, ft) for ft in fine]                # lazy: theta_ft - theta_0
    added = (tau[0] + tau[1]).apply_to(theta0)                   # task addition (coefficient 1)
    lines = LinesSpec(beta=0.5, pattern=r"^(\d+)\.")              # multi-task LiNeS; blocks by key prefix
    ties = merge_models("ties", fine, theta0, params={"density": 0.5}, lines=lines)   # in memory (out=None)

    models = {"pre-trained": theta0, "fine-tuned A": fine[0], "fine-tuned B": fine[1],
              "A + B (task arithmetic)": added, "TIES + LiNeS": ties.tensors}
    losses = {name: [_loss(state, data) for data in tasks] for name, state in models.items()}
    print(f"cosine(tau_A, tau_B) = {tau[0].dot(tau[1]) / (tau[0].norm() * tau[1].norm()):.3f}")
    print(f"{'model':<26}{'loss A':>9}{'loss B':>9}")
    for name, (la, lb) in losses.items():
        print(f"{name:<26}{la:>9.4f}{lb:>9.4f}")
    return {"losses": losses, "lines_alpha": ties.lines_alpha}


if __name__ == "__main__":
    main()
