"""``GaLoreAdamW``: GaLore inside the optimizer, for plain PyTorch and DeepSpeed ZeRO stage 0.

It needs the real 2-D gradient of each matrix, which a ZeRO 1-3 optimizer never sees (it gets
flat partitions); under ZeRO use the ``galore`` method (the frozen-projector adapter) instead.

Param groups that carry a ``rank`` key are projected, with galore-torch's group keys
(``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) plus ``svd``, ``svd_niter``,
``svd_oversample`` and ``moments_on_refresh``. Numerics follow ``torch.optim.AdamW``
(decoupled decay of the full weight before the update, eps added to the bias-corrected
``sqrt(v)``), so this optimizer and the adapter method compute the same steps. galore-torch adds
eps to the uncorrected ``sqrt(v)`` and decays after the update: the two agree to within
``eps/sqrt(v)`` relative per step when weight decay is 0.
"""

from __future__ import annotations

import math

import torch

from lowrank_pt.galore import projector

GROUP_DEFAULTS = dict(update_proj_gap=200, scale=0.25, proj_type="std", svd="exact", svd_niter=2,
                      svd_oversample=8, moments_on_refresh="keep")


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW that runs Adam on GaLore-projected gradients for the matrices of groups with ``rank``.

    The state of a projected matrix holds ``exp_avg``/``exp_avg_sq`` of the low-rank shape and
    its ``basis`` tensor; counters are plain ints. ``refresh_failures`` lists, after each
    ``step()``, the refreshes that kept their old basis and why.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"GaLoreAdamW: bad lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            if "rank" in group:
                for key, value in GROUP_DEFAULTS.items():
                    group.setdefault(key, value)
                projector.projection_side((2, 1), group["proj_type"])  # validates the name
        self.refresh_failures: list[str] = []

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.refresh_failures = []
        for group in self.param_groups:
            for p in group["params"] if "rank" in group else ():
                if p.ndim != 2:
                    raise ValueError(
                        f"GaLoreAdamW: a param group with 'rank' holds a {p.ndim}-D tensor of shape "
                        f"{tuple(p.shape)}; projection needs matrices. Under DeepSpeed ZeRO 1-3 the "
                        "optimizer sees flat 1-D partitions: use the 'galore' method there.")
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                grad = p.grad
                side = None
                if "rank" in group:
                    side = projector.projection_side(tuple(p.shape), group["proj_type"])
                    grad = self._project(group, state, grad, side, seed=gi * 1_000_003 + pi)
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                step = state["step"]

                # Same order of operations as torch.optim.AdamW (single-tensor path).
                p.mul_(1 - group["lr"] * group["weight_decay"])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"] / (1 - beta1 ** step)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
                if side is None:
                    p.addcdiv_(exp_avg, denom, value=-step_size)
                else:
                    direction = projector.project_back(exp_avg / denom, state["basis"], side)
                    p.add_(direction.to(p.dtype), alpha=-step_size * group["scale"])
        return loss

    def _project(self, group, state, grad, side, seed):
        """Refresh the basis at steps 0, T, 2T, ... (before this step's update), then project."""
        shape = tuple(grad.shape)
        rank = projector.effective_rank(shape, group["rank"])
        if "basis" not in state:
            state["basis"] = grad.new_zeros(projector.basis_shape(shape, rank, side), dtype=torch.float32)
        if state["step"] % group["update_proj_gap"] == 0:
            basis, why = projector.new_basis(grad, rank, side, group["svd"], previous=state["basis"],
                                             niter=group["svd_niter"], oversample=group["svd_oversample"],
                                             seed=seed * 7919 + state["step"])
            if basis is None:
                self.refresh_failures.append(f"param {tuple(grad.shape)} step {state['step']}: {why}")
            else:
                old = state["basis"]
                if group["moments_on_refresh"] == "reproject" and "exp_avg" in state and projector.is_set(old):
                    state["exp_avg"], state["exp_avg_sq"] = projector.reproject_moments(
                        state["exp_avg"], state["exp_avg_sq"], old, basis, side)
                state["basis"] = basis.to(grad.device)
        return projector.project(grad.float(), state["basis"], side).to(grad.dtype)
