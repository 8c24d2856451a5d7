"""The plan: every output tensor with its rule, sources, fused shape, dtype and bytes.

Computed from the sources' metadata only (no tensor data is read, except to decide whether a
present output projection is tied to the embedding), before any byte is written. All
validation of the sources happens here: same family and tensor names, config fields that must
agree, one rule per tensor, shapes on shared axes (the options were validated when
``options.FuseOptions`` was made). ``fuse`` executes a plan.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .architectures import Family, family_of
from . import ops as fusion_ops
from .convert import IDENTITY, Conversion, conversion_for, output_config
from .errors import InputError, UsageError
from .formats import registry as formats
from .formats.registry import naming_of
from .grouped_norm import GROUPS_KEY, HEAD_NORMS_FILE, HEAD_NORMS_KEY, ROLE_GROUPS_KEY
from .grouped_router import MOE_EXPERTS_KEY, MOE_TOP_K_KEY  # each source's experts and top-k, in config.json
from .ir import Checkpoint, TensorRef, dtype_size
from .ops import FusionMismatch
from .options import DTYPES, FuseOptions  # noqa: F401  (both also imported from here, as before)
from .plan_record import NoiseRecord, PlanRecord, TensorRecord
from .rules.engine import RuleSet, preset_digest, preset_for_config
from .rules.expr import evaluate
from .rules.schema import WIDENED_ROLES, Preset, Rule

BASE_MEMORY = 400 * 2**20  # interpreter, torch and libraries
MIN_NOISE_AHEAD = 8 * 2**20  # below this, noise on the second core stops paying for itself
STREAM_BUFFERS = 64 * 2**20  # streaming writes: staging buffers, noise pieces, queues


#: the most copies a self-fusion makes: far wider than any useful model, and small enough that the
#: per-source lists of a plan stay small (a huge K is refused before anything is built for it)
MAX_COPIES = 1024


def check_copies(times: int) -> None:
    """Refuse a self-fusion ``--times`` outside 2..MAX_COPIES."""
    if not 2 <= times <= MAX_COPIES:
        raise UsageError(f"--times {times}: self-fusion needs K >= 2 copies (at most {MAX_COPIES})",
                         "choose the number of copies K, e.g. --times 2")


@dataclass
class PlanEntry:
    name: str
    rule_index: int
    rule: Rule
    source_shapes: list[tuple[int, ...]]
    source_dtypes: list[torch.dtype]
    shape: tuple[int, ...]
    dtype: torch.dtype
    noise: bool  # off-diagonal noise applies to this tensor
    scales: list[float] | None = None  # ops that average outputs: w_m * output_scale_m
    part_sizes: list[list[int]] | None = None  # parts named by role: each part's size in each source
    #: per-source tensors when they are not the sources' tensors of this name: a mixture-of-experts
    #: expert comes from one source's expert (renumbered) and zeros for every other source
    refs: list[TensorRef] | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * dtype_size(self.dtype)

    @property
    def source_bytes(self) -> int:
        total = 0
        for shape, dt in zip(self.source_shapes, self.source_dtypes, strict=True):
            n = 1
            for s in shape:
                n *= s
            total += n * dtype_size(dt)
        return total

    def record(self) -> TensorRecord:
        return TensorRecord(name=self.name, rule=self.rule_index, pattern=self.rule.pattern, op=self.rule.op,
                            axes=list(self.rule.axes), source_shapes=[list(s) for s in self.source_shapes],
                            shape=list(self.shape), dtype=str(self.dtype).removeprefix("torch."), bytes=self.nbytes,
                            noise=self.noise)

    def to_json(self) -> dict[str, Any]:
        return self.record().model_dump(mode="json")


@dataclass
class Plan:
    sources: list[Checkpoint]
    preset: Preset
    options: FuseOptions
    entries: list[PlanEntry]
    tensors: list[dict[str, TensorRef]]  # per source: name -> ref (output projection virtualised)
    config: dict[str, Any] | None
    norm_groups: list[int]
    output_scales: list[float]
    tied: list[bool]
    weights_rescaled: bool = False
    notes: list[str] = field(default_factory=list)
    nonfinite: list[dict[str, Any]] = field(default_factory=list)  # filled while fusing (--allow-nonfinite)
    deviations: list[str] = field(default_factory=list)  # the family's runtime is not the average of these sources
    output_format: str = formats.HUGGING_FACE.name  # registered name of the output's format adapter
    conversion: Conversion = IDENTITY  # plan names -> the output format's names and layout
    output_config: dict[str, Any] | None = None  # config.json (HF) or T5X dimensions (gin) of the output
    state: Any = None  # optimizer_state.StatePlan when the optimizer state is fused
    noise_ahead_bytes: int = fusion_ops.NOISE_AHEAD_BYTES  # noise drawn ahead on the second core (streaming)
    #: --norm prop: per widened role of a norm, the sources' widths (OLMo 2: hidden, heads, kv)
    norm_role_groups: dict[str, list[int]] = field(default_factory=dict)
    #: per-head norms (rules with ``per_head``): tensor name -> heads of each source, written per head
    #: beside the weights (``grouped_norm.HEAD_NORMS_FILE``) when the sources differ
    head_norms: dict[str, list[int]] = field(default_factory=dict)

    @property
    def writes_head_norms(self) -> bool:
        """The per-head norm file is written: per-head norms, and sources that may differ."""
        return bool(self.head_norms) and self.n > 1 and not self.options.self_fusion and not self.options.convert_only

    @property
    def n(self) -> int:
        return len(self.sources)

    def source_refs(self, entry: PlanEntry) -> list[TensorRef]:
        """The n source tensors ``entry`` is fused from, in source order."""
        if entry.refs is not None:
            return entry.refs
        return [self.tensors[m][entry.name] for m in range(self.n)]

    @property
    def family(self) -> Family:
        return family_of(self.preset)

    @property
    def output_adapter(self) -> formats.FormatAdapter:
        """The adapter that writes the output."""
        return formats.get(self.output_format)

    @property
    def sources_have_optimizer_state(self) -> bool:
        return any(ck.metadata.get("optimizer_state") for ck in self.sources)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((e.nbytes for e in self.entries), default=0)

    @property
    def peak_memory(self) -> int:
        """Upper estimate of resident memory: the worst moment, plus a base.

        Every tensor is computed as row blocks on a worker thread while the next tensor's sources
        are loaded (the sources of two tensors, the row-block buffers, noise of later block rows
        drawn ahead). Then the writer holds what its format adapter says (``writer_memory``:
        nothing more when it streams the blocks, slabs or the whole tensor and its encoded copies
        when it gathers them). A conversion that transposes a tensor needs it whole, and its
        transposed copy. Sources of a compressed format are decoded from a compressed copy (held
        while the tensor is read).
        """
        writer = self.output_adapter
        transposed = self.conversion.transpose
        compressed_sources = any(formats.for_checkpoint(ck).compressed for ck in self.sources)
        worst, previous = 0, 0
        for e in self.entries:
            loaded = e.source_bytes // self.n if self.options.self_fusion else e.source_bytes
            numel = e.nbytes // dtype_size(e.dtype)
            row = e.nbytes // e.shape[0] if e.shape and e.shape[0] else e.nbytes
            work = previous + loaded + (fusion_ops.BLOCKS_AHEAD + 3) * max(fusion_ops.CHUNK_BYTES, row)
            work += STREAM_BUFFERS
            if compressed_sources:
                work += loaded
            if e.noise:  # drawn ahead, and as many kept for reuse
                work += 2 * min(self.noise_ahead_bytes, 4 * numel)
            whole = e.name in transposed
            if whole:  # gathered, then transposed
                work += 2 * e.nbytes
            work += writer.writer_memory(e.shape, dtype_size(e.dtype), whole)
            previous = loaded
            worst = max(worst, work)
        for se in (self.state.entries if self.state is not None else []):
            worst = max(worst, 3 * se.nbytes + STREAM_BUFFERS)  # sources' slots, the fused slot, encoded
        return worst + BASE_MEMORY

    def fit_memory(self, limit: int) -> None:
        """Make the run's memory estimate fit ``limit`` (less noise drawn ahead), or refuse."""
        while self.peak_memory > limit and self.noise_ahead_bytes > MIN_NOISE_AHEAD:
            self.noise_ahead_bytes = max(MIN_NOISE_AHEAD, self.noise_ahead_bytes // 2)
        if self.peak_memory > limit:
            mib = 2**20
            raise UsageError(f"the run needs about {self.peak_memory / mib:.0f} MiB of memory at its peak, more than "
                             f"--max-memory {limit / mib:.0f} MiB",
                             "raise --max-memory: the floor is ~400 MiB of runtime plus two consecutive source tensors, "
                             "and a few chunk slabs (T5X output) or twice the largest fused tensor (Orbax output)")

    @property
    def disk_needed(self) -> int:
        extra = sum(p.stat().st_size for p in self.sources[0].extra_files if p.exists())
        state = self.state.total_bytes if self.state is not None else 0
        return self.total_bytes + state + extra + 2**20 * (1 + len(self.entries) // 1000)

    def digest(self) -> str:
        data = json.dumps([e.to_json() for e in self.entries], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()

    def record(self) -> PlanRecord:
        """The plan as data (what ``deepfuse plan --json`` prints)."""
        return PlanRecord(
            preset=self.preset.name, preset_digest=preset_digest(self.preset), output_format=self.output_format,
            sources=[str(s.path) for s in self.sources], n=self.n, self_fusion=self.options.self_fusion,
            weights=list(self.options.weights), weights_rescaled=self.weights_rescaled, norm=self.options.norm,
            norm_groups=self.norm_groups, noise=NoiseRecord(**self.options.describe_noise()), seed=self.options.seed,
            tied_sources=self.tied, output_scales=self.output_scales, tensors=[e.record() for e in self.entries],
            total_bytes=self.total_bytes, largest_tensor_bytes=self.largest_tensor_bytes,
            peak_memory_bytes=self.peak_memory, disk_needed_bytes=self.disk_needed, notes=self.notes)

    def to_json(self) -> dict[str, Any]:
        return self.record().to_json()


def _origin(ck: Checkpoint, m: int) -> str:
    return f"source {m + 1} ({ck.path})"


def _is_tied(refs: dict[str, TensorRef], output: str, embedding: str, transpose: bool = False) -> bool:
    if output not in refs:
        return True
    a, b = refs[output], refs[embedding]
    if a.shape != (tuple(reversed(b.shape)) if transpose else b.shape):
        return False
    emb = b.load()
    return bool(torch.equal(a.load(), emb.t() if transpose else emb))


def virtualise_output(ck: Checkpoint, m: int, preset: Preset) -> tuple[dict[str, TensorRef], bool]:
    """The source's tensors with the output projection present (tied sources: the embedding), and the
    head's other tied tensors (``also_tied``) where the files leave them out."""
    refs = dict(ck.tensors)
    spec = preset.output
    if spec is None:
        return refs, False
    if spec.when_present is not None and spec.when_present not in refs:
        return refs, False  # the source has no such head (a bare encoder, a classification head)
    if spec.tied_to is None or spec.tied_to not in refs:
        return refs, False  # nothing to tie to: the rules will say if the output is missing
    for also in spec.also_tied:
        if also.name not in refs and also.tied_to in refs:
            ref = refs[also.tied_to]
            refs[also.name] = TensorRef(name=also.name, shape=ref.shape, dtype=ref.dtype, loader=ref.loader,
                                        source=f"{ref.source} (tied to {also.tied_to})")
    tied = _is_tied(refs, spec.name, spec.tied_to, spec.transpose)
    if tied:
        emb = refs[spec.tied_to]
        shape, loader = emb.shape, emb.loader
        if spec.transpose:
            shape = tuple(reversed(emb.shape))
            loader = lambda emb=emb: emb.load().t()  # noqa: E731
        refs[spec.name] = TensorRef(name=spec.name, shape=shape, dtype=emb.dtype, loader=loader,
                                    source=f"{emb.source} (tied to {spec.tied_to})")
    return refs, tied


def resolve_preset(sources: list[Checkpoint], rules: Preset | None) -> Preset:
    """The family's rules in the sources' naming: the given rules, or the preset their config names."""
    naming = naming_of(sources[0])
    for m, ck in enumerate(sources[1:], start=1):
        if naming_of(ck) != naming:
            raise InputError(f"{_origin(ck, m)} uses {naming_of(ck)} names but {_origin(sources[0], 0)} uses {naming}",
                             "convert one of them first (deepfuse convert --to ...)")
    if rules is None:
        presets = [preset_for_config(ck.config, _origin(ck, m)) for m, ck in enumerate(sources)]
        for m, p in enumerate(presets[1:], start=1):
            if p.name != presets[0].name:
                raise InputError(
                    f"{_origin(sources[m], m)} is a {p.name} model but {_origin(sources[0], 0)} is {presets[0].name}",
                    "all sources must share one architecture family",
                )
        rules = presets[0]
    else:
        check_model_types(sources, rules)
    return rules.for_naming(naming) if naming != rules.naming and naming in rules.namings else rules


def check_model_types(sources: list[Checkpoint], rules: Preset) -> None:
    """Rules given by name or file serve the ``model_type`` values they list: a source whose config.json
    names another one is refused (a preset for one family silently misreads another's tensors). Rules
    that list no model_type (a user's file) serve any source, and so does a source without one."""
    if not rules.model_types:
        return
    for m, ck in enumerate(sources):
        model_type = (ck.config or {}).get("model_type")
        if isinstance(model_type, str) and model_type not in rules.model_types:
            raise InputError(
                f"{_origin(ck, m)} is a {model_type!r} model (config.json model_type) but rules {rules.name!r} "
                f"serve model_type {', '.join(repr(t) for t in rules.model_types)}",
                f"leave out --rules to use the family's preset, or use a rules file that lists {model_type!r} "
                "in its model_types",
            )


def source_configs(sources: list[Checkpoint], family: Family) -> list[dict | None]:
    """Each source's config in the family's config vocabulary."""
    return [family.canonical_config(ck.config, naming_of(ck)) for ck in sources]


def check_configs(sources: list[Checkpoint], family: Family, configs: list[dict | None], fusing: bool = True) -> None:
    spec = family.preset.config
    if spec is None:
        return
    if all(c is None for c in configs):
        return
    for m, (ck, c) in enumerate(zip(sources, configs, strict=True)):
        if c is None:
            raise InputError(f"{_origin(ck, m)} has no config.json but other sources do",
                             "give model directories for every source")
        family.check_sizes(c, f"{_origin(ck, m)} config")  # before any arithmetic on them
    views = [family.view(c) for c in configs]
    for text, reason in (spec.refuse.items() if fusing else ()):
        for m, v in enumerate(views):
            if evaluate(text, v):
                raise InputError(f"{_origin(sources[m], m)}: no fused {family.name} model computes this source's "
                                 f"function: {reason}",
                                 f"no exact wider form exists for {family.name} checkpoints with {text} (config.json)")
    for key in spec.equal:
        ref = views[0].get(key)
        for m, v in enumerate(views[1:], start=1):
            if v.get(key) != ref:
                raise InputError(
                    f"sources differ in {family.field_label(key, naming_of(sources[0]))}: {_origin(sources[0], 0)} has "
                    f"{ref!r}, {_origin(sources[m], m)} has {v.get(key)!r}",
                    "only models of one architecture (same vocabulary, depth, head size, ...) can be fused",
                )
    for key in spec.sum:
        for m, v in enumerate(views):
            if v.get(key) is None:
                raise InputError(f"{_origin(sources[m], m)}: config.json has no {key}, which the fused config must widen",
                                 "re-save the model with save_pretrained, or fix config.json")
            if not isinstance(v.get(key), int) or isinstance(v.get(key), bool):
                raise InputError(f"{_origin(sources[m], m)}: config.json field {key} is {v.get(key)!r}, expected an integer")


def check_widths(sources: list[Checkpoint], family: Family, configs: list[dict | None], entries: list[PlanEntry]) -> None:
    """Every widened axis of every tensor has the size the source's config gives that role (a config
    that lies about the model's widths would produce a fused config no runtime loads)."""
    spec = family.preset.config
    if spec is None or not spec.width_expressions():
        return
    for m, (ck, c) in enumerate(zip(sources, configs, strict=True)):
        if c is None:
            continue
        widths = family.widths(c)
        for e in entries:
            for ax, role in enumerate(e.rule.axes):
                want = widths.get(role)
                if want is None:
                    continue
                got = e.source_shapes[m][ax]
                if got != want:
                    text = spec.width_expressions()[role]
                    raise InputError(f"{_origin(ck, m)}: tensor {e.name!r} axis {ax} ({role}) has {got} entries, but "
                                     f"config.json gives {text} = {want}",
                                     "config.json does not describe these weights: fix it or use the model's own config")


def widen_config(sources: list[Checkpoint], family: Family, configs: list[dict | None], options: FuseOptions,
                 groups: list[int], role_groups: dict[str, list[int]] | None = None,
                 head_norms: bool = False) -> dict | None:
    spec = family.preset.config
    base = configs[0]
    if base is None:
        return None
    views = [family.view(c) for c in configs]
    out = dict(base)
    if spec is not None:
        for key in spec.sum:
            if key in views[0]:
                out[key] = sum(v[key] for v in views)
        for key in spec.write:
            if key in views[0] and key not in spec.sum:
                out[key] = views[0][key]
        if not options.convert_only:
            out.update(spec.set)
    if options.dtype is not None:
        name = str(options.dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in out:
                out[key] = name
    for key in (GROUPS_KEY, "deepfuse_norm_mode", ROLE_GROUPS_KEY, HEAD_NORMS_KEY):
        out.pop(key, None)
    moe = family.preset.moe
    for key in (MOE_EXPERTS_KEY, MOE_TOP_K_KEY):
        out.pop(key, None)
    if moe is not None and not options.convert_only:
        out[MOE_EXPERTS_KEY] = [int(evaluate(moe.experts, v)) for v in views]
        out[MOE_TOP_K_KEY] = [int(evaluate(moe.top_k, v)) for v in views]
    if options.norm == "prop":
        out["deepfuse_norm_mode"] = "prop"
        out[GROUPS_KEY] = groups
        others = {role: g for role, g in (role_groups or {}).items() if role != "hidden"}
        if others:  # norms over other widths (OLMo 2's q_norm/k_norm): their groups, by role
            out[ROLE_GROUPS_KEY] = others
        if head_norms:
            out[HEAD_NORMS_KEY] = HEAD_NORMS_FILE
    return out


def _norm_groups(entries: list[PlanEntry]) -> list[int]:
    for e in entries:
        for ax, role in enumerate(e.rule.axes):
            if role == "hidden":
                return [s[ax] for s in e.source_shapes]
    return []


def _role_widths(entries: list[PlanEntry], role: str) -> list[int] | None:
    """The sources' widths of a widened role, from the first tensor with an axis of that role."""
    for e in entries:
        for ax, r in enumerate(e.rule.axes):
            if r == role:
                return [s[ax] for s in e.source_shapes]
    return None


def _norm_role_groups(entries: list[PlanEntry]) -> dict[str, list[int]]:
    """Per widened role of a norm, the sources' widths: grouped norms normalise each source's slice
    of that role with its own statistics (the hidden size; OLMo 2's q_norm over heads * head_dim and
    k_norm over kv_heads * head_dim, which differ under grouped-query attention). A norm over two
    widened axes cannot be grouped by a module over the last axis: refused."""
    out: dict[str, list[int]] = {}
    for e in entries:
        if not e.rule.norm:
            continue
        widened = e.rule.widened_axes
        if len(widened) > 1:
            raise InputError(f"tensor {e.name!r} is a norm over {len(widened)} widened axes "
                             f"({', '.join(e.rule.axes[a] for a in widened)}), which grouped norms cannot group",
                             "fuse with --norm rule, or give the norm one widened axis in the rules")
        for ax in widened:
            out.setdefault(e.rule.axes[ax], [s[ax] for s in e.source_shapes])
    return out


def _head_norms(entries: list[PlanEntry]) -> dict[str, list[int]]:
    """Per-head norms (``per_head`` rules, a [head_dim] scale applied to every head): the number of
    heads of each source, from the sources' widths of the rule's role (heads * head_dim)."""
    out: dict[str, list[int]] = {}
    for e in entries:
        role = e.rule.per_head
        if role is None:
            continue
        head_dim = e.source_shapes[0][-1]
        widths = _role_widths(entries, role)
        if widths is None or head_dim == 0 or any(w % head_dim for w in widths):
            raise InputError(f"tensor {e.name!r} is a per-head norm over {head_dim} entries, but no tensor has a "
                             f"{role!r} axis of whole heads ({widths})",
                             f"fix the rule's per_head role: the heads it scales must be a {role!r} axis of some tensor")
        out[e.name] = [w // head_dim for w in widths]
    return out


def build_plan(sources: list[Checkpoint], options: FuseOptions, rules: Preset | None = None) -> Plan:
    """The plan of fusing ``sources`` with ``options`` (validated when they were made), fitted to
    ``options.max_memory`` if given."""
    n = len(sources)
    if n < 1:
        raise UsageError("no sources given")
    if len(options.weights) != n:
        raise UsageError(f"{len(options.weights)} weights for {n} sources")
    preset = resolve_preset(sources, rules)
    if options.convert_only:
        if n != 1:
            raise UsageError("a conversion takes exactly one source")
        preset = conversion_preset(preset)
    family = family_of(preset)
    configs = source_configs(sources, family)
    check_configs(sources, family, configs, fusing=not options.convert_only)

    tensors: list[dict[str, TensorRef]] = []
    tied: list[bool] = []
    for m, ck in enumerate(sources):
        if m > 0 and options.self_fusion:
            tensors.append(tensors[0])
            tied.append(tied[0])
            continue
        if options.convert_only:
            tensors.append(dict(ck.tensors))
            tied.append(False)
            continue
        refs, t = virtualise_output(ck, m, preset)
        tensors.append(refs)
        tied.append(t)

    tensors, expert_refs, expert_counts = _expand_experts(sources, tensors, preset)
    _check_expert_counts(sources, family, configs, expert_counts)
    names = sorted(tensors[0], key=natural_key)  # canonical: output bytes do not depend on input format
    for m in range(1, n):
        other = tensors[m]
        missing = next((k for k in names if k not in other), None)
        if missing is not None:
            raise InputError(f"{_origin(sources[m], m)} has no tensor {missing!r}, which {_origin(sources[0], 0)} has",
                             "sources must have the same architecture and depth")
        extra = next((k for k in other if k not in tensors[0]), None)
        if extra is not None:
            raise InputError(f"{_origin(sources[m], m)} has tensor {extra!r}, which {_origin(sources[0], 0)} lacks",
                             "sources must have the same architecture and depth")

    if expert_refs:
        names = sorted([*names, *expert_refs], key=natural_key)
    matches = RuleSet(preset).match_all(names, _origin(sources[0], 0))
    output_scales = [family.output_scale(c) for c in configs]
    sized_parts = any(isinstance(r.parts, list) for r in preset.rules)
    source_widths = [family.widths(c) for c in configs] if sized_parts else []

    entries: list[PlanEntry] = []
    for name in names:
        match = matches[name]
        rule = match.rule
        refs = expert_refs.get(name) or [tensors[m][name] for m in range(n)]
        for m, ref in enumerate(refs):
            if len(ref.shape) != len(rule.axes):
                raise InputError(
                    f"{_origin(sources[m], m)}: tensor {name!r} has {len(ref.shape)} axes {list(ref.shape)}, "
                    f"but rules[{match.index}] {rule.pattern!r} describes {len(rule.axes)} ({', '.join(rule.axes) or 'scalar'})",
                    "fix the rule's axes, or the tensor does not belong to this family",
                )
        op = rule.fusion_op
        try:
            shape = op.shape([r.shape for r in refs], rule)
        except FusionMismatch as exc:
            if exc.source is not None:  # about that source's own tensor
                where = _origin(sources[exc.source], exc.source)
                raise InputError(f"{where}: tensor {name!r} {exc}", exc.hint) from None
            raise InputError(f"tensor {name!r} cannot be fused: {exc} (axes: {', '.join(rule.axes)})",
                             exc.hint) from None
        dtype = options.dtype or _promote(name, refs)
        if not (dtype.is_floating_point or op.any_dtype):
            raise InputError(f"tensor {name!r} has dtype {dtype}, which cannot be fused",
                             "only floating-point parameters can be fused")
        noise = options.noisy and n > 1 and len(rule.widened_axes) == 2
        scales = None
        if op.averages_outputs:
            scales = [options.weights[m] * output_scales[m] for m in range(n)]
        part_sizes = _part_sizes(sources, family, source_widths, name, rule, [r.shape for r in refs])
        entries.append(PlanEntry(name=name, rule_index=match.index, rule=rule,
                                 source_shapes=[r.shape for r in refs], source_dtypes=[r.dtype for r in refs],
                                 shape=shape, dtype=dtype, noise=noise, scales=scales, part_sizes=part_sizes,
                                 refs=expert_refs.get(name)))

    check_widths(sources, family, configs, entries)
    groups = _norm_groups(entries)
    role_groups = _norm_role_groups(entries)
    plan = Plan(sources=sources, preset=preset, options=options, entries=entries, tensors=tensors,
                config=None, norm_groups=groups, output_scales=output_scales, tied=tied,
                weights_rescaled=options.weights_rescaled, norm_role_groups=role_groups,
                head_norms=_head_norms(entries))
    plan.config = widen_config(sources, family, configs, options, groups, role_groups, plan.writes_head_norms)
    if not options.convert_only:
        family.check_fused(plan.config)
        _runtime_scales(plan, family, configs)
        if n > 1 and not options.self_fusion:
            plan.deviations = family.deviations(configs)
    _resolve_output(plan, names)
    if options.optimizer_state == "fuse" and (plan.sources_have_optimizer_state or not options.convert_only):
        writer = plan.output_adapter
        if not writer.carries_optimizer_state:
            carriers = formats.labels([a for a in formats.ADAPTERS if a.carries_optimizer_state])
            plan.notes.append(f"optimizer state is not written to {writer.description} (--optimizer-state fuse "
                              f"applies to {carriers} outputs)")
        else:
            from .optimizer_state import StatePlan

            plan.state = StatePlan.build(plan)
    if any(tied) and preset.output is not None:
        also = "".join(f" and {t.name}" for t in preset.output.also_tied)
        plan.notes.append(f"tied output projection untied: the fused model has its own {preset.output.name}{also}")
    if options.weights_rescaled:
        plan.notes.append("weights did not sum to 1 and were normalised to " +
                          ", ".join(f"{w:.6g}" for w in options.weights))
    if options.optimizer_state == "drop" and plan.sources_have_optimizer_state and not options.convert_only:
        plan.notes.append("optimizer state not carried over (--optimizer-state drop): restore with a fresh "
                          "optimizer (see fused.gin)")
    if options.norm == "rule" and n > 1 and not options.self_fusion:
        plan.notes.append("norm mode 'rule': norms over the concatenated hidden state; the fused function "
                          "approximates the average (run `deepfuse verify` to measure by how much)")
    for reason in plan.deviations:
        plan.notes.append(f"{reason}; the fused function approximates the average of these sources (run "
                          "`deepfuse verify` to measure by how much)")
    if plan.writes_head_norms:
        plan.notes.append(f"{len(plan.head_norms)} per-head norms (e.g. {next(iter(plan.head_norms))}): the weights "
                          f"hold the sources' weighted average, each head's own scale goes to {HEAD_NORMS_FILE} "
                          "(read by apply_grouped_norms)")
    if options.max_memory is not None:
        plan.fit_memory(options.max_memory)
    return plan


def _runtime_scales(plan: Plan, family: Family, configs: list[dict | None]) -> None:
    """Tensors the runtime multiplies by a width-dependent factor (a rule's ``runtime_scale``, e.g. Gemma's
    embedding by sqrt(hidden_size)): each source's block is stored times its factor over the fused one."""
    fused = plan.config  # in the family's vocabulary, as the sources' configs
    noted: set[int] = set()
    for e in plan.entries:
        scales = family.runtime_scales(e.rule, configs, fused, e.name)
        if scales is None:
            continue
        e.scales = scales
        if e.rule_index not in noted:
            noted.add(e.rule_index)
            plan.notes.append(f"{e.name}: the runtime multiplies it by {e.rule.runtime_scale} (of its own config), so "
                              "source blocks are stored times " + ", ".join(f"{x:.6g}" for x in scales))


def _part_sizes(sources: list[Checkpoint], family: Family, widths: list[dict[str, Any]], name: str, rule: Rule,
                shapes: list[tuple[int, ...]]) -> list[list[int]] | None:
    """For a rule whose ``parts`` name roles (Phi-3's [heads, kv, kv]): each part's size in each source,
    from the family's width expressions over that source's config; they must tile the 'qkv' axis."""
    if not isinstance(rule.parts, list):
        return None
    axis = rule.axes.index("qkv")
    exprs = family.preset.config.width_expressions() if family.preset.config is not None else {}
    if len(sources) == 1 and any(type(widths[0].get(role)) is not int for role in rule.parts):
        return [[shapes[0][axis], *[0] * (len(rule.parts) - 1)]]  # a conversion: one source's parts stay in place
    out = []
    for m, (ck, w) in enumerate(zip(sources, widths, strict=True)):
        sizes = []
        for role in rule.parts:
            size = w.get(role)
            if type(size) is not int:
                why = (f"the family gives no width for role {role!r}" if role not in exprs else
                       "it has no config.json to size them" if not ck.config else
                       f"{exprs[role]} is {size!r} in its config.json")
                raise InputError(f"{_origin(ck, m)}: tensor {name!r} is split into parts {rule.parts}, but {why}",
                                 "give the model directory with its config.json (and the family's widths)")
            sizes.append(size)
        if sum(sizes) != shapes[m][axis]:
            text = " + ".join(f"{role} {size}" for role, size in zip(rule.parts, sizes, strict=True))
            raise InputError(f"{_origin(ck, m)}: tensor {name!r} axis {axis} has {shapes[m][axis]} entries, but its "
                             f"parts are {text} = {sum(sizes)} by config.json",
                             "config.json does not describe these weights: fix it or use the model's own config")
        out.append(sizes)
    return out
def _expand_experts(sources: list[Checkpoint], tensors: list[dict[str, TensorRef]], preset: Preset
                    ) -> tuple[list[dict[str, TensorRef]], dict[str, list[TensorRef]], list[int]]:
    """Mixture-of-experts experts, concatenated: the sources' tensors without their per-expert ones
    (rules with ``{expert}``), and each fused expert's n source tensors. Source m's expert j becomes
    expert E_1 + ... + E_{m-1} + j; its tensor is source m's, and every other source m' gives zeros of
    its own width (the expert reads and writes only source m's slice of the hidden state). Also each
    source's number of experts (per MoE layer)."""
    rules = [r for r in preset.rules if r.per_expert]
    if not rules:
        return tensors, {}, []
    n = len(tensors)
    # per source: the tensor's name with {expert} -> expert number -> ref
    groups: list[dict[str, dict[int, TensorRef]]] = []
    rest: list[dict[str, TensorRef]] = []
    for refs in tensors:
        g: dict[str, dict[int, TensorRef]] = {}
        others: dict[str, TensorRef] = {}
        for name, ref in refs.items():
            hit = next((mt for r in rules if (mt := r.regex.fullmatch(name))), None)
            if hit is None:
                others[name] = ref
                continue
            key = name[:hit.start("expert")] + "{expert}" + name[hit.end("expert"):]
            g.setdefault(key, {})[int(hit.group("expert"))] = ref
        groups.append(g)
        rest.append(others)
    counts = []
    for m, g in enumerate(groups):
        sizes = {key: len(experts) for key, experts in g.items()}
        count = max(sizes.values(), default=0)
        for key, experts in sorted(g.items()):
            if sorted(experts) != list(range(count)):
                missing = next(j for j in range(count) if j not in experts)
                raise InputError(f"{_origin(sources[m], m)} has no tensor {key.replace('{expert}', str(missing))!r} "
                                 f"(it has {count} experts elsewhere)",
                                 "every MoE layer of a source must hold experts 0..E-1 for each of its kernels")
        counts.append(count)
    keys = sorted(groups[0], key=natural_key)
    for m in range(1, n):
        diff = next((k for k in keys if k not in groups[m]), None) or next(
            (k for k in groups[m] if k not in groups[0]), None)
        if diff is not None:
            which, other = (m, 0) if diff in groups[m] else (0, m)
            raise InputError(f"{_origin(sources[which], which)} has tensors {diff!r}, which "
                             f"{_origin(sources[other], other)} lacks",
                             "sources must have the same architecture and depth")
    out: dict[str, list[TensorRef]] = {}
    zeros: dict[tuple, TensorRef] = {}  # one placeholder per source, kernel and shape, shared by the experts
    for key in keys:
        rule = next(r for r in rules if r.regex.fullmatch(key.replace("{expert}", "0")))
        axis = rule.widened_axes[0] if len(rule.widened_axes) == 1 else None
        offset = 0
        for m in range(n):
            for j in range(counts[m]):
                own = groups[m][key][j]
                refs = []
                for k in range(n):
                    if k == m:
                        refs.append(own)
                        continue
                    like = groups[k][key][0]  # source k's width on the widened axis, and its dtype
                    shared = [ax for ax in range(len(own.shape)) if ax != axis]
                    if len(like.shape) == len(own.shape) and any(like.shape[ax] != own.shape[ax] for ax in shared):
                        raise InputError(f"{_origin(sources[m], m)}: tensor {own.name!r} has shape {list(own.shape)} "
                                         f"but {_origin(sources[k], k)}'s {like.name!r} has {list(like.shape)}",
                                         "the sources' experts must have the same size (the fused model has more "
                                         "experts, not wider ones)")
                    shape = tuple(like.shape[ax] if ax == axis else s for ax, s in enumerate(own.shape))
                    if axis is None or len(like.shape) != len(own.shape):
                        shape = tuple(like.shape)
                    zkey = (k, key, shape, m)
                    if zkey not in zeros:
                        zeros[zkey] = TensorRef(
                            name=like.name, shape=shape, dtype=like.dtype,
                            loader=lambda shape=shape, dt=like.dtype: torch.zeros(shape, dtype=dt),
                            source=f"zeros: source {k + 1} has no part in source {m + 1}'s experts {key!r}")
                    refs.append(zeros[zkey])
                out[key.replace("{expert}", str(offset + j))] = refs
            offset += counts[m]
    return rest, out, counts


def _check_expert_counts(sources: list[Checkpoint], family: Family, configs: list[dict | None],
                         counts: list[int]) -> None:
    """Each source's expert tensors are as many as its config.json says (the fused config's count is
    their sum, and the grouped router's groups are these counts)."""
    moe = family.preset.moe
    if moe is None or not counts:
        return
    for m, (ck, c) in enumerate(zip(sources, configs, strict=True)):
        if c is None or not counts[m]:
            continue
        want = evaluate(moe.experts, family.view(c))
        if want != counts[m]:
            raise InputError(f"{_origin(ck, m)}: its MoE layers hold {counts[m]} experts, but config.json gives "
                             f"{moe.experts} = {want}",
                             "config.json does not describe these weights: fix it or use the model's own config")


def _resolve_output(plan: Plan, names: list[str]) -> None:
    """Output format, the name conversion it needs, and the config the output carries."""
    output = formats.output_for(plan.options.output_format, plan.sources[0])
    plan.output_format = output.name
    plan.conversion = conversion_for(plan.preset, names, output)
    plan.output_config = output_config(plan.family, plan.config, output, plan.preset.naming, str(plan.sources[0].path))


def natural_key(name: str) -> list:
    """Sort key ordering ``layers.2`` before ``layers.10``."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", name)]


def conversion_preset(preset: Preset) -> Preset:
    """The form of ``preset`` a conversion runs with: no output averaging, every rule optional."""
    return preset.model_copy(update={"output": None, "rules": [r.model_copy(update={"optional": True})
                                                               for r in preset.rules]})


def _promote(name: str, refs: list[TensorRef]) -> torch.dtype:
    """The dtype the sources of tensor ``name`` fuse in (the widest of theirs)."""
    out = refs[0].dtype
    for r in refs[1:]:
        try:
            out = torch.promote_types(out, r.dtype)
        except RuntimeError:  # torch defines no promotion for float8 types
            raise InputError(f"tensor {name!r} is {str(refs[0].dtype).removeprefix('torch.')} in {refs[0].source} but "
                             f"{str(r.dtype).removeprefix('torch.')} in {r.source}: these dtypes do not mix",
                             "cast every source to one dtype with --dtype float32 (or bfloat16, float16)") from None
    return out


def role_summary(rule: Rule) -> str:
    return "x".join(f"{r}*" if r in WIDENED_ROLES else r for r in rule.axes) or "scalar"
