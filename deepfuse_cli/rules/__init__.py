"""Rules as data: which fusion op applies to which tensor, per architecture family."""

from .schema import AXIS_ROLES, OPS, SHARED_ROLES, WIDENED_ROLES, ConfigSpec, OutputSpec, Preset, Rule
from .engine import Match, RuleSet, list_presets, load_preset, load_rules, preset_for_config

__all__ = [
    "AXIS_ROLES", "OPS", "SHARED_ROLES", "WIDENED_ROLES", "ConfigSpec", "OutputSpec", "Preset", "Rule",
    "Match", "RuleSet", "list_presets", "load_preset", "load_rules", "preset_for_config",
]
