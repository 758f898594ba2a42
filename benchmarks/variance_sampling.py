"""Gradient-variance sampling vs uniform sampling on a heterogeneous-noise digits classifier.

    python benchmarks/variance_sampling.py [--quick] [--seeds 10] [--setting sources|classes] [--target-metric ...]

Default regime (chosen so that training is variance-limited at the target; see docs/algorithms/variance_sampling.md):
the ``sources`` data, an MLP 64-256-10, SGD lr 1.0, batch 32, target = the training objective (the uniform full-data
cross-entropy, which the importance weights keep unbiased) ≤ 0.05; the callback probes the output layer only
(``--probe-params last``, GVM's cheap-proxy idea; ``all`` probes every parameter). The earlier regime is
``--hidden 64 --lr 0.3 --target-metric val_acc --target 0.95`` (target reached before any allocation gains).

Data: scikit-learn digits (DigitsDataModule's seeded split); validation is always the clean, balanced held-out split.

* ``--setting sources`` (default): a mixture of data sources, as when a curated set is topped up with scraped or
  badly scanned data. Every training example is assigned at random to a source: two clean curated sources (45%
  each), a ``web`` source (``--web-share``, 5%) whose labels are redrawn uniformly at random
  (``--web-label-noise`` 1.0: a shard whose label column is broken, e.g. misaligned by a join) and a ``scanner``
  source (5%) with Gaussian pixel noise sd 1.0 and correct labels. Groups = the source (metadata one has in
  practice), not the possibly wrong label. Chosen after a short exploration (docs/algorithms/variance_sampling.md);
  the oracle row shows what any source-level allocation could gain; ``--web-share`` / ``--web-label-noise`` vary it.
* ``--setting classes``: classes 0-4 are kept whole and clean (abundant, easy); classes 5-9 keep 25% of their
  examples (imbalance), get Gaussian feature noise (``--feature-noise`` 0.6 on [0, 1] pixels) and
  ``--label-noise`` 20% of their labels replaced by a random minority label. Groups = observed labels.

Two measurements, each against uniform sampling in the same run:
1. Gradient variance at equal sample budget (batch 32): at four points (``--variance-steps``, default 0, max/8, max/4,
   3max/8, i.e. up to where the default target is reached) of a training run
   of each policy in ``--variance-runs`` (default: uniform and neyman, i.e. at the parameters uniform sampling reaches
   and at those the method reaches), exact per-example gradients of the whole training set give each group's
   statistics; the per-example trace covariance of the importance-weighted gradient (Σ π_i² M_i / q_i − ‖∇F‖²) is
   computed for each allocation, and checked empirically from 400 batches drawn by GroupBudgetSampler (mean
   ‖ĝ − ∇F‖² times 32). ``oracle_sqrt_m`` (q ∝ π·sqrt(M), exact statistics) is the best any group-level allocation can
   do; ``callback`` (runs of a callback policy) is the allocation the callback actually held, from its probes.
2. Time to target with the GradientVarianceSampling callback (plain SGD, same lr): ``--target-metric train_loss``
   (default: mean cross-entropy over the whole training set ≤ ``--target``) or ``val_acc`` (clean validation accuracy
   ≥ ``--target``), checked every 10 steps, in optimizer steps, examples and wall seconds (median and quartiles over
   seeds; ``paired_*``: median over seeds of the same-seed ratio). Policies run interleaved per seed, so machine load
   hits all alike; wall time (and the process CPU time,
   less sensitive to other jobs on a shared machine) counts training and the callback (probes included) but not the
   target checks. ``uniform_2x_batch`` is a control: uniform sampling with a
   batch of 64 (half the variance per step): if it is not faster in steps, training is not variance-limited at that
   target and no allocation can be faster in steps.

Writes benchmarks/out/variance_sampling.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from _common import figure, print_table
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_convergence.callbacks import GradientVarianceSampling
from lightning_convergence.examples import DigitsDataModule, MLPClassifier
from lightning_convergence.sampling import (
    GroupBudgetSampler,
    allocate_budget,
    weighted_estimator_variance,
)
from lightning_convergence.stats import per_sample_grads, sample_grad_stats
from lightning_convergence.stats.per_sample_norms import per_sample_sq_norms

BATCH, LR, HIDDEN = 32, 1.0, (256,)


class WeightedMLP(MLPClassifier):
    uses_sample_weights = True

    def training_step(self, batch, batch_idx):
        x, y = batch
        w = getattr(self, "sample_weights", None)
        losses = F.cross_entropy(self(x), y, reduction="none")
        return (losses * w).mean() if w is not None else losses.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class GroupedTensorDataset(TensorDataset):
    """A TensorDataset with a ``groups`` attribute (the data source of every example), read by the callback."""

    def __init__(self, *tensors: torch.Tensor, groups: torch.Tensor) -> None:
        super().__init__(*tensors)
        self.groups = groups


# Source mixture: (name, share of the training set, label-noise share, feature-noise sd).
SOURCES = (
    ("curated_a", 0.45, 0.0, 0.0),
    ("curated_b", 0.45, 0.0, 0.0),
    ("web", 0.05, 1.0, 0.0),
    ("scanner", 0.05, 0.0, 1.0),
)


def make_data(
    seed: int = 0, feature_noise: float = 0.6, label_noise: float = 0.2, setting: str = "sources",
    sources: tuple = SOURCES,
) -> tuple[TensorDataset, TensorDataset]:
    """Training set of the chosen setting (groups: the ``groups`` attribute, else the observed labels) and the
    clean, balanced validation split."""
    dm = DigitsDataModule(batch_size=BATCH, seed=0)
    dm.setup()
    x, y = (t.clone() for t in dm.train_set.tensors)
    gen = torch.Generator().manual_seed(1000 + seed)
    if setting == "sources":
        shares = torch.tensor([s[1] for s in sources])
        src = torch.multinomial(shares, len(y), replacement=True, generator=gen)
        for g, (_, _, lnoise, fnoise) in enumerate(sources):
            member = src == g
            if fnoise:
                x[member] = x[member] + fnoise * torch.randn(int(member.sum()), x.shape[1], generator=gen)
            flip = member & (torch.rand(len(y), generator=gen) < lnoise)
            y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=gen)
        return GroupedTensorDataset(x, y, groups=src), dm.val_set
    minority = y >= 5
    keep = ~minority | (torch.rand(len(y), generator=gen) < 0.25)
    x, y = x[keep], y[keep]
    minority = y >= 5
    x[minority] = x[minority] + feature_noise * torch.randn(int(minority.sum()), x.shape[1], generator=gen)
    flip = minority & (torch.rand(len(y), generator=gen) < label_noise)
    y[flip] = torch.randint(5, 10, (int(flip.sum()),), generator=gen)
    return TensorDataset(x, y), dm.val_set


def groups_of(train_set: TensorDataset) -> torch.Tensor:
    return getattr(train_set, "groups", train_set.tensors[1])


class EvalUntil(Callback):
    """Checks the target every ``every`` steps (clean validation accuracy ≥ ``target``, or the training objective ≤
    ``target``), stops there and records the step and the wall time spent outside these checks."""

    def __init__(self, val: TensorDataset, every: int, target: float, metric: str = "val_acc", train=None) -> None:
        self.x, self.y = (train if metric == "train_loss" else val).tensors[:2]
        self.every, self.target, self.metric = every, target, metric
        self.hit: tuple[int, float, float] | None = None  # (step, wall s, process CPU s), target checks excluded
        self.t0 = self.c0 = 0.0
        self.eval_s = self.eval_cpu = 0.0
        self.curve: list[tuple[int, float]] = []

    def on_train_start(self, trainer, pl_module):
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every:
            return
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = pl_module(self.x)
            loss = self.metric == "train_loss"
            value = float(F.cross_entropy(out, self.y) if loss else (out.argmax(1) == self.y).float().mean())
        self.curve.append((step, value))
        reached = value <= self.target if self.metric == "train_loss" else value >= self.target
        if reached and self.hit is None:
            self.hit = (step, t - self.t0 - self.eval_s, c - self.c0 - self.eval_cpu)
            trainer.should_stop = True
        self.eval_s += time.perf_counter() - t
        self.eval_cpu += time.process_time() - c


PROBE_PARAMS: list[str] | None = None  # --probe-params: parameter-name prefixes the probes differentiate


def make_callback(name: str, every: int) -> GradientVarianceSampling | None:
    if name in ("uniform", "uniform_2x_batch"):
        return None
    if name == "temperature":
        return GradientVarianceSampling(
            policy="temperature", check_every_n_steps=every, probe_per_group=0, reweight=False, min_per_group=1,
            start_temperature=5.0, end_temperature=1.0, cooldown_start_step=0, cooldown_steps=600,
        )
    if name == "gvm_rms":
        return GradientVarianceSampling(
            policy="gvm", gvm_statistic="rms_norm", check_every_n_steps=every, probe_per_group=8, ema_beta=0.7,
            probe_params=PROBE_PARAMS,
        )
    return GradientVarianceSampling(
        policy=name, check_every_n_steps=every, probe_per_group=8, ema_beta=0.7, probe_params=PROBE_PARAMS
    )


def train(
    name: str, train_set, val_set, seed: int, max_steps: int, target: float, every: int, lr: float = LR,
    hidden: tuple[int, ...] = HIDDEN, metric: str = "val_acc",
):
    seed_everything(seed, verbose=False)
    cb = make_callback(name, every)
    ev = EvalUntil(val_set, every=10, target=target, metric=metric, train=train_set)
    trainer = Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[c for c in (cb, ev) if c is not None],
    )
    model = WeightedMLP(hidden=hidden, lr=lr)
    # Control: uniform sampling with twice the batch (half the variance per step, twice the examples per step).
    batch = 2 * BATCH if name == "uniform_2x_batch" else BATCH
    loader = DataLoader(train_set, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer.fit(model, loader)
    return ev, model, cb


def exact_group_stats(model, train_set):
    x, y = train_set.tensors
    grp = groups_of(train_set)
    grads = per_sample_grads(model, F.cross_entropy, x, y)
    rows = list(grads.values())
    sq = per_sample_sq_norms(rows)
    k = int(grp.max()) + 1
    sizes = torch.bincount(grp, minlength=k).double()
    pi = sizes / sizes.sum()
    g_norm = torch.stack([sq[grp == g].sqrt().mean() for g in range(k)])
    m = torch.stack([sq[grp == g].mean() for g in range(k)])
    sigma = torch.tensor([sample_grad_stats([r[grp == g] for r in rows]).trace_cov ** 0.5 for g in range(k)])
    flat = torch.cat([r.reshape(len(y), -1).double() for r in rows], dim=1)
    full = flat.mean(dim=0)
    return sizes, pi, g_norm, m, sigma, flat, full, grp


def variance_table(model, train_set, n_batches: int, label: str, extra: dict | None = None):
    sizes, pi, g_norm, m, sigma, flat, full, y = exact_group_stats(model, train_set)
    full_sq = float(full.pow(2).sum())
    window = BATCH * 8
    allocs = {
        "uniform": allocate_budget("uniform", window, sizes, min_per_group=1),
        "gvm": allocate_budget("gvm", window, sizes, grad_norms=g_norm, min_per_group=1),
        "neyman": allocate_budget("neyman", window, sizes, grad_stds=sigma, min_per_group=1),
        # The i.i.d. importance-sampling optimum q ∝ π·sqrt(M): the ceiling for any allocation on this data.
        "oracle_sqrt_m": allocate_budget("gvm", window, sizes, grad_norms=m.sqrt(), min_per_group=1),
    }
    allocs.update(extra or {})  # e.g. the allocation a callback held (its own window size)
    out = {}
    for name, counts in allocs.items():
        theory = weighted_estimator_variance(pi, counts.double() / counts.sum(), m, full_sq)
        sampler = GroupBudgetSampler(train_set, y, window_size=int(counts.sum()), counts=counts, seed=7)
        errs = []
        epoch = 0
        while len(errs) < n_batches:
            sampler.set_epoch(epoch)
            idx = torch.tensor(list(sampler))
            w = sampler.pop_weights(len(idx)).double()
            for b in range(0, len(idx) - BATCH + 1, BATCH):
                g = (w[b : b + BATCH, None] * flat[idx[b : b + BATCH]]).mean(dim=0)
                errs.append(float((g - full).pow(2).sum()) * BATCH)
            epoch += 1
        out[name] = (theory, statistics.fmean(errs[:n_batches]))
    rows = []
    for name, (theory, emp) in out.items():
        rows.append([label, name, theory, emp, out["uniform"][0] / theory, out["uniform"][1] / emp])
    return rows


POLICIES = ("uniform", "uniform_2x_batch", "gvm", "gvm_rms", "neyman", "temperature")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 400 steps max, 100 variance batches")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=4000)
    parser.add_argument(
        "--target-metric", choices=("train_loss", "val_acc"), default="train_loss",
        help="train_loss: uniform full-data training objective <= target; val_acc: clean validation accuracy >= target",
    )
    parser.add_argument("--target", type=float, default=0.05, help="value of --target-metric to reach")
    parser.add_argument("--every", type=int, default=50, help="re-allocation period, steps (callback default)")
    parser.add_argument(
        "--setting", choices=("sources", "classes"), default="sources",
        help="sources: clean + noisy data sources, groups = source; classes: imbalanced noisy classes, groups = label",
    )
    parser.add_argument("--lr", type=float, default=LR, help="SGD learning rate (every policy)")
    parser.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN), help="MLP hidden widths")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument(
        "--variance-runs", nargs="*", choices=("uniform", "gvm", "gvm_rms", "neyman"), default=["uniform", "neyman"],
        help="training runs whose parameters the variance table is measured at (none: skip the table)",
    )
    parser.add_argument(
        "--variance-steps", type=int, nargs="*", default=None,
        help="steps of the variance table (default 0, max/8, max/4, 3max/8: up to where the target is reached)",
    )
    parser.add_argument(
        "--probe-params", nargs="+", default=["last"],
        help="parameter-name prefixes the probes differentiate; 'last' (default): the output layer, 'all': every one",
    )
    parser.add_argument("--web-share", type=float, default=0.05, help="sources setting: share of the web source")
    parser.add_argument(
        "--web-label-noise", type=float, default=1.0, help="sources setting: share of random labels in the web source"
    )
    parser.add_argument("--feature-noise", type=float, default=0.6, help="classes setting: feature noise sd, 5-9")
    parser.add_argument("--label-noise", type=float, default=0.2, help="classes setting: label-noise share, 5-9")
    args = parser.parse_args()
    global PROBE_PARAMS
    # The output layer is ``net.{2 * #hidden}`` in MLPClassifier (Linear, ReLU pairs, then the last Linear).
    last = f"net.{2 * len(args.hidden)}"
    PROBE_PARAMS = None if args.probe_params == ["all"] else [last if p == "last" else p for p in args.probe_params]
    seeds = 2 if args.quick else args.seeds
    max_steps = 400 if args.quick else args.max_steps
    n_batches = 100 if args.quick else 400
    hidden, lr, metric = tuple(args.hidden), args.lr, args.target_metric
    torch.set_num_threads(1)
    web_rest = (1.0 - args.web_share - SOURCES[3][1]) / 2
    sources = (
        (SOURCES[0][0], web_rest, 0.0, 0.0), (SOURCES[1][0], web_rest, 0.0, 0.0),
        ("web", args.web_share, args.web_label_noise, 0.0), SOURCES[3],
    )
    train_set, val_set = make_data(0, args.feature_noise, args.label_noise, args.setting, sources)
    sizes = torch.bincount(groups_of(train_set)).tolist()
    if args.setting == "sources":
        desc = "sources " + ", ".join(
            f"{name} (n={n}, label noise {ln}, feature noise {fn})" for (name, _, ln, fn), n in zip(sources, sizes)
        )
    else:
        desc = (
            f"classes: groups (observed labels) sizes {sizes}; feature noise {args.feature_noise}, "
            f"label noise {args.label_noise} on classes 5-9"
        )
    print(
        f"{desc}; val: {len(val_set)} clean balanced examples; MLP 64-{'-'.join(map(str, hidden))}-10, SGD lr {lr}, "
        f"batch {BATCH}, re-allocation every {args.every} steps, probes on {PROBE_PARAMS or 'all parameters'}"
    )

    # 1. Gradient variance at equal sample budget, at four points of training runs (uniform's and the methods').
    var_rows = []
    checkpoints = args.variance_steps or sorted({0, max_steps // 8, max_steps // 4, 3 * max_steps // 8})
    for run in args.variance_runs:
        for step in checkpoints:
            seed_everything(0, verbose=False)
            extra = {}
            if step == 0:
                model = WeightedMLP(hidden=hidden, lr=lr)
            else:
                _, model, cb = train(run, train_set, val_set, 0, step, float("nan"), args.every, lr, hidden, metric)
                if cb is not None and cb.sampler is not None:
                    extra["callback"] = cb.sampler.counts
            var_rows += variance_table(model, train_set, n_batches, f"{run} step {step}", extra)
    if var_rows:
        print_table(
            "Per-example gradient variance of the weighted estimator at equal budget (batch 32), at the parameters of "
            "the named run; ratio = uniform / allocation",
            ["run, step", "allocation", "var_theory", "var_empirical", "ratio_theory", "ratio_empirical"], var_rows,
        )

    # 2. Time to target; policies interleaved per seed so that machine load falls on all of them alike.
    results: dict[str, list[tuple[int, float, float] | None]] = {name: [] for name in args.policies}
    for seed in range(seeds):
        for name in args.policies:
            ev, _, _ = train(name, train_set, val_set, seed, max_steps, args.target, args.every, lr, hidden, metric)
            results[name].append(ev.hit)
    base = _median_hit(results[args.policies[0]])
    rows = []
    for name, hits in results.items():
        med = _median_hit(hits)
        reached = sum(h is not None for h in hits)
        rows.append([
            name, f"{reached}/{len(hits)}", med[0], _quartiles(hits, 0),
            med[0] * BATCH * (2 if name == "uniform_2x_batch" else 1), med[1], _quartiles(hits, 1), med[2],
            *(b / m if m else float("nan") for b, m in zip(base, med)),
            *(_paired(results[args.policies[0]], hits, i) for i in (1, 2)),
        ])
    what = (
        f"training objective <= {args.target:g}" if metric == "train_loss" else f"{args.target:.0%} clean val accuracy"
    )
    print_table(
        f"Time to {what} (median over {seeds} seed(s); not reached = inf); speedup = {args.policies[0]} / method "
        "(medians)",
        ["policy", "reached", "steps", "steps_q1-q3", "examples", "wall_s", "wall_q1-q3", "cpu_s", "speedup_steps",
         "speedup_wall", "speedup_cpu", "paired_wall", "paired_cpu"],
        rows,
    )
    _plot(var_rows, rows)


def _quartiles(hits, col: int) -> str:
    vals = sorted(h[col] if h is not None else float("inf") for h in hits)
    n = len(vals) - 1
    lo, hi = vals[round(0.25 * n)], vals[round(0.75 * n)]
    return f"{lo:g}-{hi:g}" if col == 0 else f"{lo:.3g}-{hi:.3g}"


def _paired(base_hits, hits, col: int) -> float:
    """Median over seeds of base / method for the same seed (runs adjacent in time, so slow load drift cancels)."""
    ratios = [b[col] / h[col] if b and h else 0.0 for b, h in zip(base_hits, hits)]
    return statistics.median(ratios)


def _median_hit(hits) -> tuple[float, ...]:
    """Medians of (steps, wall s, CPU s); a run that missed the target counts as inf."""
    return tuple(statistics.median(h[i] if h is not None else float("inf") for h in hits) for i in range(3))


def _plot(var_rows, time_rows) -> None:
    with figure("variance_sampling", 1, 2, (11, 4)) as grid:
        if grid is None:
            return
        axes = grid[0]
        labels = [f"{r[0]}\n{r[1]}" for r in var_rows]
        axes[0].bar(range(len(var_rows)), [r[5] for r in var_rows])
        axes[0].set_xticks(range(len(var_rows)), labels, fontsize=7)
        axes[0].set_ylabel("variance ratio uniform / method (empirical)")
        axes[0].axhline(1.0, color="k", lw=0.5)
        axes[1].bar([r[0] for r in time_rows], [r[8] for r in time_rows])
        axes[1].set_ylabel("speedup in steps to target")
        axes[1].axhline(1.0, color="k", lw=0.5)

if __name__ == "__main__":
    main()
