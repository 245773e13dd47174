"""Model registry: each name maps to a small config class (its base network,
as "<module>.<class>" of this package, and its keyword arguments), so adding
a model is one class here. A base is imported only when a model is built:
the command line checks --model before torch loads."""

import importlib


class VGG16:
    base = "vgg.VGG"
    kwargs = {"depth": 16, "batch_norm": False}


class VGG16BN:
    base = "vgg.VGG"
    kwargs = {"depth": 16, "batch_norm": True}


class VGG19:
    base = "vgg.VGG"
    kwargs = {"depth": 19, "batch_norm": False}


class VGG19BN:
    base = "vgg.VGG"
    kwargs = {"depth": 19, "batch_norm": True}


class PreResNet20:
    base = "preresnet.PreResNet"
    kwargs = {"depth": 20}


class PreResNet164:
    base = "preresnet.PreResNet"
    kwargs = {"depth": 164}


class ViT:
    """A vision transformer for 32x32 images: patches of 4, width 192, 6 blocks of 3 heads."""

    base = "vit.VisionTransformer"
    kwargs = {}


class ResNet18:
    """For ImageNet (224x224 inputs); the others are for 32x32 CIFAR images."""

    base = "resnet.ResNet18"
    kwargs = {}


MODELS = {cfg.__name__: cfg for cfg in (VGG16, VGG16BN, VGG19, VGG19BN, PreResNet20, PreResNet164, ViT, ResNet18)}
IMAGENET_MODELS = ("ResNet18",)


def build_model(name, num_classes):
    cfg = MODELS[name]
    module, base = cfg.base.split(".")
    return getattr(importlib.import_module(f"{__name__}.{module}"), base)(num_classes=num_classes, **cfg.kwargs)
