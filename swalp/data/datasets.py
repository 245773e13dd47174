"""Which data sets a run can train on, and loading one by name."""

from swalp.data.cifar import load_cifar
from swalp.data.digits import load_digits
from swalp.data.imagenet import load_imagenet
from swalp.errors import UserError
from swalp.run import distributed


def load_data(dataset, data_path):
    """(train set with augmentation, test set, number of classes)."""
    if dataset == "ImageNet":
        train_set, test_set = load_imagenet(data_path)
    elif dataset == "digits":  # bundled with scikit-learn: no data_path
        train_set, test_set = load_digits()
    else:
        train_set, test_set = load_cifar(dataset, data_path)
    return train_set, test_set, len(train_set.classes)


def load_on_every_rank(dataset, data_path, world=distributed.World()):
    """load_data on every rank, rank 0 first (it downloads what is missing
    before the others read it); its UserError is raised on every rank."""
    data = error = None
    if world.main:
        try:
            data = load_data(dataset, data_path)
        except UserError as raised:
            error = str(raised)
    error = distributed.broadcast_object(world, error)
    if error:
        raise UserError(error)
    return data if world.main else load_data(dataset, data_path)
