"""CIFAR10 and CIFAR100 through torchvision, checked before anything trains.

The data live under <data_path>/<dataset lower-case>/ (the references'
layout) and are downloaded there when absent. Training data: random crop 32
with padding 4 and horizontal flips; all data normalised by CIFAR's mean and
standard deviation (the references' values).
"""

import os

import torchvision.datasets as datasets
import torchvision.transforms as transforms

from swalp.data import checks
from swalp.errors import UserError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def permission_denied(error, dataset):
    return (f"permission denied reading {error.filename or 'the data'}; make the {dataset} files readable "
            f"by this user or pass another --data_path")


def load_cifar(dataset, data_path):
    """Train (augmented) and test sets of CIFAR10/100 under data_path/<dataset lower>,
    downloaded there when absent, checked (labels, image shapes, classes).
    A failed download leaves no empty folder behind."""
    created = [path for path in (data_path, os.path.join(data_path, dataset.lower())) if not os.path.exists(path)]
    try:
        return _load_cifar(dataset, data_path)
    except UserError:
        for path in reversed(created):
            try:
                os.rmdir(path)  # only if still empty
            except OSError:
                break
        raise


def _load_cifar(dataset, data_path):
    dataset_class = getattr(datasets, dataset)
    root = os.path.join(data_path, dataset.lower())
    folder = os.path.join(root, dataset_class.base_folder)
    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    train_transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])
    test_transform = transforms.Compose([transforms.ToTensor(), normalize])
    try:
        # torchvision takes a folder this user cannot enter for a missing one.
        for path in (data_path, root, folder):
            if os.path.exists(path):
                os.listdir(path)
        # download=True verifies the md5 sums of every file first and only
        # fetches the archive when one is missing or corrupt.
        train_set = dataset_class(root, train=True, transform=train_transform, download=True)
        test_set = dataset_class(root, train=False, transform=test_transform)
    except PermissionError as error:
        raise UserError(permission_denied(error, dataset)) from None
    except OSError as error:
        raise UserError(
            f"{dataset} files in {root} are missing or corrupt and could not be downloaded "
            f"({error}); put the extracted '{dataset_class.base_folder}' folder of the python "
            f"version of {dataset} in {root}"
        ) from None
    except Exception as error:
        files = [name for name, _ in dataset_class.train_list + dataset_class.test_list]
        problem = checks.cifar_file_problem(folder, files, checks.CIFAR_CLASSES[dataset])
        if problem:
            raise UserError(checks.with_remedy(problem, folder)) from None
        raise UserError(f"{dataset} files in {root} cannot be read ({error}); "
                        f"remove {folder} to download them again") from None
    problem = checks.cifar_problem(dataset, train_set, test_set)
    if problem:
        raise UserError(problem)
    return train_set, test_set
