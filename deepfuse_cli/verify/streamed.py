"""A transformers model run in fp32 with one layer's weights in memory at a time.

The model is built from its config with no weights (parameters on the meta device while its modules
are constructed, so nothing is initialised), then each parameter is replaced by a placeholder of its
shape that holds no memory (a NaN broadcast: a weight used without being loaded poisons the output,
so it cannot pass unnoticed). Non-persistent buffers (rotary ``inv_freq``...) are the real ones the
modules compute; persistent buffers the checkpoint holds are loaded from it.

The forward then loads weights by hooks: before a *unit* runs, its parameters are read from the
checkpoint (by name, one tensor at a time, upcast to fp32 whatever the storage dtype), and after it
ran they are dropped again. Units are found from the module structure alone, so any family's model
works without naming its modules: each element of a ``ModuleList`` (a decoder or encoder block, with
everything inside it), and every other module holding parameters of its own (embeddings, final norm,
output projection). Peak memory is the largest unit in fp32, plus activations, whatever the depth.

Tied parameters (an output projection that is the embedding) are one parameter under two names: a
unit loads it by whichever name the checkpoint holds.
"""

from __future__ import annotations

import contextlib
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..ir import TensorRef


class RuntimeRefused(Exception):
    """The runtime built the model, but the weights do not fit it (missing, unexpected or mismatched keys);
    the message says which, in one line."""


class NeedsConversion(Exception):
    """transformers converts some of the checkpoint's tensors while loading (e.g. experts packed into one
    tensor): they are not loaded one by one by name."""


class NoRuntime(Exception):
    """No runtime can build the model of this config (the reason, in one line)."""


@dataclass(frozen=True)
class Weights:
    """What a model is built from: its config.json and its tensors by their Hugging Face names."""

    config: dict[str, Any]
    tensors: Mapping[str, TensorRef]


@dataclass(frozen=True)
class ModelClass:
    """The transformers class that runs a config, and how it is probed."""

    cls: Any
    name: str
    inputs: str  # "causal" (input ids), "seq2seq" (encoder and decoder ids) or "encoder" (ids, mask, token types)


#: the thread importing the runtime ahead (:func:`prepare_runtime`): waited for before any other use of
#: transformers, so that two threads never import its modules at once
_PREPARING: list[threading.Thread] = []


def _transformers():
    for thread in list(_PREPARING):
        if thread is not threading.current_thread():
            thread.join()
            _PREPARING.remove(thread)
    try:
        import transformers
    except ImportError:
        raise NoRuntime("transformers is not installed: pip install 'deepfuse[verify]'") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def prepare_runtime(config: dict[str, Any]) -> None:
    """Import transformers and the model code of ``config`` on a thread of its own (seconds of Python
    work that the function check would otherwise wait for), while other checks run; errors are left for
    the function check to report."""

    def imports() -> None:
        try:
            from transformers import initialization  # noqa: F401 - the modelling machinery
            from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: F401

            model_class(config)
        except Exception:  # noqa: BLE001, S110 - only a head start: the function check reports any error
            pass

    thread = threading.Thread(target=imports, name="deepfuse-runtime-imports", daemon=True)
    _PREPARING.append(thread)
    thread.start()


def config_object(config: dict[str, Any]):
    """The transformers config of ``config`` (a config.json's dict); NoRuntime when it knows no such model."""
    transformers = _transformers()
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise NoRuntime("config.json names no model_type")
    try:
        config_class = transformers.CONFIG_MAPPING[model_type]
    except KeyError:
        raise NoRuntime(f"transformers {transformers.__version__} knows no model_type {model_type!r}") from None
    return config_class.from_dict(dict(config))


def model_class(config: dict[str, Any], declared: str | None = None, inputs: str | None = None) -> ModelClass:
    """The class that runs ``config``: the family's declared runtime class, else the config's
    ``architectures`` (a transformers class), else the Auto class for its model_type (causal LM,
    then seq2seq LM). NoRuntime when there is none."""
    transformers = _transformers()
    cfg = config_object(config)
    seq2seq = bool(getattr(cfg, "is_encoder_decoder", False))
    names = [declared] if declared else [a for a in (config.get("architectures") or []) if isinstance(a, str)]
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return ModelClass(cls, name, inputs or ("seq2seq" if seq2seq else "causal"))
    if declared:
        raise NoRuntime(f"transformers {transformers.__version__} has no class {declared!r}")
    from transformers.models.auto import modeling_auto as auto

    for mapping, auto_name, kind in ((auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "AutoModelForSeq2SeqLM", "seq2seq"),
                                     (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "AutoModelForCausalLM", "causal")):
        if cfg.model_type in mapping and (kind == "seq2seq") == seq2seq:
            return ModelClass(getattr(transformers, auto_name), auto_name, kind)
    raise NoRuntime(f"transformers has no language-model class for model_type {cfg.model_type!r} "
                    "(config.json's architectures name none it has)")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built in this context hold their parameters on the meta device (no memory, no
    initialisation), their buffers on the CPU as computed."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _placeholder(p: torch.Tensor) -> nn.Parameter:
    fill = torch.full((), float("nan"), dtype=torch.float32) if p.is_floating_point() else torch.zeros((), dtype=p.dtype)
    return nn.Parameter(fill.expand(p.shape), requires_grad=False)


def _keys(names) -> str:
    names = sorted(map(str, names))
    return ", ".join(repr(n) for n in names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")


@dataclass
class _Slot:
    """One parameter as a unit holds it: ``owner._parameters[attr]``, loaded from ``ref``."""

    owner: nn.Module
    attr: str
    placeholder: nn.Parameter
    ref: TensorRef


class StreamedModel:
    """A transformers model of ``weights`` whose forward loads each unit's weights (fp32) just in time."""

    def __init__(self, cls: ModelClass, weights: Weights, groups: list[int] | None = None, *,
                 role_groups: dict[str, list[int]] | None = None, head_norms: dict[str, torch.Tensor] | None = None):
        transformers = _transformers()
        cfg = config_object(weights.config)
        build = getattr(cls.cls, "from_config", None) or cls.cls._from_config
        from transformers import initialization

        with _parameters_on_meta(), initialization.no_init_weights():
            model = build(cfg, dtype=torch.float32)
            model.tie_weights()  # tied parameters: one parameter under two names
        del transformers
        model.eval()
        placeholders: dict[int, nn.Parameter] = {}
        for module in model.modules():
            for attr, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[attr] = placeholders.setdefault(id(p), _placeholder(p))
        # the parameters read from the checkpoint; grouped modules may add their own (per-head norm scales)
        self._placeholder_ids = {id(p) for p in placeholders.values()}
        if groups:
            from ..grouped_norm import apply_grouped_norms

            apply_grouped_norms(model, groups, role_groups=role_groups, head_norms=head_norms or {})
        self.model = model
        self.loaded_bytes = 0  # the most parameter bytes loaded at once (fp32)
        tensors = _renamed(model, weights.tensors)
        self._check_names(tensors)
        self._load_buffers(tensors)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._hooks = self._hooks_for(self._units(tensors))

    def _aliases(self) -> dict[int, list[str]]:
        names: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in self._placeholder_ids:
                names.setdefault(id(p), []).append(name)
        return names

    def _check_names(self, tensors: Mapping[str, TensorRef]) -> None:
        """The names and shapes the model expects against the checkpoint's: RuntimeRefused, in one line,
        for missing, unexpected or mismatched tensors (as transformers' own loading reports them)."""
        model = self.model
        expected: set[str] = set()
        missing, mismatched = [], []
        shapes = {id(p): tuple(p.shape) for p in model.parameters()}
        for key, names in self._aliases().items():
            expected.update(names)
            present = [n for n in names if n in tensors]
            if not present:
                missing.append(names[0])
            elif tuple(tensors[present[0]].shape) != shapes[key]:
                mismatched.append((present[0], tensors[present[0]].shape, shapes[key]))
        persistent = {n for n, _ in model.named_buffers()} - {n for n, _ in _non_persistent_buffers(model)}
        expected |= persistent
        ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
        ignore.append(re.compile(r"rotary_emb\.inv_freq"))
        unexpected = [n for n in tensors if n not in expected and not any(p.search(n) for p in ignore)]
        ignore_missing = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
        missing = [n for n in missing if not any(p.search(n) for p in ignore_missing)]
        parts = []
        if missing:
            parts.append(f"missing keys {_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_keys(unexpected)}")
        if mismatched:
            key, got, want = sorted(mismatched, key=lambda m: m[0])[0]
            more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
            parts.append(f"mismatched shape of {key!r} ({list(got)} in the checkpoint, {list(want)} in the model "
                         f"its config describes){more}")
        if parts:
            raise RuntimeRefused("; ".join(parts))

    def _load_buffers(self, tensors: Mapping[str, TensorRef]) -> None:
        non_persistent = {n for n, _ in _non_persistent_buffers(self.model)}
        for name, buf in list(self.model.named_buffers()):
            if name in tensors and name not in non_persistent:
                owner_name, _, attr = name.rpartition(".")
                owner = self.model.get_submodule(owner_name)
                value = tensors[name].load()
                owner._buffers[attr] = value.to(torch.float32) if value.is_floating_point() else value.clone()

    def _units(self, tensors: Mapping[str, TensorRef]) -> list[tuple[nn.Module, list[_Slot]]]:
        """Each unit (a ModuleList element with its subtree, or another module with parameters of its
        own) and the parameters it loads."""
        aliases = self._aliases()
        module_names: dict[int, list[str]] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            module_names.setdefault(id(module), []).append(name)
        units: dict[int, tuple[nn.Module, bool]] = {}  # id -> (module, whole subtree)

        def walk(module: nn.Module) -> None:
            if any(p is not None for p in module._parameters.values()):
                units.setdefault(id(module), (module, False))
            for child in module.children():
                if isinstance(child, nn.ModuleList):
                    for element in child.children():
                        units.setdefault(id(element), (element, True))
                else:
                    walk(child)

        walk(self.model)
        result = []
        for module, whole in units.values():
            owners = module.modules() if whole else [module]
            slots = []
            for owner in owners:
                for attr, p in owner._parameters.items():
                    if p is None or id(p) not in self._placeholder_ids:
                        continue
                    # its own name first: transformers unties parameters the checkpoint holds twice
                    own = [f"{m}.{attr}" if m else attr for m in module_names[id(owner)]]
                    name = next(n for n in [*own, *aliases[id(p)]] if n in tensors)
                    slots.append(_Slot(owner, attr, p, tensors[name]))
            if slots:
                result.append((module, slots))
        return result

    def _hooks_for(self, units: list[tuple[nn.Module, list[_Slot]]]) -> list:
        """Hooks loading each unit's weights before it runs and dropping them after; while a unit runs,
        the next one (in module order, the order a forward runs them) is read on a second thread.

        The fp32 copies go into two banks of buffers, unit i into bank i % 2, reused from the unit two
        before when the shapes match (consecutive blocks): no fresh memory to fault in for every layer,
        which costs more than the reading. A bank holds one unit's buffers, so at most two units are
        held at once; a bank whose unit is still running (a unit inside another) is not reused."""
        sizes = [sum(4 * s.ref.numel for s in slots) for _, slots in units]
        pending: list = []  # at most one (index, future): the unit read ahead
        banks: list[dict] = [{"owner": None, "buffers": {}}, {"owner": None, "buffers": {}}]
        active: set[int] = set()
        keys = []  # the buffers each unit fills: (shape, n-th tensor of that shape in the unit)
        for _, slots in units:
            seen: dict[tuple[int, ...], int] = {}
            unit_keys = []
            for s in slots:
                if s.ref.dtype.is_floating_point:
                    shape = tuple(s.ref.shape)
                    unit_keys.append((shape, seen.get(shape, 0)))
                    seen[shape] = seen.get(shape, 0) + 1
            keys.append(unit_keys)

        def read(slots: list[_Slot], reuse: dict) -> tuple[list[torch.Tensor], dict]:
            out, filled, seen = [], {}, {}
            for s in slots:
                t = s.ref.load()
                if t.is_floating_point():
                    shape = tuple(t.shape)
                    key = (shape, seen.setdefault(shape, 0))
                    seen[shape] += 1
                    buffer = reuse.get(key)
                    if buffer is None:
                        buffer = torch.empty(shape, dtype=torch.float32)
                    buffer.copy_(t)
                    del t
                    filled[key] = t = buffer
                out.append(t)
            return out, filled

        def start(i: int):
            """Read unit i (into its bank, unless that bank's unit is running): a future."""
            bank = banks[i % 2]
            if bank["owner"] in active:
                return self._pool.submit(read, units[i][1], {}), None
            reuse = {k: bank["buffers"][k] for k in keys[i] if k in bank["buffers"]}  # the others freed now
            bank["buffers"], bank["owner"] = {}, i
            return self._pool.submit(read, units[i][1], reuse), bank

        def hooks(i: int, unit: nn.Module, slots: list[_Slot]):
            def load(module, args):
                if pending and pending[0][0] == i:
                    _, future, bank = pending.pop()
                else:
                    future, bank = start(i)
                tensors, filled = future.result()
                if bank is not None and bank["owner"] == i:
                    bank["buffers"] = filled
                active.add(i)
                ahead = 0
                if not pending and i + 1 < len(units) and i + 1 not in active:
                    pending.append((i + 1, *start(i + 1)))
                    ahead = sizes[i + 1]
                for s, t in zip(slots, tensors):
                    s.owner._parameters[s.attr] = nn.Parameter(t, requires_grad=False)
                self.loaded_bytes = max(self.loaded_bytes, sizes[i] + ahead)

            def drop(module, args, output):
                active.discard(i)
                for s in slots:
                    s.owner._parameters[s.attr] = s.placeholder

            return unit.register_forward_pre_hook(load), unit.register_forward_hook(drop)

        self._pending = pending
        self._banks = banks
        return [hooks(i, unit, slots) for i, (unit, slots) in enumerate(units)]

    def forward(self, inputs: str, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None,
                encoder_inputs: dict[str, torch.Tensor] | None = None):
        """Logits and hidden states (fp32) of the probes. Computed on one thread (a few probe tokens: more
        threads only contend), while the next unit's weights are read on another."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._forward(inputs, input_ids, decoder_input_ids, encoder_inputs or {})
        finally:
            torch.set_num_threads(threads)

    def _forward(self, inputs: str, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None,
                 encoder_inputs: dict[str, torch.Tensor]):
        with torch.no_grad():
            if inputs == "seq2seq":
                out = self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids, output_hidden_states=True)
                hidden = list(out.encoder_hidden_states) + list(out.decoder_hidden_states)
            elif inputs == "encoder":  # BERT-like: an attention mask with padding, token types
                out = self.model(input_ids=input_ids, output_hidden_states=True, **encoder_inputs)
                hidden = list(out.hidden_states)
            else:
                out = self.model(input_ids=input_ids, output_hidden_states=True)
                hidden = list(out.hidden_states)
        logits = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        return logits.float(), [h.float() for h in hidden]

    def close(self) -> None:
        for _, future, _ in self._pending:
            future.cancel()
        self._pending.clear()
        self._banks.clear()
        self._pool.shutdown(wait=True)
        for pre, post in self._hooks:
            pre.remove()
            post.remove()
        self.model = None  # its parameters are placeholders: nothing large to collect


def _renamed(model: nn.Module, tensors: Mapping[str, TensorRef]) -> Mapping[str, TensorRef]:
    """The checkpoint's tensors under the names the model has: transformers' own renamings of the
    model's checkpoints (e.g. GPT-NeoX ``embed_out`` -> ``lm_head``) applied; NeedsConversion when a
    tensor is converted, not renamed."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # an older transformers: no renamings
        return tensors
    transforms = get_model_conversion_mapping(model)
    if not transforms:
        return tensors
    out: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        key = name
        for t in transforms:
            key, matched = t.rename_source_key(key)
            if matched is not None and not isinstance(t, WeightRenaming):
                raise NeedsConversion(f"{name!r} is converted by transformers while loading")
        out[key] = ref
    return out


def _non_persistent_buffers(model: nn.Module):
    for mod_name, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            yield (f"{mod_name}.{name}" if mod_name else name), module._buffers.get(name)


def run_streamed(cls: ModelClass, weights: Weights, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None,
                 groups: list[int] | None = None, encoder_inputs: dict[str, torch.Tensor] | None = None, *,
                 role_groups: dict[str, list[int]] | None = None, head_norms: dict[str, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """The probes through the model of ``weights``: logits, hidden states, the most weight bytes held at once."""
    model = StreamedModel(cls, weights, groups, role_groups=role_groups, head_norms=head_norms)
    try:
        logits, hidden = model.forward(cls.inputs, input_ids, decoder_input_ids, encoder_inputs)
        return logits, hidden, model.loaded_bytes
    finally:
        model.close()


Forward = Callable[..., Any]
