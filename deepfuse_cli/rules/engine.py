"""Loading rule files and matching tensor names against them.

Every tensor must be claimed by exactly one rule (a tensor matched by none or by two is
an error naming it and the rules), and every non-optional rule must claim at least one
tensor. Both directions are reported by ``rules check`` and refused by ``fuse``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from ..errors import RuleError
from ..untrusted import parse_json, validation_summary
from .schema import Preset, Rule

PRESET_PACKAGE = "deepfuse_cli.rules.presets"


def list_presets() -> list[str]:
    files = resources.files(PRESET_PACKAGE).iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".json"))


def parse_preset(text: str, origin: str) -> Preset:
    data = parse_json(text, f"rules file {origin}", error=RuleError, expect=None,
                      hint="see `deepfuse rules show llama --json` for a valid example")
    try:
        return Preset.model_validate(data)
    except ValidationError as exc:
        raise RuleError(f"rules file {origin}: {validation_summary(exc)}",
                        "see `deepfuse rules show llama` for a valid example") from None


#: Names that stand for a built-in preset in another naming (``--rules t5x``: T5 in T5X naming).
NAMING_ALIASES = {"t5x": ("t5", "t5x")}


@lru_cache(maxsize=None)
def _builtin(name: str) -> Preset:
    text = resources.files(PRESET_PACKAGE).joinpath(f"{name}.json").read_text(encoding="utf-8")
    return parse_preset(text, f"{name} (built-in)")


def load_preset(name: str) -> Preset:
    """A built-in preset (family) by name, in its own naming; an alias gives it in another naming."""
    if name in NAMING_ALIASES:
        family, naming = NAMING_ALIASES[name]
        return _builtin(family).for_naming(naming)
    if name not in list_presets():
        raise RuleError(f"unknown preset {name!r}", f"known presets: {', '.join(list_presets())}, or give a rules file path")
    return _builtin(name)


def builtin_presets() -> list[Preset]:
    """Every built-in preset in every naming it has."""
    out = []
    for name in list_presets():
        p = _builtin(name)
        out += [p.for_naming(n) for n in p.namings]
    return out


def load_rules(name_or_file: str | Path) -> Preset:
    """A built-in preset by name, or a user rules file by path."""
    s = str(name_or_file)
    if s in list_presets() or s in NAMING_ALIASES:
        return load_preset(s)
    p = Path(s)
    if p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RuleError(f"rules file {p}: cannot read ({exc})") from None
        return parse_preset(text, str(p))
    raise RuleError(f"no preset or rules file named {s!r}", f"known presets: {', '.join(list_presets())}")


def preset_for_config(config: dict | None, origin: str) -> Preset:
    model_type = (config or {}).get("model_type")
    if model_type:
        for name in list_presets():
            preset = _builtin(name)
            if model_type in preset.model_types:
                return preset
    what = f"model_type {model_type!r}" if model_type else "no config.json model_type"
    raise RuleError(
        f"{origin}: unknown architecture family ({what})",
        f"pass --rules with a preset ({', '.join(list_presets())}) or your own rules file; `deepfuse rules infer "
        "MODEL` drafts one from the model (or fuse with --rules infer)",
    )


def rules_digest(data: dict) -> str:
    """The sha256 of a preset's JSON data, canonicalised (sorted keys, no spaces)."""
    canon = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def preset_digest(preset: Preset) -> str:
    return rules_digest(preset.model_dump(mode="json"))


def builtin_preset_with_digest(digest: str, variant: Callable[[Preset], Preset] | None = None) -> Preset | None:
    """The built-in preset whose digest (or its ``variant``'s) is ``digest``, if any: how rules recorded
    in a file we did not write (a manifest) are used without compiling a single pattern taken from it."""
    for preset in builtin_presets():  # every family in every naming
        if digest == preset_digest(preset) or (variant is not None and digest == preset_digest(variant(preset))):
            return preset
    return None


@dataclass(frozen=True)
class Match:
    name: str
    index: int  # index of the rule in the preset
    rule: Rule
    layer: str | None = None  # the layer number {layer} matched, if the pattern has one


class RuleSet:
    """A preset compiled for matching."""

    def __init__(self, preset: Preset):
        self.preset = preset
        self._compiled = [(i, r, r.regex) for i, r in enumerate(preset.rules)]

    def claims(self, name: str) -> list[Match]:
        out = []
        for i, r, rx in self._compiled:
            m = rx.fullmatch(name)
            if m:
                out.append(Match(name, i, r, m.groupdict().get("layer")))
        return out

    def coverage(self, names: list[str]) -> tuple[dict[str, Match], list[str], dict[str, list[Match]], list[int]]:
        """(matched, unmatched names, names claimed twice, indices of required rules claiming nothing)."""
        matched: dict[str, Match] = {}
        unmatched: list[str] = []
        ambiguous: dict[str, list[Match]] = {}
        used: set[int] = set()
        for name in names:
            ms = self.claims(name)
            if not ms:
                unmatched.append(name)
            elif len(ms) > 1:
                ambiguous[name] = ms
            else:
                matched[name] = ms[0]
                used.add(ms[0].index)
        unused = [i for i, r in enumerate(self.preset.rules) if i not in used and not r.optional]
        return matched, unmatched, ambiguous, unused

    def match_all(self, names: list[str], origin: str) -> dict[str, Match]:
        matched, unmatched, ambiguous, unused = self.coverage(names)
        p = self.preset.name
        if unmatched:
            extra = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
            raise RuleError(
                f"{origin}: tensor {unmatched[0]!r} is claimed by no rule of preset {p!r}{extra}",
                "add a rule for it to a rules file (see `deepfuse rules show`) and pass --rules FILE",
            )
        if ambiguous:
            name, ms = next(iter(ambiguous.items()))
            which = ", ".join(f"rules[{m.index}] {m.rule.pattern!r}" for m in ms)
            raise RuleError(f"{origin}: tensor {name!r} is claimed by more than one rule of preset {p!r}: {which}",
                            "make the patterns exclusive")
        if unused:
            r = self.preset.rules[unused[0]]
            raise RuleError(
                f"{origin}: rules[{unused[0]}] {r.pattern!r} of preset {p!r} claims no tensor",
                "the checkpoint is not of this family, or mark the rule \"optional\": true",
            )
        return matched
