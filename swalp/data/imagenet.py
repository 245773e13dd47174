"""ImageNet as torchvision ImageFolders: train/ and val/ class folders."""

import os

import torchvision.datasets as datasets
import torchvision.transforms as transforms

from swalp.data import checks
from swalp.data.cifar import permission_denied
from swalp.errors import UserError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_imagenet(data_path):
    """ImageNet as class folders under data_path/train and data_path/val
    (torchvision's ImageFolder): random resized crop 224 and flips for
    training; resize 256 and centre crop 224 for validation."""
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_transform = transforms.Compose([
        transforms.RandomResizedCrop(224),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])
    val_transform = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        normalize,
    ])
    folders = {split: os.path.join(data_path, split) for split in ("train", "val")}
    try:
        train_set = datasets.ImageFolder(folders["train"], transform=train_transform)
        val_set = datasets.ImageFolder(folders["val"], transform=val_transform)
    except PermissionError as error:
        raise UserError(permission_denied(error, "ImageNet")) from None
    except (FileNotFoundError, OSError) as error:
        raise UserError(f"ImageNet needs class folders of images under {folders['train']} and "
                        f"{folders['val']} ({first_line(error)})") from None
    problem = checks.image_folder_problem(train_set, val_set, folders)
    if problem:
        raise UserError(problem)
    return train_set, val_set
