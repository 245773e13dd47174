"""SWALP on linear regression: the averaged iterate converges, the rounded one stalls.

Least squares on synthetic data (features x ~ N(0, I), labels x.w_true plus
Gaussian noise), minimised by single-sample SGD with a constant learning
rate, in three ways:

- SGD-FP: full-precision SGD;
- SGD-LP: the iterate is rounded to fixed point after every step
  (`wl = fl + 4` bits, `fl` of them fractional, so the range [-8, 8) holds
  every weight; stochastic rounding);
- SWALP: the full-precision running mean of SGD-LP's iterates from
  iteration `--swa_start` on (one more iterate per step, as in the paper's
  analysis; the network experiments average once per epoch).

The optimum w* is the exact least-squares solution. The paper's analysis of
quadratic objectives: SWALP's squared distance to w* falls like 1/T even at
a constant learning rate, below the distance of the nearest grid point,
while SGD-LP stays in a noise ball whose size is set by the grid step 2^-fl.
Every curve is the mean over `--replicates` independent runs (run as one
batch) that share the data set.

    python -m experiments.linear_regression [--iterations N] [--seed S] [--out PATH.png]

prints a table and writes PATH.png and PATH.json.
"""

import argparse
import math
import os
import time

import torch

from experiments import common
from swalp.quant import torch_kernels

INTEGER_BITS = 4  # sign and three integer bits: weights lie in [-8, 8)


def make_problem(features, samples, noise, seed):
    """Data X (samples x features), labels y, and the least-squares optimum
    w* in float64 (distances to it are measured in float64)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    w_true = torch.randn(features, generator=generator)
    y = x @ w_true + noise * torch.randn(samples, generator=generator)
    w_star = torch.linalg.lstsq(x.double(), y.double().unsqueeze(1)).solution.squeeze(1)
    return x, y, w_star


def checkpoints(iterations, per_decade):
    """Iterations 1..iterations at which distances are recorded: `per_decade`
    log-spaced ones per decade, the powers of ten among them, and the last."""
    steps = math.floor(per_decade * math.log10(iterations))
    return sorted({round(10 ** (k / per_decade)) for k in range(steps + 1)} | {iterations})


def squared_distance(w, w_star):
    """||w - w*||^2 of each replicate (the second-to-last dimension of w), averaged over them."""
    return ((w.double() - w_star) ** 2).sum(-1).mean(-1)


@common.single_thread()
def run(fractional_lengths=(4, 6, 8), iterations=300_000, lr=0.01, swa_start=2000, features=32, samples=4096,
        noise=0.05, replicates=32, per_decade=50, seed=0):
    """Curves of ||w_t - w*||^2 for SGD-FP, and SGD-LP and SWALP per fractional length.

    All methods see the same sample sequence (common random numbers, so their
    differences are not sampling luck). Returns a dict of lists.
    """
    if not 0 < swa_start < iterations:
        raise ValueError("swa_start must lie between 0 and iterations")
    x, y, w_star = make_problem(features, samples, noise, seed)
    fls = list(fractional_lengths)
    record = checkpoints(iterations, per_decade)
    curves = descend(x, y, w_star, fls, record, lr, swa_start, replicates, seed)
    # The nearest grid point is the best any fixed-point model can do.
    grid = {fl: ((torch_kernels.fixed_point_quantize(w_star.float(), fl + INTEGER_BITS, fl, rounding="nearest")
                  - w_star) ** 2).sum().item() for fl in fls}
    return {"iterations": record, "swa_iterations": [t for t in record if t > swa_start], "fractional_lengths": fls,
            "grid": grid, "initial": (w_star ** 2).sum().item(), **curves}


def descend(x, y, w_star, fls, record, lr, swa_start, replicates, seed):
    """Run the three methods from w = 0 for record[-1] steps; the distances at
    the iterations in `record` (SWALP's only after swa_start)."""
    samples, features = x.shape
    sampling = torch.Generator().manual_seed(seed + 1)
    rounding = torch.Generator().manual_seed(seed + 2)
    w_fp = torch.zeros(replicates, features)
    w_lp = torch.zeros(len(fls), replicates, features)
    # The average is accumulated in float64 so that 10^5 float32 additions do
    # not blur the very small distances it reaches.
    w_swa = torch.zeros(len(fls), replicates, features, dtype=torch.float64)
    averaged = 0
    curves = {"sgd_fp": [], "sgd_lp": {fl: [] for fl in fls}, "swalp": {fl: [] for fl in fls}}
    iterations, chunk = record[-1], 4096
    for start in range(0, iterations, chunk):
        # Drawing the sample indices in chunks keeps the per-step cost down.
        indices = torch.randint(samples, (min(chunk, iterations - start), replicates), generator=sampling)
        for offset, index in enumerate(indices):
            t = start + offset + 1
            xs, ys = x[index], y[index]  # one sample per replicate
            w_fp -= lr * xs * ((xs * w_fp).sum(-1) - ys).unsqueeze(-1)
            step = w_lp - lr * xs * ((xs * w_lp).sum(-1) - ys).unsqueeze(-1)
            for i, fl in enumerate(fls):
                w_lp[i] = torch_kernels.fixed_point_quantize(step[i], fl + INTEGER_BITS, fl, generator=rounding)
            if t > swa_start:
                averaged += 1
                w_swa += (w_lp.double() - w_swa) / averaged
            if t == record[len(curves["sgd_fp"])]:  # the next checkpoint
                curves["sgd_fp"].append(squared_distance(w_fp, w_star).item())
                lp, swa = squared_distance(w_lp, w_star), squared_distance(w_swa, w_star)
                for i, fl in enumerate(fls):
                    curves["sgd_lp"][fl].append(lp[i].item())
                    if averaged:
                        curves["swalp"][fl].append(swa[i].item())
    return curves


def loglog_slope(ts, values, start):
    """Least-squares slope of log(value) against log(t) over t >= start."""
    points = [(math.log(t), math.log(v)) for t, v in zip(ts, values) if t >= start]
    mean_t = sum(p[0] for p in points) / len(points)
    mean_v = sum(p[1] for p in points) / len(points)
    return (sum((p[0] - mean_t) * (p[1] - mean_v) for p in points)
            / sum((p[0] - mean_t) ** 2 for p in points))


def late_mean(ts, values, start):
    """Mean of the values at t >= start: a plateau's height."""
    late = [v for t, v in zip(ts, values) if t >= start]
    return sum(late) / len(late)


def summary(result):
    """One row per method: distance at each power of ten, the mean over the
    last half of the run and the log-log slope there."""
    ts, swa_ts = result["iterations"], result["swa_iterations"]
    end = ts[-1]
    decades = [t for t in swa_ts if math.log10(t).is_integer()]
    marks = sorted(set(decades) | {end})

    def row(name, fl, times, values):
        at = dict(zip(times, values))
        return {"method": name, "fl": fl, **{f"T={t:.0e}": at[t] for t in marks},
                "mean last half": late_mean(times, values, end / 2),
                "slope last half": loglog_slope(times, values, end / 2),
                "nearest grid point": result["grid"].get(fl)}

    rows = [row("SGD-FP", None, ts, result["sgd_fp"])]
    for fl in result["fractional_lengths"]:
        rows.append(row("SGD-LP", fl, ts, result["sgd_lp"][fl]))
        rows.append(row("SWALP", fl, swa_ts, result["swalp"][fl]))
    return rows


def plot(result):
    """The curves on log-log axes, as a matplotlib figure."""
    plt = common.pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.loglog(result["iterations"], result["sgd_fp"], color="black", label="SGD-FP")
    colors = plt.get_cmap("viridis")(torch.linspace(0, 0.85, len(result["fractional_lengths"])).tolist())
    for color, fl in zip(colors, result["fractional_lengths"]):
        axes.loglog(result["iterations"], result["sgd_lp"][fl], color=color, linestyle="--", label=f"SGD-LP fl={fl}")
        axes.loglog(result["swa_iterations"], result["swalp"][fl], color=color, label=f"SWALP fl={fl}")
        axes.axhline(result["grid"][fl], color=color, linestyle=":", linewidth=1)
    axes.set_xlabel("iterations T")
    axes.set_ylabel(r"$\|w_T - w^*\|^2$")
    axes.set_title("Linear regression, fixed point (dotted: nearest grid point)")
    axes.legend(fontsize=8, ncol=2, loc="lower left")
    figure.tight_layout()
    return figure


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300_000, help="SGD steps per run")
    parser.add_argument("--fl", type=int, nargs="+", default=[4, 6, 8],
                        help="fractional lengths of the fixed-point formats (word length fl + 4)")
    parser.add_argument("--lr", type=float, default=0.01, help="constant learning rate")
    parser.add_argument("--swa_start", type=int, default=2000, help="iteration after which SWALP averages")
    parser.add_argument("--features", type=int, default=32, help="dimension of the features and of w")
    parser.add_argument("--samples", type=int, default=4096, help="training samples, drawn once")
    parser.add_argument("--noise", type=float, default=0.05, help="label noise standard deviation")
    parser.add_argument("--replicates", type=int, default=32, help="independent runs averaged per curve")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of every run")
    parser.add_argument("--out", default=os.path.join("experiments", "results", "linear_regression.png"),
                        help="the PNG; the JSON goes next to it")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    began = time.time()
    result = run(args.fl, args.iterations, args.lr, args.swa_start, args.features, args.samples, args.noise,
                 args.replicates, seed=args.seed)
    seconds = time.time() - began
    rows = summary(result)

    print(f"||w - w*||^2, mean of {args.replicates} runs; initial {result['initial']:.3g}; "
          f"fixed point wl = fl + {INTEGER_BITS}, lr {args.lr}, {args.iterations} iterations ({seconds:.0f} s)")
    common.report(rows, ".3g", plot(result), args, seconds, curves=result)
    return result, rows


if __name__ == "__main__":
    main()
