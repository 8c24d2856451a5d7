"""The family registry: everything that is specific to one model family, looked up, never compared.

A family is its preset file (``rules/presets/<name>.json``: the rules, in one naming with the names
of every other naming beside them; its config fields, summed, equal, derived and widths as
expressions; its output projection and scale; its runtime class for ``verify``; its norm modules)
plus, only where data cannot say it, a module of code hooks here named by the preset's
``architecture`` (T5: a config for checkpoints that carry none, the T5X config vocabulary and gin
text; the paper's MLP: a reference forward). A family that fits the existing ops is one file.

Hooks a module may define (all optional):

* ``canonical_config(config, naming) -> dict`` — a source's config in the preset's own vocabulary;
* ``field_label(key, naming) -> str`` — a config field's name in that naming's vocabulary (messages);
* ``naming_config(config, view, naming, origin, source_naming) -> dict`` — the fused config in a
  naming's vocabulary (``view``: with the family's derived values);
* ``infer_config(shapes, naming, origin) -> dict | None`` — dimensions of a checkpoint that has no config;
* ``config_text(config, naming, note, optimizer_state) -> str | None`` — a runtime config written beside
  a checkpoint in that naming (T5: ``fused.gin`` for T5X);
* ``forward(tensors, config, inputs) -> (logits, hidden)`` — the ``builtin`` runtime.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..errors import InputError
from ..rules.expr import evaluate, names
from ..rules.schema import Preset, Rule

#: preset ``architecture`` -> module of code hooks (imported when a family needs it)
HOOK_MODULES = {"t5": "t5", "mlp": "mlp"}


@dataclass(frozen=True)
class Family:
    """One model family: a preset in any of its namings, and its hooks."""

    preset: Preset

    @property
    def name(self) -> str:
        return self.preset.name

    @property
    def hooks(self) -> ModuleType | None:
        mod = HOOK_MODULES.get(self.preset.architecture or "")
        return importlib.import_module(f"{__name__}.{mod}") if mod else None

    def _hook(self, name: str):
        hooks = self.hooks
        return getattr(hooks, name, None) if hooks is not None else None

    def canonical_config(self, config: dict | None, naming: str) -> dict | None:
        """``config`` (as a checkpoint in ``naming`` carries it) in the preset's config vocabulary."""
        hook = self._hook("canonical_config")
        return hook(config, naming) if hook is not None and config is not None else config

    def naming_config(self, config: dict | None, naming: str, origin: str, source_naming: str) -> dict | None:
        """A config in the preset's vocabulary, as a checkpoint in ``naming`` needs it (the sources
        were in ``source_naming``): the hook's, given the config and the family's view of it (its
        derived values included); the config itself for families without one."""
        hook = self._hook("naming_config")
        if hook is None or config is None:
            return config
        return hook(config, self.view(config), naming, origin, source_naming)

    def infer_config(self, shapes: dict[str, tuple[int, ...]], naming: str, origin: str) -> dict | None:
        """The config of a checkpoint in ``naming`` that carries none, from its tensor shapes (or None)."""
        hook = self._hook("infer_config")
        return hook(shapes, naming, origin) if hook is not None else None

    def field_label(self, key: str, naming: str) -> str:
        """How a config field of the family's vocabulary is called for checkpoints in ``naming``."""
        hook = self._hook("field_label")
        return hook(key, naming) if hook is not None else key

    def check_sizes(self, config: dict | None, where: str) -> None:
        """Refuse a config whose size fields are not non-negative integers (null only where derived)."""
        spec = self.preset.config
        if spec is None or config is None:
            return
        for key in spec.sizes:
            value = config.get(key)
            if key in config and not (value is None and key in spec.derived) and (type(value) is not int or value < 0):
                raise InputError(f"{where}: field {key!r} is {json.dumps(value)[:40]}, expected a non-negative integer",
                                 "fix config.json, or re-download it")

    def config_text(self, config: dict | None, naming: str, *, note: str, optimizer_state: bool) -> str | None:
        """The config a runtime of ``naming`` reads beside the checkpoint (T5X: gin), if the family has one."""
        hook = self._hook("config_text")
        if hook is None or config is None:
            return None
        return hook(config, naming, note=note, optimizer_state=optimizer_state)

    def view(self, config: dict | None) -> dict[str, Any]:
        """The config with the family's derived values (evaluated in order, each seeing the previous)."""
        out = dict(config or {})
        spec = self.preset.config
        for key, text in (spec.derived.items() if spec is not None and config is not None else ()):
            value = evaluate(text, out)
            if value is not None:
                out[key] = value
        return out

    def output_scale(self, config: dict | None) -> float:
        """The source-side factor on the output projection (folded into the fused projection)."""
        if self.preset.output is None or config is None:
            return 1.0
        value = evaluate(self.preset.output.scale, self.view(config))
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InputError(f"the {self.name} output scale {self.preset.output.scale!r} cannot be computed from "
                             "this config.json", "the config lacks a field the family needs")
        return float(value)

    def runtime_scales(self, rule: Rule, configs: list[dict | None], fused: dict | None,
                       name: str) -> list[float] | None:
        """Per source, the factor its block of a ``runtime_scale`` tensor is stored times:
        ``runtime_scale(source m) / runtime_scale(fused)`` (None for other tensors)."""
        text = rule.runtime_scale
        if text is None:
            return None
        if fused is None or any(c is None for c in configs):
            raise InputError(f"the {self.name} runtime multiplies tensor {name!r} by {text}, which needs every "
                             "source's config.json", "give model directories with their config.json")
        values = []
        for c in [*configs, fused]:
            value = evaluate(text, self.view(c))
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise InputError(f"the {self.name} runtime scale {text!r} of tensor {name!r} is {value!r} for this "
                                 "config.json, expected a positive number", "the config lacks a field the family needs")
            values.append(float(value))
        *each, whole = values
        return [v / whole for v in each]

    def check_fused(self, config: dict | None) -> None:
        """Refuse a fused config that fails one of the family's ``require`` conditions (its runtime would not
        load it)."""
        spec = self.preset.config
        if spec is None or config is None:
            return
        view = self.view(config)
        for text, why in spec.require.items():
            if evaluate(text, view) is False:
                raise InputError(f"the fused {self.name} config fails {text!r} ({why}): "
                                 + ", ".join(f"{k} = {view.get(k)!r}" for k in sorted(names(text))),
                                 "choose sources whose summed widths meet it (e.g. fuse a different number of copies "
                                 "or other sources)")

    def deviations(self, configs: list[dict | None]) -> list[str]:
        """Why the family's runtime cannot compute the average of these (different) sources exactly: the
        ``reason`` of every deviation whose ``when`` holds in some source."""
        return [d.reason for d in self.preset.deviations
                if any(c is not None and bool(evaluate(d.when, self.view(c))) for c in configs)]

    def widths(self, config: dict | None) -> dict[str, Any]:
        """Widened axis role -> its size in a source with this config (None where it cannot be derived)."""
        spec = self.preset.config
        if spec is None or config is None:
            return {}
        view = self.view(config)
        return {role: evaluate(text, view) for role, text in spec.width_expressions().items()}


def family_of(preset: Preset) -> Family:
    return Family(preset)
