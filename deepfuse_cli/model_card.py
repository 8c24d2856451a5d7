"""The Hugging Face model card (``README.md``) of every Hugging Face output.

Rendered by ``huggingface_hub`` (:class:`~huggingface_hub.ModelCard` from its card data and a Jinja
template), from the run's manifest: Hub metadata (``base_model`` listing the sources that are Hub
models, ``tags``, ``library_name``), how the checkpoint was made (the command, norm mode, noise,
weights), how to load it (with the grouped-norm lines after ``--norm prop``), and the figures of
``verify`` when it ran. The same run writes the same card: nothing in it depends on the time or on
where the output was written (the command shows the output as ``-o OUTPUT``).

The card is documentation, meant to be edited before publishing: it is not among the files whose
digests the manifest records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import __version__
from .formats.files import write_file
from .formats.hf import MODEL_CARD_NAME
from .manifest import Manifest

TAGS = ["deepfuse", "deep-fusion"]
#: how the loading lines name the checkpoint (the card does not depend on where it was written)
MODEL_PATH = "path/to/model"

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Sources

| # | source | revision | weight |
|---|---|---|---|
{% for s in sources -%}
| {{ loop.index }} | {{ s.name }} | {{ s.revision }} | {{ s.weight }} |
{% endfor %}
## How it was made

{% if command -%}
```bash
{{ command }}
```

{% endif -%}
{% for label, value in facts -%}
- {{ label }}: {{ value }}
{% endfor %}
## How to load

{% if runtime == "builtin" -%}
The {{ family }} family has no transformers model class: read its tensors with safetensors
(`{{ path }}` is this directory).

```python
from safetensors.torch import load_file

tensors = load_file("{{ path }}/model.safetensors")
```
{%- else -%}
`{{ path }}` is this directory, or its repository id once it is on the Hub.

```python
from transformers import {{ runtime }}
{% if grouped %}from deepfuse_cli.grouped_norm import apply_grouped_norms
{% endif %}
model = {{ runtime }}.from_pretrained("{{ path }}")
{% if grouped %}apply_grouped_norms(model)  # norms over each source's slice: groups from config.json
{% endif -%}
```
{%- endif %}
{% if grouped %}
It was fused with `--norm prop`: each norm normalises every source's slice of the hidden state on its
own (groups {{ groups }}). A stock runtime would normalise over the whole width, which is not the fused
function: call `apply_grouped_norms(model)` after every load, before training or inference (install
`deepfuse`). Saved again with `save_pretrained`, the checkpoint keeps its layout.
{% endif %}
{%- if verify %}
## Verification

`deepfuse verify`: **{{ "PASS" if verify.passed else "FAIL" }}**

| check | status | details |
|---|---|---|
{% for c in verify.checks -%}
| {{ c.name }} | {{ c.status }} | {{ c.message | replace("|", "/") }} |
{% endfor %}
{%- endif %}
"""


def _number(x: float) -> str:
    return f"{x:.6g}"


def _sources(manifest: Manifest) -> list[dict[str, str]]:
    if manifest.kind == "self-fusion":  # one source, copied: one row
        [row] = _rows(manifest.sources[:1], manifest.weights[:1])
        return [{**row, "weight": f"{manifest.n} copies, {row['weight']} each"}]
    if manifest.kind == "conversion":
        return [{**row, "weight": "-"} for row in _rows(manifest.sources, manifest.weights)]
    return _rows(manifest.sources, manifest.weights)


def _rows(sources, weights) -> list[dict[str, str]]:
    rows = []
    for rec, weight in zip(sources, weights):
        if rec.hub is not None:
            name = f"[{rec.hub.repo_id}](https://huggingface.co/{rec.hub.repo_id})"
            revision = f"{rec.hub.revision or 'main'} ({rec.hub.commit[:12]})"
        else:
            name = "`" + Path(rec.path).name.replace("`", "'").replace("|", "\\|") + "` (local)"
            revision = f"step {rec.step}" if rec.step is not None else "-"
        rows.append({"name": name, "revision": revision, "weight": _number(weight)})
    return rows


def _source_name(rec) -> str:
    return rec.hub.repo_id if rec.hub is not None else Path(rec.path).name


def _title(manifest: Manifest) -> str:
    names = [_source_name(rec) for rec in manifest.sources]
    if manifest.kind == "conversion":
        return f"{names[0]}, converted to Hugging Face"
    if manifest.kind == "self-fusion":
        return f"{names[0]} x{manifest.n}: self Deep Fusion"
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    return f"Deep Fusion of {listed}"


def _base_models(manifest: Manifest) -> list[str]:
    return list(dict.fromkeys(rec.hub.repo_id for rec in manifest.sources if rec.hub is not None))


def _summary(manifest: Manifest) -> str:
    n = manifest.n
    if manifest.kind == "conversion":
        return (f"A conversion of one {manifest.preset} checkpoint to a Hugging Face directory by deepfuse "
                f"{__version__}.")
    if manifest.kind == "self-fusion":
        return (f"A self Deep Fusion of one {manifest.preset} model: {n} copies side by side, made by deepfuse "
                f"{__version__}. Every hidden state is {n} copies of the source's, and the output is the source's.")
    return (f"A Deep Fusion of {n} {manifest.preset} models, made by deepfuse {__version__}: every hidden state is "
            "the concatenation of the sources' hidden states, and the output is the weighted average of their outputs.")


def _has_norms(manifest: Manifest) -> bool:
    """Whether the rules the run used fuse norm layers (unknown: assume so)."""
    rules = manifest.rules.get("rules") if isinstance(manifest.rules, dict) else None
    return not isinstance(rules, list) or any(isinstance(r, dict) and r.get("norm") for r in rules)


def _function(manifest: Manifest) -> str:
    """How exactly the checkpoint computes what its summary says."""
    noise = manifest.noise.mode
    if manifest.kind == "self-fusion":
        if noise == "offdiag":
            return "the source's, up to the off-diagonal noise"
        return "exactly the source's" + (" (the noise is compensated on the diagonal)" if noise == "preserving" else "")
    if noise != "none":
        return "the weighted average of the sources' outputs, up to the off-diagonal noise"
    if manifest.norm.mode == "rule" and _has_norms(manifest):
        return ("approximately the weighted average of the sources' outputs: one norm over the whole width "
                "differs from each source's own (`deepfuse verify` measures by how much; `--norm prop` is exact)")
    return "exactly the weighted average of the sources' outputs"


def _facts(manifest: Manifest) -> list[tuple[str, str]]:
    facts = [("family (rules)", f"`{manifest.preset}`")]
    if manifest.kind != "conversion":
        facts.append(("function", _function(manifest)))
        facts.append(("weights", ", ".join(map(_number, manifest.weights)) + " (of each source's logits)"))
        norm = manifest.norm
        if not _has_norms(manifest):
            facts.append(("norms", f"none in the {manifest.preset} family"))
        else:
            facts.append(("norms", f"`--norm {norm.mode}`" + (
                f", grouped per source (groups {norm.groups}): exact for any sources" if norm.mode == "prop" else
                ": one norm over the whole width (loads in any runtime; exact for self-fusion)")))
        noise = manifest.noise
        if noise.mode == "none":
            facts.append(("off-diagonal noise", "none (exact zeros)"))
        else:
            size = f"std {_number(noise.std)}" if noise.std else f"scale {_number(noise.scale)} of the blocks' RMS"
            facts.append(("off-diagonal noise", f"{size}, mode `{noise.mode}`, seed {manifest.seed}"))
    facts.append(("dtype", manifest.dtype or "the sources'"))
    return facts


def _runtime_class(manifest: Manifest, config: dict | None) -> str | None:
    """The transformers class the output loads in: the family's, or the head its config.json names
    among the family's heads (BERT: BertForSequenceClassification)."""
    from pydantic import ValidationError

    from .rules.schema import RuntimeSpec

    data = manifest.rules.get("runtime") if isinstance(manifest.rules, dict) else None
    if not isinstance(data, dict):
        return None
    try:
        return RuntimeSpec.model_validate(data).class_for(config)
    except ValidationError:
        return data.get("model_class") if isinstance(data.get("model_class"), str) else None


def render(manifest: Manifest, *, command: str | None = None, verify: dict[str, Any] | None = None,
           config: dict | None = None) -> str:
    """The card's text for the output of the run ``manifest`` records; ``command`` as the user ran it
    (its output named by a placeholder); ``verify``: the report of ``deepfuse verify`` (its JSON);
    ``config``: the output's config.json (which head it is).
    Nothing in it depends on where the output was written: the same run writes the same bytes."""
    from huggingface_hub import ModelCard, ModelCardData

    bases = _base_models(manifest)
    data: dict[str, Any] = {}
    if bases:
        data["base_model"] = bases[0] if len(bases) == 1 else bases
        if len(bases) > 1:
            data["base_model_relation"] = "merge"
    card_data = ModelCardData(library_name="transformers", tags=list(TAGS), **data)
    runtime = _runtime_class(manifest, config)
    card = ModelCard.from_template(
        card_data, template_str=TEMPLATE, title=_title(manifest), path=MODEL_PATH, summary=_summary(manifest), sources=_sources(manifest),
        command=command, facts=_facts(manifest), runtime=runtime or "AutoModel", family=manifest.preset,
        grouped=manifest.norm.mode == "prop" and manifest.kind != "conversion" and _has_norms(manifest),
        groups=manifest.norm.groups,
        verify=verify)
    return str(card).rstrip("\n") + "\n"


def write_card(directory: Path, manifest: Manifest, *, command: str | None = None,
               verify: dict[str, Any] | None = None) -> None:
    """Write (or rewrite, with verify's figures) the model card into ``directory``."""
    config = None
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass  # no config (or not ours to judge): the family's class
    config = config if isinstance(config, dict) else None
    write_file(Path(directory) / MODEL_CARD_NAME,
               render(manifest, command=command, verify=verify, config=config).encode())
