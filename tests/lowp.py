"""Low precision attached as train.py attaches it, for tests of the parts."""

import torch

import swalp
from swalp.quant.formats import BlockFormat
from swalp.quant.kinds import NUMBER_KINDS


def word_lengths(**lengths):
    """{kind: BlockFormat(wl) or None}: `lengths` as --wl-<kind> flags (other kinds full precision)."""
    return {kind: BlockFormat(lengths[kind]) if lengths.get(kind, -1) != -1 else None for kind in NUMBER_KINDS}


def insert_quantizers(net, activation_quant, error_quant, placement):
    """Quantizers after the model's own sites for `placement`; returns their number."""
    return len(swalp.quantize_model(net, activation_quant, error_quant, sites=net.quantizer_sites(placement)))


def make_optimizer(net, quantizers, lr, momentum, weight_decay, noise):
    """SGD over `net` with the optimizer's kinds of `quantizers` (from build_quantizers)."""
    sgd = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return swalp.wrap_optimizer(sgd, weight=quantizers["weight"], grad=quantizers["grad"],
                                momentum=quantizers["momentum"], acc=quantizers["acc"], noise=noise)
