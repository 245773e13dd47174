"""What both convex experiments need: one thread, and writing their results."""

import contextlib
import json
import os

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
