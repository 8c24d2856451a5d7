"""``deepfuse verify``: prove a fused checkpoint is the fusion of its sources.

Three checks, each reported with figures:

* integrity — every file the manifest lists has the recorded sha256 (no sources needed);
* tensor level — every fused tensor equals what its rule makes of the source tensors (any family,
  any rules file), with a diagnosis of the first one that does not (which block, what scale);
* function level — known families: seeded probes through the sources and the fused model in
  transformers (or the built-in MLP forward): logits vs the weighted average, per-layer hidden
  state vs the concatenation, the first layer where the fusion property breaks.
"""

from .report import Check, Report
from .run import VerifyOptions, run_verify

__all__ = ["Check", "Report", "VerifyOptions", "run_verify"]
