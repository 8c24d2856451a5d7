"""Opening a checkpoint as a source: its format's reader, then its family's config where it carries none.

A T5X/Orbax train state has no ``config.json``: the family whose names it uses infers the model's
dimensions from the parameter shapes (a family hook, e.g. T5's). Formats know nothing of families;
this is where the two meet, before anything is planned.
"""

from __future__ import annotations

from pathlib import Path

from . import hub
from .architectures import family_of
from .formats import open_checkpoint
from .formats.objstore import fetch_checkpoint, parse_url
from .formats.registry import naming_of
from .ir import Checkpoint
from .errors import DeepfuseError
from .rules.engine import list_presets, load_preset, preset_for_config


def open_source(path: str | Path, step: int | None = None) -> Checkpoint:
    """Open ``path`` lazily (no tensor data is read), with a config inferred where it has none.

    ``path`` may be an object-store URL (``gs://``, ``s3://``; T5X/Orbax): the step read is first
    copied into a temporary local directory, and ``metadata["source_url"]`` records the URL.
    ``path`` given as text may be a Hugging Face Hub id (a local path of that name wins): the files
    the checkpoint needs are fetched into (or found in) huggingface_hub's cache, and the checkpoint's
    ``metadata["hub"]`` says which repository, revision and commit it is."""
    url = parse_url(path)
    if url is not None:
        ck = open_checkpoint(fetch_checkpoint(url, step), step=step)
        ck.metadata["source_url"] = str(url)
    elif hub.is_hub_source(path):
        source = hub.resolve(str(path))
        ck = open_checkpoint(source.path, step=step)
        ck.metadata["hub"] = source
        ck.extra_files = [f for f in ck.extra_files if f.name in source.files]  # what was asked for, whatever else is cached
    else:
        ck = open_checkpoint(path, step=step)
    if ck.config is None:
        naming = naming_of(ck)
        shapes = {n: r.shape for n, r in ck.tensors.items()}
        for name in list_presets():
            preset = load_preset(name)
            if naming in preset.namings:
                config = family_of(preset).infer_config(shapes, naming, str(ck.path))
                if config is not None:
                    ck.config = config
                    break
    elif isinstance(ck.config.get("model_type"), str):
        try:
            preset = preset_for_config(ck.config, str(ck.path))
        except DeepfuseError:
            return ck  # no built-in family: the rules given decide (refused at planning if none)
        family_of(preset).check_sizes(ck.config, str(Path(ck.path) / "config.json"))
    return ck
