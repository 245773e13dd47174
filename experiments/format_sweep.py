"""SWALP against SGD-LP across number formats, on logistic regression.

The setting of `logistic_regression.py` (L2-regularised multinomial
logistic regression on MNIST when present, else scikit-learn's digits;
minibatch SGD at a constant learning rate; the weights rounded with
stochastic rounding after every step, gradients and arithmetic in full
precision; SWALP the full-precision running mean of the rounded weights
from `--swa_start` on), with the weights rounded to each of several number
formats instead of fixed point of several word lengths. Formats are
train.py's specs (`python train.py --help`), plus `fixed<wl>`: fixed point
with wl bits whose integer bits are the fewest that hold the optimum's
largest weight (as in logistic_regression.py). Block and MX formats see the
weights of each class as one row, so blocks run along the features (the
dimension a product x W sums over).

    python -m experiments.format_sweep [--formats fixed8 e4m3 e5m2 mxfp8 mxfp4 mxint8 ...] [--epochs N]

prints the final training loss and test error per format and writes a PNG
and a JSON (experiments/results/format_sweep.*).
"""

import argparse
import os
import re
import time


from experiments import common, logistic_regression
from swalp.quant import backends, specs

DEFAULT_FORMATS = ("fixed8", "bfp8", "e4m3", "e5m2", "fp8e4m3", "mxfp8", "mxfp8-ceil", "mxfp4", "mxfp4-ceil", "nvfp4",
                   "mxint8")


def resolve(spec, il):
    """The format of a sweep spec: train.py's specs, and fixed<wl> with
    wl - il fractional bits."""
    if match := re.fullmatch(r"fixed(\d+)", spec.strip().lower()):
        wl = int(match[1])
        return specs.parse(f"fixed{wl}.{max(wl - il, 0)}")
    number_format = specs.parse(spec)
    if number_format is None:
        raise specs.FormatError(f"{spec}: the sweep compares low-precision formats; fp32 is always its baseline")
    return number_format


def rounder(number_format):
    """Rounds weights (replicates, d, classes) to the format, one row per class."""
    def round_weights(w, generator):
        rows = w.transpose(-1, -2).reshape(-1, w.shape[-2])
        rounded = number_format.quantize(rows.contiguous(), "stochastic", backends.TORCH_BACKEND, generator)
        return rounded.reshape(w.shape[0], w.shape[-1], w.shape[-2]).transpose(-1, -2)

    return round_weights


@common.single_thread()
def run(specs=DEFAULT_FORMATS, epochs=60, lr=2.0, wd=3e-4, batch_size=16, swa_start=30, replicates=8, seed=0,
        data_path="data", data=None):
    """Training loss and test error of SGD-LP and SWALP per format, and of
    full precision and the optimum. `data` replaces loading."""
    if not 0 <= swa_start < epochs:
        raise ValueError("swa_start must lie in [0, epochs)")
    x_train, y_train, x_test, y_test, name = data or logistic_regression.load_data(data_path)
    w_star, f_star = logistic_regression.optimum(x_train, y_train, wd)
    il = logistic_regression.integer_bits(w_star)
    number_formats = [resolve(spec, il) for spec in specs]
    w, swa = logistic_regression.descend(x_train, y_train, [rounder(f) for f in number_formats], lr, wd, epochs,
                                         batch_size, swa_start, replicates, seed)

    def scores(weights):
        return ([logistic_regression.objective(m, x_train, y_train, wd).mean().item() for m in weights],
                [100 * logistic_regression.test_error(m, x_test, y_test).mean().item() for m in weights])

    (sgd_loss, swa_loss), (sgd_err, swa_err) = zip(scores(w), scores(swa))
    return {"dataset": name, "train_size": len(x_train), "integer_bits": il, "optimum_loss": f_star,
            "optimum_test_error": 100 * logistic_regression.test_error(w_star, x_test, y_test).item(),
            "formats": [f.spec for f in number_formats],
            "sgd_fp": {"loss": sgd_loss[0], "test_error": sgd_err[0]},
            "swa_fp": {"loss": swa_loss[0], "test_error": swa_err[0]},
            "sgd_lp": {"loss": sgd_loss[1:], "test_error": sgd_err[1:]},
            "swalp": {"loss": swa_loss[1:], "test_error": swa_err[1:]}}


def summary(result):
    """One row per format, then full precision and the optimum."""
    f_star = result["optimum_loss"]
    rows = [{"format": spec, "SGD-LP loss": result["sgd_lp"]["loss"][i], "SWALP loss": result["swalp"]["loss"][i],
             "SWALP / SGD-LP excess": (result["swalp"]["loss"][i] - f_star) / (result["sgd_lp"]["loss"][i] - f_star),
             "SGD-LP err %": result["sgd_lp"]["test_error"][i], "SWALP err %": result["swalp"]["test_error"][i]}
            for i, spec in enumerate(result["formats"])]
    rows.append({"format": "float32", "SGD-LP loss": result["sgd_fp"]["loss"], "SWALP loss": result["swa_fp"]["loss"],
                 "SGD-LP err %": result["sgd_fp"]["test_error"], "SWALP err %": result["swa_fp"]["test_error"]})
    rows.append({"format": "optimum", "SGD-LP loss": f_star, "SGD-LP err %": result["optimum_test_error"]})
    return rows


def plot(result):
    """Excess training loss of SGD-LP and SWALP per format (log scale), as a matplotlib figure."""
    plt = common.pyplot()
    specs, f_star = result["formats"], result["optimum_loss"]
    figure, axes = plt.subplots(figsize=(max(6, 0.9 * len(specs) + 2), 4))
    positions = range(len(specs))
    for offset, key, label, color in ((-0.2, "sgd_lp", "SGD-LP", "tab:orange"), (0.2, "swalp", "SWALP", "tab:blue")):
        axes.bar([p + offset for p in positions], [v - f_star for v in result[key]["loss"]], width=0.4, color=color,
                 label=label)
    for key, label, color in (("sgd_fp", "SGD-FP", "tab:red"), ("swa_fp", "SWA-FP", "tab:green")):
        axes.axhline(result[key]["loss"] - f_star, color=color, linestyle="--", label=label)
    axes.set_yscale("log")
    axes.set_xticks(list(positions), specs, rotation=30)
    axes.set(ylabel="final training loss - optimum",
             title=f"Logistic regression on {result['dataset']}: weights rounded to each format")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=list(DEFAULT_FORMATS),
                        help="train.py's format specs, or fixed<wl> (integer bits from the optimum)")
    parser.add_argument("--data_path", default="data", help="folder holding MNIST/ (else the digits are used)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2.0, help="constant learning rate")
    parser.add_argument("--wd", type=float, default=3e-4, help="L2 regularisation")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--swa_start", type=int, default=30, help="epochs before averaging starts")
    parser.add_argument("--replicates", type=int, default=8, help="independent runs averaged per number")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("experiments", "results", "format_sweep.png"),
                        help="the PNG; the JSON goes next to it")
    args = parser.parse_args(argv)

    began = time.time()
    try:
        result = run(args.formats, args.epochs, args.lr, args.wd, args.batch_size, args.swa_start, args.replicates,
                     args.seed, args.data_path)
    except specs.FormatError as error:
        parser.error(str(error))
    seconds = time.time() - began
    rows = summary(result)
    print(f"{result['dataset']} ({result['train_size']} train), wd {args.wd}, lr {args.lr}, {args.epochs} epochs, "
          f"averaging from epoch {args.swa_start}, mean of {args.replicates} runs ({seconds:.0f} s)")
    print("loss: final training objective; excess: loss - optimum; row float32: SGD-FP and SWA-FP")
    common.report(rows, ".4f", plot(result), args, seconds, result=result)
    return result, rows


if __name__ == "__main__":
    main()
