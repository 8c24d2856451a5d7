"""``deepfuse verify``: prove a fused checkpoint is the fusion of its sources.

Checks, each reported with figures:

* integrity — every file the manifest lists has the recorded sha256 (no sources needed);
* tensor level — the fused checkpoint holds the planned tensors (names), with the planned shapes and
  dtypes (shapes), and every one equals what its rule makes of the source tensors (decomposition; any
  family, any rules file), with a diagnosis of the first one that does not (which block, what scale);
* config — the fused ``config.json`` is the one the fusion writes;
* function level — any checkpoint transformers can build from its config.json (or the built-in MLP
  forward): probes (seeded random ids, or ``--text``) through the sources and the fused model, in fp32,
  one layer's weights in memory at a time: logits vs the weighted average, per-layer hidden state vs
  the concatenation, the first layer where the fusion property breaks. No runtime: skipped, and the
  verification does not pass (unless ``--no-function``).

Each check declares the checks it needs (``report.NEEDS``); when one of those fails, it is reported as
skipped, naming the failed check, so that a broken checkpoint ends in one failed check, never a traceback.
"""

from .report import Check, Report
from .run import VerifyOptions, run_verify

__all__ = ["Check", "Report", "VerifyOptions", "run_verify"]
