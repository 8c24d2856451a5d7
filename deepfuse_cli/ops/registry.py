"""The fusion-op registry: one typed entry per op, looked up by the name a rule gives.

An op is a small object (one module per op, registered with :func:`register`) that knows its
rule checks, its fused shape, and ONE way to compute its value: as consecutive row blocks
(slabs along axis 0)::

    fused tensor          rows(...) yields
    +-------------+
    |  rows 0..k  |  ->   block 1
    |  rows k..2k |  ->   block 2       the whole value, wherever needed, is these blocks
    |     ...     |  ->   ...           gathered in order
    +-------------+

Ops know nothing of names, files or formats: a rule is read through :class:`RuleView` (what
``rules.schema.Rule`` provides), everything else comes in a :class:`FuseContext`.

Adding an op: a module in this package with a :class:`FusionOp` subclass decorated with
:func:`register`, and its import in ``__init__``. Rules files can then name it; the schema, the
plan, the fuse loop and the optimizer state read everything else from the op.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

import torch

from .common import Shape, Tensor, fused_shape
from .noise import OffDiagonalNoise
from .ring import BufferRing


class RuleView(Protocol):
    """What an op reads of the rule that chose it."""

    @property
    def axes(self) -> list[str]: ...  # the role of every axis

    @property
    def widened_axes(self) -> list[int]: ...  # indices of the widened axes, ascending

    @property
    def input_axis(self) -> int | None: ...

    @property
    def parts(self) -> int | list[str] | None: ...  # a count of equal parts, or each part's widened role


@dataclass(frozen=True)
class FuseContext:
    """Everything an op needs besides its sources and rule.

    ``weights``: w_m, summing to 1. ``scales``: per-source factors of an output projection
    (w_m times the source's output scale), or of an op that ``takes_scales`` (one per source, else None). ``noise``: off-diagonal noise, None for zeros.
    ``ring``: buffers the row blocks may live in (a fresh small ring when None); ``pool``: a
    thread on which noise of later block rows may be drawn ahead. ``chunk_bytes``: row-block
    size (default ``CHUNK_BYTES``). ``part_sizes``: for a rule whose ``parts`` name roles, the size
    of each part in each source (``part_sizes[m][p]``), from the sources' configs.
    """

    dtype: torch.dtype
    weights: Sequence[float] = ()
    scales: Sequence[float] | None = None
    noise: OffDiagonalNoise | None = None
    ring: BufferRing | None = None
    pool: Executor | None = None
    chunk_bytes: int | None = None
    part_sizes: Sequence[Sequence[int]] | None = None

    def buffers(self) -> BufferRing:
        return self.ring or BufferRing()


class FusionOp(ABC):
    """One fusion op. Subclasses set the class attributes and implement :meth:`rows`."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line, shown by ``deepfuse rules show``
    #: how many widened axes its rule must have (None: ``check`` decides)
    widened_count: ClassVar[int | None] = None
    #: the rule fields the op reads besides ``axes`` (others must be left unset)
    takes_input_axis: ClassVar[bool] = False
    takes_parts: ClassVar[bool] = False
    #: the fused parameter's gradient is source m's scaled by w_m (it lies upstream of the averaged
    #: output); False at and after the averaging (optimizer state is then carried unscaled)
    scales_gradients: ClassVar[bool] = True
    #: the op averages the sources' outputs: ``FuseContext.scales`` holds w_m x output scale m
    averages_outputs: ClassVar[bool] = False
    #: each source's block may be scaled by its own factor (``FuseContext.scales``): a rule's
    #: ``runtime_scale`` (a tensor the runtime multiplies by a width-dependent factor)
    takes_scales: ClassVar[bool] = False
    #: tensors of any dtype are accepted (copied, never computed); else floating point only
    any_dtype: ClassVar[bool] = False

    def check(self, rule: RuleView) -> None:
        """Refuse a rule this op cannot execute (ValueError with the reason); by default, one
        without exactly ``widened_count`` widened axes."""
        self.require_widened(rule)

    def shape(self, shapes: Sequence[Sequence[int]], rule: RuleView) -> Shape:
        """The fused shape for these source shapes; :class:`FusionMismatch` when they cannot fuse."""
        return fused_shape(shapes, rule.widened_axes)

    @abstractmethod
    def rows(self, tensors: Sequence[Tensor], rule: RuleView, ctx: FuseContext) -> Iterator[Tensor]:
        """The fused value as consecutive row blocks, in ``ctx.dtype``.

        Blocks may live in ``ctx.ring``'s buffers (the consumer is done with a block before asking
        for ``count - 1`` more). Checks of the sources' values (an identical passthrough) are made
        before this returns, so that a mismatch is known before the first block."""

    def require_widened(self, rule: RuleView) -> list[int]:
        """The rule's widened axes, refused unless there are exactly ``widened_count``."""
        widened, count = rule.widened_axes, self.widened_count
        if count is not None and len(widened) != count:
            need = "takes no widened axis" if count == 0 else \
                f"needs exactly {count} widened {'axis' if count == 1 else 'axes'}"
            raise ValueError(f"{self.name} {need}, axes {rule.axes} have {len(widened)}")
        return widened


#: Every op, by name, in registration order.
OPS: dict[str, FusionOp] = {}

Op = TypeVar("Op", bound=type[FusionOp])


def register(cls: Op) -> Op:
    """Class decorator: add one instance of ``cls`` to :data:`OPS` under ``cls.name``."""
    if cls.name in OPS:
        raise ValueError(f"fusion op {cls.name!r} is registered twice")
    OPS[cls.name] = cls()
    return cls


def get(name: str) -> FusionOp:
    """The op called ``name`` (KeyError naming the known ops otherwise)."""
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown fusion op {name!r}; known ops: {', '.join(OPS)}") from None
