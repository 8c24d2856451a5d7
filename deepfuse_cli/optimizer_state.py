"""T5X Adafactor optimizer state carried into the fused model (``--optimizer-state fuse``).

T5X's Adafactor (``t5x/adafactor.py``) keeps, per parameter, ``v_row``/``v_col`` (factored second
moment over the two largest axes, when the second largest is >= ``min_dim_size_to_factor``), or a
full ``v``, and ``m`` (first moment of the *updates*, with ``beta1``); unused slots are ``(1,)``
zeros. The fused model's first gradients are the sources' scaled (paper, Lemma 1): a parameter
upstream of the averaged output sees ``w_m`` times source m's gradient, the output projection and
its bias see the gradient unscaled. So, per source block:

* second moments are scaled by ``c_m**2`` (``c_m = w_m``; 1 for the output projection/bias), placed
  by the parameter's own rule (block-diagonal, concatenated, ...) with zeros off the diagonal —
  the gradient of a zero off-diagonal block is zero at the fusion point only in expectation, so
  Adafactor starts those entries from its initial zero, as for a fresh parameter;
* a factored source moment is expanded to the full estimate Adafactor uses
  (``v_row x v_col / mean(v_row)``), fused, and re-factored for the fused shape by averaging over
  the reduced axis, exactly as Adafactor's row/column statistics are defined;
* ``m`` is not scaled: Adafactor's update ``g / sqrt(v)`` is invariant to the gradient's scale.

The factoring threshold is not stored in a checkpoint; it is inferred from which source parameters
are factored (T5X's default 128 when the states allow it), and the fused shapes are factored as
Adafactor would factor them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .compute import compute_tensor
from .errors import InputError

LEAVES = ("m", "v", "v_col", "v_row")
PREFIX = "state/param_states/"
DEFAULT_MIN_DIM = 128


@dataclass(frozen=True)
class StateEntry:
    name: str  # state/param_states/<param path>/<leaf>
    param: str  # the plan entry (target/<param path>)
    leaf: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def state_name(param: str, leaf: str) -> str:
    return PREFIX + param.split("/", 1)[1] + "/" + leaf


def factored_dims(shape: tuple[int, ...], min_dim: int) -> tuple[int, int] | None:
    """(d1, d0) as T5X's heuristic picks them: the second largest and the largest axis."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < min_dim:
        return None
    return int(order[-2]), int(order[-1])


def _is_factored(state: dict) -> bool:
    """Adafactor keeps v_row/v_col (and a (1,) placeholder v) for a factored parameter."""
    return tuple(state["v"].shape) == (1,) and tuple(state["v_row"].shape) != (1,)


def infer_min_dim(param_shapes: dict[str, tuple[int, ...]], states: dict[str, dict], origin: str) -> int:
    """The smallest ``min_dim_size_to_factor`` consistent with which parameters are factored."""
    low, high = 1, math.inf
    for name, shape in param_shapes.items():
        if len(shape) < 2 or name not in states:
            continue
        second = sorted(shape)[-2]
        if _is_factored(states[name]):
            high = min(high, second)
        else:
            low = max(low, second + 1)
    if low > high:
        raise InputError(f"{origin}: the optimizer state is factored in a way T5X's default rule does not explain "
                         "(a factor_map?)", "use --optimizer-state drop")
    return int(min(max(DEFAULT_MIN_DIM, low), high))


def full_second_moment(shape: tuple[int, ...], state: dict[str, torch.Tensor], min_dim: int) -> torch.Tensor:
    """The per-entry second-moment estimate Adafactor uses for this source parameter (fp32)."""
    v = state["v"].float()
    if tuple(v.shape) == tuple(shape):
        return v
    dims = factored_dims(shape, min_dim)
    if dims is None:
        raise ValueError(f"second moment of shape {list(v.shape)} for a parameter of shape {list(shape)}")
    d1, d0 = dims
    vr, vc = state["v_row"].float(), state["v_col"].float()
    reduced_d1 = d1 - (1 if d0 < d1 else 0)
    mean = vr.mean(dim=reduced_d1, keepdim=True)
    return vr.unsqueeze(d0) * vc.unsqueeze(d1) / mean.unsqueeze(d0)


def fused_leaves(shape: tuple[int, ...], min_dim: int, full_v: torch.Tensor | None, m: torch.Tensor | None
                 ) -> dict[str, torch.Tensor]:
    """The four Adafactor slots of a fused parameter from its full second moment and momentum."""
    zero = torch.zeros((1,), dtype=torch.float32)
    out = {"m": m if m is not None else zero.clone(), "v": zero.clone(), "v_row": zero.clone(), "v_col": zero.clone()}
    dims = factored_dims(shape, min_dim)
    v = full_v if full_v is not None else torch.zeros(shape, dtype=torch.float32)
    if dims is None:
        out["v"] = v.contiguous()
    else:
        d1, d0 = dims
        out["v_row"] = v.mean(dim=d0).contiguous()
        out["v_col"] = v.mean(dim=d1).contiguous()
    return out


def leaf_shapes(shape: tuple[int, ...], min_dim: int, momentum: bool) -> dict[str, tuple[int, ...]]:
    dims = factored_dims(shape, min_dim)
    out = {"m": tuple(shape) if momentum else (1,), "v": (1,), "v_row": (1,), "v_col": (1,)}
    if dims is None:
        out["v"] = tuple(shape)
    else:
        d1, d0 = dims
        out["v_row"] = tuple(np.delete(shape, d0).tolist())
        out["v_col"] = tuple(np.delete(shape, d1).tolist())
    return out


class StatePlan:
    """Which state tensors the fused checkpoint gets and how each is computed."""

    def __init__(self, plan):
        self.plan = plan
        self.entries: list[StateEntry] = []
        self.min_dim = DEFAULT_MIN_DIM
        self._states: list[dict[str, dict]] = []  # per source: param -> {leaf: TensorRef}
        self._momentum = False
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None
        self._params = {e.name: e for e in plan.entries}

    @classmethod
    def build(cls, plan) -> StatePlan:
        sp = cls(plan)
        sources = plan.sources
        for m, ck in enumerate(sources):
            raw = ck.metadata.get("optimizer_state") or {}
            if not raw:
                raise InputError(f"source {m + 1} ({ck.path}) has no optimizer state to fuse",
                                 "use --optimizer-state drop, or sources saved with their optimizer state")
            per: dict[str, dict] = {}
            for name, ref in raw.items():
                if not name.startswith(PREFIX):
                    continue
                path, leaf = name[len(PREFIX):].rsplit("/", 1)
                if leaf not in LEAVES:
                    raise InputError(f"{ck.path}: optimizer state {name!r} is not T5X Adafactor's (v_row, v_col, v, m)",
                                     "only Adafactor state is fused; use --optimizer-state drop")
                per.setdefault("target/" + path, {})[leaf] = ref
            sp._states.append(per)
        first = sp._states[0]
        origin = str(sources[0].path)
        shapes = {e.name: e.source_shapes[0] for e in plan.entries}
        sp.min_dim = infer_min_dim(shapes, first, origin)
        sp._momentum = any(tuple(st["m"].shape) != (1,) for st in first.values() if "m" in st)
        for e in plan.entries:
            for leaf, shape in sorted(leaf_shapes(e.shape, sp.min_dim, sp._momentum).items()):
                sp.entries.append(StateEntry(state_name(e.name, leaf), e.name, leaf, shape))
        return sp

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def compute(self, entry: StateEntry) -> torch.Tensor:
        if self._cache is None or self._cache[0] != entry.param:
            self._cache = (entry.param, self._compute_param(entry.param))
        return self._cache[1][entry.leaf]

    def _compute_param(self, param: str) -> dict[str, torch.Tensor]:
        plan = self.plan
        pe = self._params[param]
        n = plan.n
        states = [s.get(param) for s in self._states]
        structural = replace(pe, noise=False, scales=[1.0] * n if pe.scales is not None else None, dtype=torch.float32)
        if any(st is None or set(st) != set(LEAVES) for st in states):
            # e.g. the projection a tied source never had: Adafactor's initial state
            return fused_leaves(pe.shape, self.min_dim, None, None)
        loaded = [{k: ref.load() for k, ref in st.items()} for st in states]
        if plan.options.convert_only:  # one source, nothing widened: carried bit for bit
            return {k: v.contiguous() for k, v in loaded[0].items()}
        unscaled = not pe.rule.fusion_op.scales_gradients  # at (or after) the averaging
        vs = []
        for m in range(n):
            try:
                v = full_second_moment(pe.source_shapes[m], loaded[m], self.min_dim)
            except ValueError as exc:
                raise InputError(f"{plan.sources[m].path}: optimizer state of {param!r}: {exc}",
                                 "use --optimizer-state drop") from None
            c = 1.0 if unscaled else plan.options.weights[m]
            vs.append(v * (c * c))
        full_v = compute_tensor(plan, structural, vs)
        m_full = None
        if self._momentum:
            ms = [st["m"].float() for st in loaded]
            if all(tuple(t.shape) == tuple(pe.source_shapes[i]) for i, t in enumerate(ms)):
                m_full = compute_tensor(plan, structural, ms)
        return fused_leaves(pe.shape, self.min_dim, full_v, m_full)
