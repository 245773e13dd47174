"""A run's rounding from its flags: the backend --quant-backend picks and
one quantizer per number kind, with one-line errors that name the flag."""

from swalp.errors import UserError
from swalp.quant import backends, kinds
from swalp.quant.quantizer import build_quantizers
from swalp.run.distributed import World


def choose_quantizers(args, device, noise, world=World()):
    """The quantizers of every kind (None in full precision) on the backend
    --quant-backend picks; none is loaded in full precision. Data-parallel
    replicas must round the optimizer's kinds alike, which qtorch's kernels
    (noise from the operating system) cannot: there those use ours."""
    if all(number_format is None for number_format in args.formats.values()):
        return dict.fromkeys(kinds.NUMBER_KINDS), None
    try:
        backend, note = backends.choose_backend(args.quant_backend, device,
                                               [f for f in args.formats.values() if f is not None], args.rounding)
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
    try:
        return build_quantizers(args.formats, args.rounding, backend, noise, optimizer_backend,
                                fallback=backends.TORCH_BACKEND if args.quant_backend == "auto" else None), backend
    except backends.UnsupportedFormat as error:
        raise UserError(f"--quant-backend {args.quant_backend}: {error}; use --quant-backend torch") from None
