"""Tiny CIFAR10/CIFAR100 data sets in the real on-disk format (pickled
batches of the python version), loadable through torchvision.

torchvision checks each file's md5 sum against the real archive's. The files
here are small and fake, so their own sums are written to `md5.json` and
swapped into torchvision's file lists: in the test process by
`patch_torchvision_md5`, in `train.py` subprocesses by the `sitecustomize.py`
written beside the data (put its folder on PYTHONPATH). The integrity check
itself still runs on every file.
"""

import hashlib
import json
import os
import pickle

import numpy as np

LAYOUT = {
    "CIFAR10": {
        "folder": os.path.join("cifar10", "cifar-10-batches-py"),
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "classes": 10,
    },
    "CIFAR100": {
        "folder": os.path.join("cifar100", "cifar-100-python"),
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "classes": 100,
    },
}

# Swaps the sums in once torchvision's CIFAR module is imported, not before:
# a process that never reads CIFAR does not pay seconds for importing torchvision.
SITECUSTOMIZE = '''\
import json, os, sys


def _swap_sums(cifar):
    sums = json.load(open(os.environ["FAKE_CIFAR_MD5"]))
    for cls in (cifar.CIFAR10, cifar.CIFAR100):
        own = sums[cls.__name__]
        cls.train_list = [[name, own[name]] for name, _ in cls.train_list]
        cls.test_list = [[name, own[name]] for name, _ in cls.test_list]
        cls.meta = dict(cls.meta, md5=own[cls.meta["filename"]])


class _AfterCifarImport:
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision.datasets.cifar":
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                run = spec.loader.exec_module

                def exec_module(module):
                    run(module)
                    _swap_sums(module)

                spec.loader.exec_module = exec_module
                return spec
        return None


sys.meta_path.insert(0, _AfterCifarImport())
'''


def _images(rng, labels, classes):
    # A class-dependent brightness so that the data is learnable at all.
    base = (np.asarray(labels, dtype=np.float64) / classes * 160.0)[:, None]
    noise = rng.integers(0, 96, size=(len(labels), 3072))
    return (base + noise).astype(np.uint8)


def _write(path, payload):
    with open(path, "wb") as handle:
        pickle.dump(payload, handle)
    with open(path, "rb") as handle:
        return hashlib.md5(handle.read()).hexdigest()


def write_fake_cifar(root, train_size=40, test_size=20, seed=0):
    """Write both data sets under `root` (the --data_path); return the md5
    sums by data set and file name (also saved as root/md5.json) and write
    root/site/sitecustomize.py."""
    rng = np.random.default_rng(seed)
    sums = {}
    for name, layout in LAYOUT.items():
        folder = os.path.join(root, layout["folder"])
        os.makedirs(folder, exist_ok=True)
        classes = layout["classes"]
        sums[name] = {}
        for split, total in (("train", train_size), ("test", test_size)):
            count = total // len(layout[split])
            for file_name in layout[split]:
                labels = rng.integers(0, classes, size=count).tolist()
                entry = {"batch_label": file_name, "data": _images(rng, labels, classes),
                         "filenames": [f"{file_name}_{i}.png" for i in range(count)]}
                if name == "CIFAR10":
                    entry["labels"] = labels
                else:
                    entry["fine_labels"] = labels
                    entry["coarse_labels"] = [label // 5 for label in labels]
                sums[name][file_name] = _write(os.path.join(folder, file_name), entry)
        if name == "CIFAR10":
            meta = {"label_names": [f"class{i}" for i in range(classes)], "num_cases_per_batch": train_size // 5}
        else:
            meta = {"fine_label_names": [f"fine{i}" for i in range(classes)],
                    "coarse_label_names": [f"coarse{i}" for i in range(20)]}
        sums[name][layout["meta"]] = _write(os.path.join(folder, layout["meta"]), meta)
    with open(os.path.join(root, "md5.json"), "w") as handle:
        json.dump(sums, handle)
    os.makedirs(os.path.join(root, "site"), exist_ok=True)
    with open(os.path.join(root, "site", "sitecustomize.py"), "w") as handle:
        handle.write(SITECUSTOMIZE)
    return sums


def patch_torchvision_md5(monkeypatch, sums):
    from torchvision.datasets import CIFAR10, CIFAR100

    for cls in (CIFAR10, CIFAR100):
        own = sums[cls.__name__]
        monkeypatch.setattr(cls, "train_list", [[n, own[n]] for n, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[n, own[n]] for n, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=own[cls.meta["filename"]]))
