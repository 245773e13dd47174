"""scikit-learn's handwritten digits as a small CIFAR-like data set.

1,797 grey 8x8 images of the digits 0-9 (real data, shipped inside the
scikit-learn package: nothing to download), upsampled to 32x32 and repeated
into 3 channels, so that the CIFAR models and augmentation apply unchanged.
The split is fixed: stratified, 25 % for testing (random_state 0, the same
split as experiments/logistic_regression.py).

`Digits` looks like torchvision's CIFAR10 to the rest of the code: `.data`
a uint8 array N x 32 x 32 x 3, `.targets` a list of ints, `.classes`, and
items (transformed PIL image, target).
"""

import functools

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as transforms
from PIL import Image
from torchvision.datasets import VisionDataset

SIZE = 32
TEST_FRACTION = 0.25
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _split():
    """{True: (images, labels) of the training split, False: the test split},
    images uint8 N x 32 x 32 x 3."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # The 8x8 images hold 0..16; bilinear upsampling keeps the strokes smooth.
    grey = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) * (255 / 16)
    large = F.interpolate(grey, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    images = large.round().clamp(0, 255).to(torch.uint8).squeeze(1).unsqueeze(-1).expand(-1, -1, -1, 3).numpy()
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target)
    return {True: (train_x, train_y), False: (test_x, test_y)}


class Digits(VisionDataset):
    """The training or test split; `root` is unused (the data ships with scikit-learn)."""

    classes = [str(digit) for digit in range(10)]

    def __init__(self, root=None, train=True, transform=None, target_transform=None):
        super().__init__(root, transform=transform, target_transform=target_transform)
        self.train = train
        images, labels = _split()[train]
        self.data = np.ascontiguousarray(images)
        self.targets = [int(label) for label in labels]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image, target = Image.fromarray(self.data[index]), self.targets[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def load_digits():
    """(train set with CIFAR's augmentation, test set): random crop 32 with
    padding 4 and horizontal flips, normalised by the training split's own
    mean and standard deviation (the digits are mostly black, far from
    CIFAR's statistics)."""
    train_set, test_set = Digits(train=True), Digits(train=False)
    pixels = train_set.data[..., 0] / 255.0
    normalize = transforms.Normalize([float(pixels.mean())] * 3, [float(pixels.std())] * 3)
    train_set.transform = transforms.Compose([
        transforms.RandomCrop(SIZE, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])
    test_set.transform = transforms.Compose([transforms.ToTensor(), normalize])
    return train_set, test_set
