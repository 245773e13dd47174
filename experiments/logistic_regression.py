"""SWALP on L2-regularised logistic regression, 4 to 16 bits.

Multinomial logistic regression (softmax over the classes, weights and bias
in one matrix, objective: mean cross-entropy + wd/2 ||W||^2, strongly
convex) on MNIST when `--data_path` holds it (torchvision's `MNIST` folder,
never downloaded), otherwise on scikit-learn's bundled 8x8 digits (1797
images, shipped inside the package; a fixed stratified 75/25 split). All
pixels are divided by one constant that makes the mean squared norm of a
training image 1, so that one learning rate suits both data sets.

Minimised by minibatch SGD with a constant learning rate:

- SGD-LP: the weights are rounded to fixed point with stochastic rounding
  after every step (gradients and arithmetic stay in full precision, as in the
  paper's analysis). The format: `il` integer bits, sign included, chosen
  once from the full-precision optimum W* as the fewest that hold its largest
  magnitude (4 bits, range [-8, 8), on the digits with the defaults), and
  fl = wl - il fractional bits, so every word length spends its extra bits
  on precision and the clamp never binds near the optimum;
- SWALP: the full-precision running mean of SGD-LP's weights, one more
  iterate per step from epoch `--swa_start` on;
- SGD-FP and SWA-FP: the same two in full precision (float32).

The paper's analysis of strongly convex objectives: SGD-LP ends in a noise
ball around the optimum whose size grows with the grid step, SWALP in a
smaller one, so at the same word length SWALP's training loss is lower and
closer to full precision, most visibly at few bits. Every number is the mean
over `--replicates` runs (one batch) that differ only in their sampling and
rounding noise; the methods share the sample order (common random numbers).

    python -m experiments.logistic_regression [--epochs N] [--seed S] [--out PATH.png] [--data_path DIR]

prints a table and writes PATH.png and PATH.json.
"""

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from experiments import common
from swalp.quant import torch_kernels


def with_bias(x):
    """Append a constant feature, so the bias is a row of the weight matrix."""
    return torch.cat([x, torch.ones(len(x), 1)], 1)


def load_data(data_path):
    """(x_train, y_train, x_test, y_test, name), scaled, with the bias column appended."""
    try:
        from torchvision.datasets import MNIST

        train, test = MNIST(data_path, train=True, download=False), MNIST(data_path, train=False, download=False)
        splits = [(d.data.flatten(1).float() / 255, d.targets) for d in (train, test)]
        name = "MNIST"
    except (ImportError, RuntimeError):  # torchvision raises RuntimeError when the files are absent
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        parts = train_test_split(digits.data, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
        splits = [(torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)) for x, y in (parts[0::2], parts[1::2])]
        name = "digits (scikit-learn)"
    (x_train, y_train), (x_test, y_test) = splits
    # MNIST's images have 12 times the pixels of the digits': without this
    # its stable learning rates would be about ten times smaller.
    scale = x_train.pow(2).sum(1).mean().sqrt()
    return with_bias(x_train / scale), y_train, with_bias(x_test / scale), y_test, name


def objective(w, x, y, wd):
    """Mean cross-entropy + wd/2 ||W||^2 per weight matrix of w (..., d, classes), in float64."""
    w = w.double()
    logits = x.double() @ w
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.expand(*logits.shape[:-1]).reshape(-1),
                           reduction="none").reshape(logits.shape[:-1]).mean(-1)
    return loss + wd / 2 * (w ** 2).sum((-2, -1))


def test_error(w, x, y):
    """Fraction of x misclassified, per weight matrix."""
    return ((x @ w.float()).argmax(-1) != y).double().mean(-1)


def optimum(x, y, wd):
    """The full-precision minimiser W* (float64) by L-BFGS, and f(W*)."""
    x, w = x.double(), torch.zeros(x.shape[1], int(y.max()) + 1, dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([w], max_iter=2000, tolerance_grad=1e-10, tolerance_change=1e-14, history_size=50,
                               line_search_fn="strong_wolfe")

    def closure():
        solver.zero_grad()
        loss = objective(w, x, y, wd)
        loss.backward()
        return loss

    solver.step(closure)
    return w.detach(), objective(w.detach(), x, y, wd).item()


def integer_bits(w_star):
    """The fewest integer bits il, sign included, whose fixed-point range
    [-2^(il-1), 2^(il-1)) holds every weight of the optimum."""
    return math.floor(math.log2(w_star.abs().max().item())) + 2


def train(x, y, word_lengths, il, lr, wd, epochs, batch_size, swa_start, replicates, seed):
    """Final SGD weights and SWA means, shape (methods, replicates, d, classes):
    method 0 is full precision, method i > 0 fixed point with word_lengths[i-1] bits."""
    def fixed_point(wl):
        return lambda w, generator: torch_kernels.fixed_point_quantize(w, wl, wl - il, generator=generator)

    return descend(x, y, [fixed_point(wl) for wl in word_lengths], lr, wd, epochs, batch_size, swa_start,
                   replicates, seed)


def descend(x, y, rounders, lr, wd, epochs, batch_size, swa_start, replicates, seed):
    """Minibatch SGD from W = 0 in full precision (method 0) and with the
    weights rounded by each of `rounders` (w, generator) -> w after every
    step (methods 1..), all on the same samples; the final weights and SWA
    means, shape (methods, replicates, d, classes)."""
    samples, features = x.shape
    classes = int(y.max()) + 1
    sampling = torch.Generator().manual_seed(seed)
    rounding = torch.Generator().manual_seed(seed + 1)
    methods = 1 + len(rounders)
    w = torch.zeros(methods, replicates, features, classes)
    swa = torch.zeros_like(w)
    averaged = 0
    steps = samples // batch_size  # the incomplete last batch is dropped
    for epoch in range(epochs):
        order = torch.rand(replicates, samples, generator=sampling).argsort(-1)
        for step in range(steps):
            index = order[:, step * batch_size:(step + 1) * batch_size]
            xs, ys = x[index], y[index]  # (replicates, batch, d), (replicates, batch)
            # Softmax cross-entropy gradient: x^T (softmax(x W) - onehot(y)) / batch.
            error = torch.softmax(xs @ w, -1)
            error -= F.one_hot(ys, classes).float()
            w -= lr * (xs.transpose(-1, -2) @ error / batch_size + wd * w)
            for i, rounder in enumerate(rounders, 1):
                w[i] = rounder(w[i], rounding)
            if epoch >= swa_start:
                averaged += 1
                swa += (w - swa) / averaged
    return w, swa


@common.single_thread()
def run(word_lengths=(4, 6, 8, 10, 12, 14, 16), epochs=100, lr=2.0, wd=3e-4, batch_size=16, swa_start=50,
        replicates=16, seed=0, data_path="data", data=None):
    """Training loss and test error of each method per word length.

    `data` (x_train, y_train, x_test, y_test, name) replaces loading."""
    if not 0 <= swa_start < epochs:
        raise ValueError("swa_start must lie in [0, epochs)")
    x_train, y_train, x_test, y_test, name = data or load_data(data_path)
    w_star, f_star = optimum(x_train, y_train, wd)
    il = integer_bits(w_star)
    w, swa = train(x_train, y_train, list(word_lengths), il, lr, wd, epochs, batch_size, swa_start, replicates, seed)

    def scores(weights):
        """Mean training objective and test error (%) over the replicates, per method."""
        return ([objective(w_method, x_train, y_train, wd).mean().item() for w_method in weights],
                [100 * test_error(w_method, x_test, y_test).mean().item() for w_method in weights])

    (sgd_loss, swa_loss), (sgd_err, swa_err) = zip(scores(w), scores(swa))
    return {"dataset": name, "train_size": len(x_train), "test_size": len(x_test), "integer_bits": il,
            "optimum_loss": f_star, "optimum_test_error": 100 * test_error(w_star, x_test, y_test).item(),
            "word_lengths": list(word_lengths),
            "sgd_fp": {"loss": sgd_loss[0], "test_error": sgd_err[0]},
            "swa_fp": {"loss": swa_loss[0], "test_error": swa_err[0]},
            "sgd_lp": {"loss": sgd_loss[1:], "test_error": sgd_err[1:]},
            "swalp": {"loss": swa_loss[1:], "test_error": swa_err[1:]}}


def summary(result):
    """One row per word length, then full precision (SGD-FP and SWA-FP in the
    SGD and SWA columns) and the optimum."""
    il = result["integer_bits"]
    rows = [{"wl": wl, "fl": wl - il, "SGD loss": result["sgd_lp"]["loss"][i], "SWA loss": result["swalp"]["loss"][i],
             "SGD err %": result["sgd_lp"]["test_error"][i], "SWA err %": result["swalp"]["test_error"][i]}
            for i, wl in enumerate(result["word_lengths"])]
    rows.append({"wl": "float32", "fl": None, "SGD loss": result["sgd_fp"]["loss"],
                 "SWA loss": result["swa_fp"]["loss"], "SGD err %": result["sgd_fp"]["test_error"],
                 "SWA err %": result["swa_fp"]["test_error"]})
    rows.append({"wl": "optimum", "fl": None, "SGD loss": result["optimum_loss"], "SWA loss": None,
                 "SGD err %": result["optimum_test_error"], "SWA err %": None})
    return rows


def plot(result):
    """Excess training loss and test error against the word length, as a matplotlib figure."""
    plt = common.pyplot()
    wls, f_star = result["word_lengths"], result["optimum_loss"]
    figure, (loss_axes, error_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, color in (("sgd_lp", "SGD-LP", "tab:orange"), ("swalp", "SWALP", "tab:blue")):
        loss_axes.semilogy(wls, [v - f_star for v in result[key]["loss"]], "o-", color=color, label=label)
        error_axes.plot(wls, result[key]["test_error"], "o-", color=color, label=label)
    for key, label, color in (("sgd_fp", "SGD-FP", "tab:red"), ("swa_fp", "SWA-FP", "tab:green")):
        loss_axes.axhline(result[key]["loss"] - f_star, color=color, linestyle="--", label=label)
        error_axes.axhline(result[key]["test_error"], color=color, linestyle="--", label=label)
    loss_axes.set(xlabel="word length (bits)", ylabel="training loss - optimum", title="Training loss")
    error_axes.set(xlabel="word length (bits)", ylabel="test error (%)", title="Test error")
    for axes in (loss_axes, error_axes):
        axes.legend(fontsize=8)
    figure.suptitle(f"Logistic regression on {result['dataset']}, fixed point with {result['integer_bits']} "
                    "integer bits")
    figure.tight_layout()
    return figure


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_path", default="data", help="folder holding MNIST/ (else the digits are used)")
    parser.add_argument("--epochs", type=int, default=100, help="passes over the training set per run")
    parser.add_argument("--wl", type=int, nargs="+", default=[4, 6, 8, 10, 12, 14, 16],
                        help="word lengths of the fixed-point formats")
    parser.add_argument("--lr", type=float, default=2.0, help="constant learning rate")
    parser.add_argument("--wd", type=float, default=3e-4, help="L2 regularisation")
    parser.add_argument("--batch_size", type=int, default=16, help="minibatch size")
    parser.add_argument("--swa_start", type=int, default=50, help="epochs before averaging starts")
    parser.add_argument("--replicates", type=int, default=16, help="independent runs averaged per number")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sample order and the rounding noise (the split is fixed)")
    parser.add_argument("--out", default=os.path.join("experiments", "results", "logistic_regression.png"),
                        help="the PNG; the JSON goes next to it")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    began = time.time()
    result = run(args.wl, args.epochs, args.lr, args.wd, args.batch_size, args.swa_start, args.replicates, args.seed,
                 args.data_path)
    seconds = time.time() - began
    rows = summary(result)

    print(f"{result['dataset']} ({result['train_size']} train, {result['test_size']} test), wd {args.wd}, "
          f"lr {args.lr}, {args.epochs} epochs, mean of {args.replicates} runs ({seconds:.0f} s)")
    print(f"rows wl: SGD-LP and SWALP, fixed point with {result['integer_bits']} integer bits; "
          "row float32: SGD-FP and SWA-FP; loss: training objective")
    common.report(rows, ".4f", plot(result), args, seconds, result=result)
    return result, rows


if __name__ == "__main__":
    main()
