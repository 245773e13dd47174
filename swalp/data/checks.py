"""Checks of loaded data sets before anything is trained or deleted: labels
in range, image shapes and the classes of both splits. Each check returns
None or one message naming the file and the problem.

torchvision verifies the CIFAR files' md5 sums against the official
archives, but loads whatever labels and arrays a file holds; a label
outside the classes would otherwise surface as a traceback from the loss
in the middle of the first epoch.
"""

import os
import pickle

import numpy as np

CIFAR_CLASSES = {"CIFAR10": 10, "CIFAR100": 100}
CIFAR_IMAGE_VALUES = 3 * 32 * 32


def cifar_file_problem(folder, file_names, classes):
    """The first problem found in the pickled CIFAR batches `file_names`
    under `folder`, as '<path>: <problem>', or None."""
    for name in file_names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as handle:
                entry = pickle.load(handle, encoding="latin1")
            images = np.asarray(entry["data"])
            labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
            return f"{path} cannot be read as a CIFAR batch ({type(error).__name__}: {error})"
        if images.ndim != 2 or images.shape[1] != CIFAR_IMAGE_VALUES:
            return (f"{path}: images of shape {list(images.shape[1:])}, CIFAR images have "
                    f"{CIFAR_IMAGE_VALUES} values (3x32x32)")
        if len(labels) != len(images):
            return f"{path}: {len(labels)} labels for {len(images)} images"
        for index, label in enumerate(labels):
            if not isinstance(label, (int, np.integer)) or not 0 <= label < classes:
                return f"{path}: label {label!r} of image {index} is outside the classes 0..{classes - 1}"
    return None


def cifar_problem(dataset, train_set, test_set):
    """What is wrong when the loaded CIFAR sets do not have the data set's
    class count, 32x32x3 images and a label in range for each."""
    folder = os.path.join(train_set.root, train_set.base_folder)
    expected = CIFAR_CLASSES[dataset]
    if len(train_set.classes) != expected:
        return (f"{os.path.join(folder, train_set.meta['filename'])} names {len(train_set.classes)} "
                f"classes, {dataset} has {expected}; put the original {train_set.base_folder} folder "
                f"in {train_set.root}")
    for split_set, files in ((train_set, train_set.train_list), (test_set, test_set.test_list)):
        labels = np.asarray(split_set.targets)
        shape_ok = split_set.data.ndim == 4 and split_set.data.shape[1:] == (32, 32, 3)
        labels_ok = len(labels) == len(split_set.data) and labels.dtype.kind in "iu" and (
            len(labels) == 0 or (labels.min() >= 0 and labels.max() < expected))
        if not (shape_ok and labels_ok):
            problem = cifar_file_problem(folder, [name for name, _ in files], expected)
            return with_remedy(problem or f"{folder}: the images do not match their labels", folder)
    return None


def with_remedy(problem, folder):
    return f"{problem}; put the original file there (or remove {folder} to download it again)"


def image_folder_problem(train_set, val_set, folders):
    """What is wrong when the two ImageFolder splits do not have the same
    classes."""
    if train_set.classes == val_set.classes:
        return None
    only_train = sorted(set(train_set.classes) - set(val_set.classes))
    only_val = sorted(set(val_set.classes) - set(train_set.classes))
    return (f"the class folders of {folders['train']} and {folders['val']} differ: {len(train_set.classes)} and "
            f"{len(val_set.classes)} classes (only in train: {', '.join(only_train[:3]) or 'none'}; only in val: "
            f"{', '.join(only_val[:3]) or 'none'}); both need one folder per class, with the same names")
