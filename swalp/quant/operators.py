"""This package's torch operators (`torch.ops.swalp.*`).

Each is CompositeImplicitAutograd: implemented by torch operations, so it
runs on any device and needs no fake-tensor or autograd code of its own.
Dynamo records a call to one as a single node instead of tracing its Python
operation by operation, which is what makes them worth having; AOTAutograd
then expands the call into those operations, which Inductor fuses as if
they had been written out. torch.library.custom_op would instead keep the
call opaque, out of Inductor's reach.
"""

import torch

_LIBRARY = torch.library.Library("swalp", "FRAGMENT")


def define(schema, implementation):
    """Define `torch.ops.swalp.<name>` by `schema` ("name(arguments) ->
    results"), computed by `implementation`; a second definition (the
    module that defines it imported twice) is skipped."""
    name = schema.split("(", 1)[0]
    if not hasattr(torch.ops.swalp, name):
        _LIBRARY.define(schema)
        _LIBRARY.impl(name, implementation, "CompositeImplicitAutograd")
