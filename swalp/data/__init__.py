"""Data: CIFAR10/100 (`cifar`), ImageNet (`imagenet`), scikit-learn's digits
(`digits`), loading by name (`datasets`), the checks of loaded data
(`checks`), the per-sample loaders (`loaders`), the batched device-resident
loader (`batched`) and tiny CIFAR-format data sets for tests (`fake_cifar`)."""

# The data sets a run can train on (`datasets.load_data` loads one), named here without importing torch.
DATASETS = ("CIFAR10", "CIFAR100", "ImageNet", "digits")
# Their numbers of classes, for building a model before the data are loaded (--list-layers).
CLASSES = {"CIFAR10": 10, "CIFAR100": 100, "ImageNet": 1000, "digits": 10}
