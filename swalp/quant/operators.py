"""This package's torch operators (`torch.ops.swalp.*`).

Each is CompositeImplicitAutograd: implemented by torch operations, so it
runs on any device and needs no fake-tensor or autograd code of its own.
Dynamo records a call to one as a single node instead of tracing its Python
operation by operation, which is what makes them worth having; AOTAutograd
then expands the call into those operations, which Inductor fuses as if
they had been written out. torch.library.custom_op would instead keep the
call opaque, out of Inductor's reach.

torch's compile caches on disk (AOTAutograd's, shared by every process)
key a graph by the names of the operators it calls, not by their Python
implementations (pytorch/pytorch#144344): code compiled by one version of
this package would be served to the next, with its old noise or rounding.
So each operator takes one argument more, `sources`, which `call` fills
with a digest of this package's quantization modules, a constant in every
graph: a change to those sources is a new cache key.
"""

import hashlib
import pathlib

import torch

_LIBRARY = torch.library.Library("swalp", "FRAGMENT")


def _digest(folder=pathlib.Path(__file__).parent):
    """The 63-bit digest of every module under `folder` (default swalp.quant): paths and bytes."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


SOURCES = _digest()


def define(schema, implementation):
    """Define `torch.ops.swalp.<name>` by `schema` ("name(arguments) ->
    results", arguments followed by `int sources`), computed by
    `implementation` (of the arguments without `sources`); a second
    definition (the module that defines it imported twice) is skipped."""
    name, _, rest = schema.partition("(")
    arguments, _, results = rest.partition(") ->")
    assert arguments and results, f"schema {schema!r} is not 'name(arguments) -> results'"
    if hasattr(torch.ops.swalp, name):
        return

    def expanded(*given):
        return implementation(*given[:-1])

    _LIBRARY.define(f"{name}({arguments}, int sources) ->{results}")
    _LIBRARY.impl(name, expanded, "CompositeImplicitAutograd")


def call(name, *arguments):
    """torch.ops.swalp.<name>(*arguments, SOURCES)."""
    return getattr(torch.ops.swalp, name)(*arguments, SOURCES)
