"""``GaLoreAdamW``: GaLore inside the optimizer, for plain PyTorch and DeepSpeed ZeRO stage 0, kept
with the tests as the reference the ``galore`` method is checked against (it shares the
project's projector, ``lowrank_pt.optim.projector``, and is itself checked against galore-torch).

It needs the real 2-D gradient of each matrix, which a ZeRO 1-3 optimizer never sees (it gets
flat partitions); under ZeRO use the ``galore`` method (the frozen-projector adapter) instead.

Param groups that carry a ``rank`` key are projected, with galore-torch's group keys
(``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) plus ``svd``, ``svd_niter``,
``svd_oversample``, ``moments_on_refresh`` and ``sign_rule``. By default the numerics follow
``torch.optim.AdamW`` (decoupled decay of the full weight before the update, eps added to the
bias-corrected ``sqrt(v)``), so this optimizer and the adapter method compute the same steps.

What differs from galore-torch 1.0's ``GaLoreAdamW``, and the options that reproduce it:

- Signs of the basis vectors: ours are canonical (``projector.canonical_signs``), galore-torch
  keeps LAPACK's, which flip under rounding-size changes of the gradient and, since moments are
  kept across a refresh, reverse the momentum along a flipped vector. ``sign_rule="lapack"``
  (group key) keeps LAPACK's signs; a run then follows galore-torch's only until rounding makes
  LAPACK flip a vector in one run and not the other (tests/reference/test_galore_reference.py).
- eps: galore-torch (like transformers' AdamW) adds eps to the uncorrected ``sqrt(v)`` and
  folds the bias correction into the step size, i.e. it divides by ``sqrt(v̂) + eps/sqrt(1-β2^t)``
  instead of ``sqrt(v̂) + eps``: a larger eps early on (31.6x at step 1 with β2 0.999), on every
  param it trains, projected or not. Both add eps in the low-rank space, before the update is
  projected back and scaled. ``eps_placement="uncorrected"`` (constructor default or group
  key) does what galore-torch does; ``"corrected"`` (default) what torch does.
- Weight decay: galore-torch decays the weight after the update (``p -= lr·wd·p_new``), torch
  before it (``p *= 1 - lr·wd``); a difference of order ``lr²·wd`` per step, not an option here.
"""

from __future__ import annotations

import math

import torch

from lowrank_pt.optim import projector

GROUP_DEFAULTS = dict(update_proj_gap=200, scale=0.25, proj_type="std", svd="exact", svd_niter=2,
                      svd_oversample=8, moments_on_refresh="keep", sign_rule="canonical")
EPS_PLACEMENTS = ("corrected", "uncorrected")


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW that runs Adam on GaLore-projected gradients for the matrices of groups with ``rank``.

    The state of a projected matrix holds ``exp_avg``/``exp_avg_sq`` of the low-rank shape and
    its ``basis`` tensor; counters are plain ints. ``refresh_failures`` lists, after each
    ``step()``, the refreshes that kept their old basis and why.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, eps_placement: str = "corrected"):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"GaLoreAdamW: bad lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      eps_placement=eps_placement))
        for group in self.param_groups:
            if group["eps_placement"] not in EPS_PLACEMENTS:
                raise ValueError(f"GaLoreAdamW: eps_placement={group['eps_placement']!r}: allowed "
                                 f"{list(EPS_PLACEMENTS)}")
            if "rank" in group:
                for key, value in GROUP_DEFAULTS.items():
                    group.setdefault(key, value)
                projector.projection_side((2, 1), group["proj_type"])  # validates the name
                if group["sign_rule"] not in projector.SIGN_RULES:
                    raise ValueError(f"GaLoreAdamW: sign_rule={group['sign_rule']!r}: allowed "
                                     f"{list(projector.SIGN_RULES)}")
        self.refresh_failures: list[str] = []

    def __setstate__(self, state):
        """Groups saved before a key existed (``load_state_dict`` goes through here) get its default."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("eps_placement", "corrected")
            if "rank" in group:
                for key, value in GROUP_DEFAULTS.items():
                    group.setdefault(key, value)

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
                if group["eps_placement"] == "corrected":  # sqrt(v̂) + eps
                    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
                else:  # (sqrt(v) + eps) / sqrt(1 - β2^t), the correction moved into the step size
                    denom = exp_avg_sq.sqrt().add_(group["eps"])
                    step_size *= math.sqrt(1 - beta2 ** step)
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
                                             seed=seed * 7919 + state["step"], sign_rule=group["sign_rule"])
            if basis is None:
                self.refresh_failures.append(f"param {tuple(grad.shape)} step {state['step']}: {why}")
            else:
                old = state["basis"]
                if group["moments_on_refresh"] == "reproject" and "exp_avg" in state and projector.is_set(old):
                    state["exp_avg"], state["exp_avg_sq"] = projector.reproject_moments(
                        state["exp_avg"], state["exp_avg_sq"], old, basis, side)
                state["basis"] = basis.to(grad.device)
        return projector.project(grad.float(), state["basis"], side).to(grad.dtype)
