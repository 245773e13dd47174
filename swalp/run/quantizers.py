"""A run's rounding from its flags: the backend --quant-backend picks and
one quantizer per number kind, with one-line errors that name the flag."""

from typing import NamedTuple, Optional

from swalp.errors import UserError
from swalp.quant import backends, kinds
from swalp.quant.quantizer import build_quantizers
from swalp.run.distributed import World


class Rounding(NamedTuple):
    """The run's default quantizer per kind (None in full precision), the
    backend of activations and errors and that of the optimizer's kinds (None
    when nothing is rounded), and the backend of formats they lack."""

    quantizers: dict
    backend: Optional[backends.Backend]
    optimizer_backend: Optional[backends.Backend]
    fallback: Optional[backends.Backend]


def choose_quantizers(args, device, noise, world=World()):
    """The run's Rounding on the backend --quant-backend picks (the compiled
    one under --compile), which
    compiles (triton) every kernel the run's formats and layer rules need;
    none is loaded where everything is full precision. Data-parallel
    replicas must round the optimizer's kinds alike, which qtorch's kernels
    (noise from the operating system) cannot: there those use ours."""
    needed = [f for f in args.formats.values() if f is not None]
    needed += [f for rule in args.layer_rules for _, f in rule.formats if f is not None]
    if not needed:
        return Rounding(dict.fromkeys(kinds.NUMBER_KINDS), None, None, None)
    try:
        backend, note = backends.choose_backend("compiled" if args.compile else args.quant_backend, device, needed,
                                                args.rounding)
    except backends.BackendUnavailable as error:
        if args.quant_backend != "qtorch":
            raise UserError(f"--quant-backend {args.quant_backend}: {error}; use --quant-backend torch") from None
        raise UserError(f"--quant-backend qtorch: qtorch's kernels failed to build ({error}); install "
                        f"ninja and a C++ compiler (and nvcc for CUDA), or use --quant-backend torch") from None
    if note:
        print(note)
    optimizer_backend = backend
    if world.distributed and not backend.seedable:
        optimizer_backend = backends.TORCH_BACKEND
        print("data parallel: the optimizer's rounding uses the torch backend, activations and errors qtorch")
    fallback = backends.TORCH_BACKEND if args.quant_backend == "auto" else None
    try:
        quantizers = build_quantizers(args.formats, args.rounding, backend, noise, optimizer_backend, fallback)
        for rule in args.layer_rules:  # refused now, not when the layers are wrapped
            build_quantizers(dict(rule.formats), args.rounding, backend, noise, optimizer_backend, fallback)
    except backends.UnsupportedFormat as error:
        raise UserError(f"--quant-backend {args.quant_backend}: {error}; use --quant-backend torch") from None
    return Rounding(quantizers, backend, optimizer_backend, fallback)
