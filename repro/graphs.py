"""The CIFAR training step as one CUDA graph (`run.cuda_graphs`), a speed switch beside the recipe.

At CIFAR sizes a step is bound by kernel launches (about 470 for ResNet-56 at batch 128), not by
arithmetic: replaying forward, loss, backward, the SGD update and the metric sums as one graph
removes the launch cost. The first steps run eagerly (they create the momentum buffers and let
cuDNN pick its kernels); the next call captures the step and every call replays it.

The SGD update inside the graph is the same arithmetic as torch.optim.SGD's (weight decay added to
the gradient, `buf = momentum * buf + grad`, `param -= lr * buf`), on the optimizer's own momentum
buffers, so checkpoints are unchanged; only the learning rate is read from a device tensor, so that
a schedule change needs no new capture.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

EAGER_STEPS = 3  # before capture: momentum buffers exist, cuDNN has chosen its algorithms


class GraphedTrainStep:
    """Called like the eager step: `step(x, y, lr) -> [summed loss, wrong]` on the device."""

    def __init__(self, network: nn.Module, optimizer: torch.optim.SGD, autocast, eager_step: Callable,
                 eager_steps: int = EAGER_STEPS):
        (group,) = optimizer.param_groups
        if group["nesterov"] or group["dampening"]:
            raise ValueError("the graphed SGD update implements plain momentum SGD only (the paper's)")
        self.network, self.optimizer, self.autocast, self.group = network, optimizer, autocast, group
        self.eager_step = eager_step  # the engine's step(x, y, lr): sets the rate, returns the sums
        self.eager_steps = eager_steps
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stream = torch.cuda.Stream()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        if self.graph is None and self.calls < self.eager_steps:
            self.calls += 1
            # eager steps before a capture run on a side stream, as torch.cuda.graphs requires
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                stats = self.eager_step(x, y, lr)
            torch.cuda.current_stream().wait_stream(self.stream)
            return stats
        if self.graph is None:
            self._capture(x, y)
        if x.shape != self.static_x.shape or y.shape != self.static_y.shape:
            # copy_ would broadcast a smaller batch into the captured one without a word
            raise ValueError(f"the CUDA graph was captured for batches of {tuple(self.static_x.shape)} images and "
                             f"{tuple(self.static_y.shape)} labels; got {tuple(x.shape)} and {tuple(y.shape)}")
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.lr.fill_(lr)
        self.graph.replay()
        return self.static_stats

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static_x, self.static_y = x.clone(), y.clone()
        self.lr = torch.zeros((), device=x.device)
        params = [p for p in self.group["params"] if p.requires_grad]
        buffers = [self.optimizer.state[p]["momentum_buffer"] for p in params]
        momentum, weight_decay = self.group["momentum"], self.group["weight_decay"]
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            with self.autocast:
                logits = self.network(self.static_x)
            loss = nn.functional.cross_entropy(logits.float(), self.static_y)
            loss.backward()
            grads = [p.grad for p in params]
            with torch.no_grad():
                torch._foreach_add_(grads, params, alpha=weight_decay)
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, grads)
                torch._foreach_sub_(params, torch._foreach_mul(buffers, self.lr))
            self.static_stats = torch.stack([loss.detach().double() * len(self.static_y),
                                             (logits.argmax(1) != self.static_y).sum().double()])
