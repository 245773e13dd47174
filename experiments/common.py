"""What the convex experiments share: one thread, and reporting their results."""

import contextlib
import json
import os

import tabulate
import torch


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread (a context manager or a decorator). The
    experiments' tensors are tiny: a second thread only adds synchronisation,
    which on a busy 2-core machine made runs up to 50 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def report(rows, floatfmt, figure, args, seconds, **results):
    """Print the table of `rows`, then write the figure to args.out and the
    arguments, run time, table and `results` as JSON next to it."""
    print(tabulate.tabulate(rows, headers="keys", floatfmt=floatfmt, missingval="-"))
    json_path = save(figure, args.out, {"arguments": vars(args), "seconds": seconds, "table": rows, **results})
    print(f"wrote {args.out} and {json_path}")


def save(figure, png_path, payload):
    """Write the figure to png_path and payload as JSON next to it (same
    name, .json); returns the JSON's path."""
    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    figure.savefig(png_path, dpi=120)
    pyplot().close(figure)
    json_path = os.path.splitext(png_path)[0] + ".json"
    with open(json_path, "w") as handle:
        json.dump(payload, handle, indent=1)
    return json_path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
