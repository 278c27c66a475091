"""Benchmark: GaLore (method, adapter route) vs full-rank AdamW vs galore-torch's GaLoreAdamW.

All three train the same LLaMA on the same batches through a DeepSpeed ZeRO-0 fp32 engine on one
rank, in round-robin passes (so load from other processes hits all three alike). Reported:
seconds per optimizer step (refresh steps excluded: they come every ``--gap`` steps), measured
optimizer-state bytes, the time of one refresh step over a plain one, exact vs randomized SVD
per refresh, and what a bf16 W0 loses of a merged update.

    python tools/bench_galore.py                       # hidden 384, 6 layers, vocab 8000, 8x256 tokens
    python tools/bench_galore.py --passes 2 --steps 2  # quicker
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--rank", type=int, default=96)
    p.add_argument("--gap", type=int, default=200)
    p.add_argument("--passes", type=int, default=6, help="round-robin passes over the three optimizers")
    p.add_argument("--steps", type=int, default=1, help="timed steps per optimizer per pass")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: stable on shared, busy cores; OpenMP spin-waits with more)")
    return p.parse_args()


def init_dist():
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    from lowrank_pt.core import dist

    os.environ.setdefault("MASTER_PORT", str(dist.free_port()))
    dist.init()


def make_model(args):
    from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
                      num_heads=args.heads, seq_len=args.seq)
    return LlamaModel(resolve(cfg, vocab_size=args.vocab))


def stage_config(lr=1e-3):
    from lowrank_pt.config.recipe import OptimizerConfig, ScheduleConfig, StageConfig

    return StageConfig(steps=10**6, optimizer=OptimizerConfig(lr=lr, weight_decay=0.0, grad_clip=0.0),
                       schedule=ScheduleConfig(kind="constant"))


class Runner:
    """One optimizer's engine and its step function."""

    def __init__(self, name, args, init_state):
        from lowrank_pt.config.recipe import EngineConfig
        from lowrank_pt.methods.base import StageContext
        from lowrank_pt.optim.adamw import build_optimizer
        from lowrank_pt.zero import engine as E

        self.name, self.args, self.step_index = name, args, 0
        model = make_model(args)
        model.load_state_dict(init_state)
        stage = stage_config()
        self.method = None
        if name == "galore (ours)":
            from lowrank_pt.methods.galore.method import GaLore, GaLoreOptions

            self.method = GaLore(GaLoreOptions(rank=args.rank, update_proj_gap=args.gap), stage, None)
            self.method.prepare_model(model)
            optimizer = build_optimizer(self.method.param_groups(model), stage.optimizer)
        elif name == "galore-torch":
            import galore_torch

            projected = [p for n, p in model.named_parameters() if n.endswith("_proj.weight")]
            ids = {id(p) for p in projected}
            groups = [{"params": [p for p in model.parameters() if id(p) not in ids]},
                      {"params": projected, "rank": args.rank, "update_proj_gap": args.gap, "scale": 0.25,
                       "proj_type": "std"}]
            optimizer = galore_torch.GaLoreAdamW(groups, lr=1e-3, no_deprecation_warning=True)
        else:
            optimizer = build_optimizer([{"params": list(model.parameters())}], stage.optimizer)
        ds = E.deepspeed_config(EngineConfig(zero_stage=0, precision="fp32"), args.batch, 1, 0.0, 1)
        self.engine = E.initialize(model, optimizer, lambda step: 1.0, ds)
        if self.method is not None:
            self.method.on_engine_ready(StageContext(engine=self.engine, total_steps=10**6))

    def step(self, batch) -> float:
        """One optimizer step; seconds."""
        start = time.perf_counter()
        if self.method is not None:
            self.method.train_step(self.engine, [batch], self.step_index)
            self.method.after_step(self.engine, self.step_index)
        else:
            loss = self.engine(batch["input_ids"], batch["labels"])
            self.engine.backward(loss)
            self.engine.step()
        self.step_index += 1
        return time.perf_counter() - start

    def state_bytes(self) -> int:
        """Bytes of optimizer state really held: the storages behind the moments (and
        galore-torch's projector matrices, which are views that keep a whole SVD factor alive;
        our bases are module buffers and are added), each storage counted once."""
        storages = {}

        def add(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

        for state in self.engine.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.numel() > 1:
                    add(value)
                projector = getattr(value, "ortho_matrix", None)
                if projector is not None:
                    add(projector)
        if self.method is not None:
            for adapter in self.method.adapters.values():
                add(adapter.galore_basis)
        return sum(storages.values())


def batch_for(args, i):
    g = torch.Generator().manual_seed(i)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def refresh_costs(args, runner):
    """Exact vs randomized (cold, and warm-started from the current basis) SVD of each captured
    gradient shape; and the extra time of a whole refresh step."""
    from lowrank_pt.optim import projector

    shapes = {}
    for adapter in runner.method.adapters.values():
        shapes.setdefault(adapter.shape, adapter)
    rows = []
    for shape, adapter in shapes.items():
        g = torch.randn(shape) @ torch.randn(shape[1], shape[1]) / shape[1] ** 0.5  # decaying spectrum
        times = {}
        for label, kw in (("exact", dict(method="exact")),
                          ("randomized", dict(method="randomized", niter=2)),
                          ("randomized warm", dict(method="randomized", niter=1, previous=adapter.galore_basis))):
            reps = []
            for _ in range(5):
                t = time.perf_counter()
                projector.new_basis(g, adapter.rank, adapter.side, **kw)
                reps.append(time.perf_counter() - t)
            times[label] = statistics.median(reps)
        count = sum(1 for a in runner.method.adapters.values() if a.shape == shape)
        rows.append((shape, count, times))
    return rows


def layer_costs(args):
    """Forward + backward of one linear on a step's tokens: nn.Linear (forms dW) vs GaLoreLinear
    (dB through the basis, W_eff materialised in forward and again in backward)."""
    from torch import nn

    from lowrank_pt.methods.galore.adapter import GaLoreLinear
    from lowrank_pt.optim import projector

    rows = []
    for shape in sorted({(args.hidden, args.hidden), (args.intermediate, args.hidden), (args.hidden, args.intermediate)}):
        linear = nn.Linear(shape[1], shape[0], bias=False)
        adapter = GaLoreLinear(linear, args.rank, 0.25, "std")
        adapter.galore_basis.copy_(projector.new_basis(torch.randn(shape), adapter.rank, adapter.side)[0])
        x = torch.randn(args.batch, args.seq, shape[1], requires_grad=True)
        dy = torch.randn(args.batch, args.seq, shape[0])
        times = []
        for module in (linear, adapter):
            reps = []
            for _ in range(7):
                x.grad = None
                for p in module.parameters():
                    p.grad = None
                t = time.perf_counter()
                module(x).backward(dy)
                reps.append(time.perf_counter() - t)
            times.append(statistics.median(reps))
        rows.append((shape, *times))
    return rows


def bf16_merge_loss(runner):
    """Share of a merged update ``α·B·Q`` that rounding ``W0 + α·B·Q`` to bf16 throws away, for the
    update these steps produced and for the same update at 1/10 and 1/100 of the LR."""
    out = {}
    for factor in (1.0, 0.1, 0.01):
        lost = total = 0.0
        for adapter in runner.method.adapters.values():
            w0 = adapter.weight.detach().to(torch.bfloat16).float()
            delta = factor * adapter.merged(torch.zeros_like(w0), adapter.galore_b.detach(),
                                            adapter.galore_basis, adapter.galore_decay)
            merged = (w0 + delta).to(torch.bfloat16).float()
            lost += (merged - w0 - delta).norm().item() ** 2
            total += delta.norm().item() ** 2
        out[factor] = (lost / max(total, 1e-30)) ** 0.5
    return out


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    init_dist()
    init_state = copy.deepcopy(make_model(args).state_dict())
    names = ["adamw (full rank)", "galore (ours)", "galore-torch"]
    runners = {name: Runner(name, args, init_state) for name in names}
    params = sum(p.numel() for p in make_model(args).parameters())
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {params / 1e6:.1f}M params; "
          f"{args.batch}x{args.seq} tokens/step; rank {args.rank}, gap {args.gap}; fp32, {args.threads} threads")

    # Step 0 refreshes (both GaLores) and warms up allocators; not timed.
    refresh_step = {name: runner.step(batch_for(args, 0)) for name, runner in runners.items()}
    plain_step = {name: runner.step(batch_for(args, 1)) for name, runner in runners.items()}
    times = {name: [] for name in names}
    for p in range(args.passes):
        for name, runner in runners.items():
            for s in range(args.steps):
                times[name].append(runner.step(batch_for(args, 2 + p * args.steps + s)))

    base = statistics.median(times[names[0]])
    best = min(times[names[0]])
    print(f"\n{'optimizer':<20}{'s/step median':>14}{'min':>7}{'tok/s':>7}{'vs AdamW med':>13}{'min':>7}"
          f"{'state MB':>9}{'refresh/plain':>14}")
    for name in names:
        t, m = statistics.median(times[name]), min(times[name])
        ratio = f"{refresh_step[name] / plain_step[name]:.2f}x" if runners[name].method or "torch" in name else "-"
        print(f"{name:<20}{t:>14.3f}{m:>7.3f}{args.batch * args.seq / t:>7.0f}{t / base:>12.2f}x{m / best:>6.2f}x"
              f"{runners[name].state_bytes() / 2**20:>9.1f}{ratio:>14}")
    ours, ref = times["galore (ours)"], times["galore-torch"]
    print(f"galore (ours) / galore-torch: median {statistics.median(ours) / statistics.median(ref):.2f}x, "
          f"min {min(ours) / min(ref):.2f}x")
    print("all timed steps (s): " + "; ".join(f"{n}: {' '.join(f'{x:.2f}' for x in times[n])}" for n in names))

    print(f"\nsubspace refresh per matrix (median of 5), rank {args.rank}:")
    print(f"{'shape':<14}{'count':>6}{'exact ms':>10}{'randomized ms':>15}{'warm ms':>9}")
    totals = {"exact": 0.0, "randomized": 0.0, "randomized warm": 0.0}
    for shape, count, t in refresh_costs(args, runners["galore (ours)"]):
        print(f"{str(shape):<14}{count:>6}{t['exact'] * 1e3:>10.1f}{t['randomized'] * 1e3:>15.1f}"
              f"{t['randomized warm'] * 1e3:>9.1f}")
        for k in totals:
            totals[k] += count * t[k]
    print(f"{'all matrices':<20}{totals['exact'] * 1e3:>10.1f}{totals['randomized'] * 1e3:>15.1f}"
          f"{totals['randomized warm'] * 1e3:>9.1f}  (randomized: niter 2; warm: from the current basis, niter 1)")

    print("\none linear, forward + backward on a step's tokens (median of 7):")
    print(f"{'shape':<14}{'nn.Linear ms':>13}{'GaLoreLinear ms':>16}{'ratio':>7}")
    for shape, full, low in layer_costs(args):
        print(f"{str(shape):<14}{full * 1e3:>13.1f}{low * 1e3:>16.1f}{low / full:>7.2f}")

    loss = bf16_merge_loss(runners["galore (ours)"])
    print("\nbf16 W0: share of a merged update lost to rounding (after "
          f"{runners['galore (ours)'].step_index - 1} steps at lr 1e-3): "
          + ", ".join(f"update x{f:g}: {v:.1%}" for f, v in loss.items())
          + "  (base_in_fp32 loses 0%, at 4 unsharded bytes per weight)")


if __name__ == "__main__":
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    main()
