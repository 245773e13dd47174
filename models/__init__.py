"""Model registry: each name maps to a small config class (base network and
its keyword arguments), so adding a model is one class here."""

from .preresnet import PreResNet
from .resnet import ResNet18 as TorchvisionResNet18
from .vgg import VGG


class VGG16:
    base = VGG
    kwargs = {"depth": 16, "batch_norm": False}


class VGG16BN:
    base = VGG
    kwargs = {"depth": 16, "batch_norm": True}


class VGG19:
    base = VGG
    kwargs = {"depth": 19, "batch_norm": False}


class VGG19BN:
    base = VGG
    kwargs = {"depth": 19, "batch_norm": True}


class PreResNet20:
    base = PreResNet
    kwargs = {"depth": 20}


class PreResNet164:
    base = PreResNet
    kwargs = {"depth": 164}


class ResNet18:
    """For ImageNet (224x224 inputs); the others are for 32x32 CIFAR images."""

    base = TorchvisionResNet18
    kwargs = {}


MODELS = {cfg.__name__: cfg for cfg in (VGG16, VGG16BN, VGG19, VGG19BN, PreResNet20, PreResNet164, ResNet18)}
IMAGENET_MODELS = ("ResNet18",)


def build_model(name, num_classes):
    cfg = MODELS[name]
    return cfg.base(num_classes=num_classes, **cfg.kwargs)
