"""SWALP: Stochastic Weight Averaging for Low-Precision Training, as a library.

Low-precision training of any PyTorch network in a few lines: parse a number
format, round a model's activations and errors, wrap its optimizer so that
weights, gradients and momentum are rounded with seeded noise, and average
the low-precision weights with torch's own SWA tools.

    import torch, swalp
    from torch.optim.swa_utils import AveragedModel, SWALR, update_bn

    net = MyNet()
    swa_net = AveragedModel(net)                        # before quantizers: averaged in full precision
    noise = swalp.StepNoise(seed=1)                     # the rounding noise, a function of (seed, step)
    swalp.quantize_model(net, "bfp8", "bfp8", noise=noise)          # activations, errors
    optimizer = swalp.wrap_optimizer(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
                                     weight="bfp8", grad="bfp8", momentum="bfp8", noise=noise)
    ...train; from the SWA phase on: swa_net.update_parameters(net) each epoch...
    update_bn(train_loader, swa_net)

Names are loaded on first use, so that `import swalp` costs nothing until
then. The machinery behind them: `swalp.quant` (formats, kernels, the
quantizer module, the optimizer wrapper), `swalp.data` (CIFAR, ImageNet,
digits, the batched loader) and `swalp.run` (checkpoints, run directories,
distributed helpers, random-generator state, signals).
"""

import importlib

__all__ = [
    "parse_format", "FormatError", "BlockFormat", "FixedFormat", "FloatFormat", "OCPFloatFormat", "MXFormat",
    "NVFP4Format", "NUMBER_KINDS", "BACKENDS", "Backend", "select_backend", "StepNoise", "TensorQuantizer", "Quantizer",
    "quantize_model", "wrap_optimizer", "SeededOptimLP", "LayerRule",
]

# Public name -> (module, attribute).
_WHERE = {
    "parse_format": ("swalp.quant.specs", "parse"),
    "FormatError": ("swalp.quant.specs", "FormatError"),
    **{name: ("swalp.quant.formats", name)
       for name in ("BlockFormat", "FixedFormat", "FloatFormat", "OCPFloatFormat", "MXFormat", "NVFP4Format")},
    **{name: ("swalp.quant.kinds", name) for name in ("NUMBER_KINDS", "BACKENDS")},
    **{name: ("swalp.quant.backends", name) for name in ("Backend", "select_backend")},
    "StepNoise": ("swalp.quant.noise", "StepNoise"),
    **{name: ("swalp.quant.quantizer", name) for name in ("TensorQuantizer", "Quantizer", "quantize_model")},
    **{name: ("swalp.quant.optim", name) for name in ("wrap_optimizer", "SeededOptimLP")},
    "LayerRule": ("swalp.quant.layers", "LayerRule"),
}


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'swalp' has no attribute {name!r}")
    module, attribute = _WHERE[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
