"""Model registry: each name maps to a small config class (base network and
its keyword arguments), so adding a model is one class here."""

from .preresnet import PreResNet
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


MODELS = {cfg.__name__: cfg for cfg in (VGG16, VGG16BN, VGG19, VGG19BN, PreResNet20, PreResNet164)}


def build_model(name, num_classes):
    cfg = MODELS[name]
    return cfg.base(num_classes=num_classes, **cfg.kwargs)
