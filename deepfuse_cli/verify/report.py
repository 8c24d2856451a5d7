"""Verification results and their renderings (JSON, Markdown with a plot, JUnit XML), and what each
check needs of the others (:data:`NEEDS`)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["pass", "fail", "expected", "skip"]

#: What each check needs: it runs only when none of these failed, else it is reported as skipped, naming
#: the failed check. A name covers its group ("tensors" is every "tensors: ..." check, and a skipped
#: "tensors" skips each of them); needs are transitive (a check skipped for a failure blocks in its turn).
#: "checkpoint" is the fused checkpoint opened by its format's reader (reported only when that fails).
NEEDS: dict[str, tuple[str, ...]] = {
    "integrity": (),
    "checkpoint": (),
    "tensors": ("checkpoint",),
    "tensors: names": ("checkpoint",),
    "tensors: shapes": ("tensors: names",),
    "tensors: decomposition": ("tensors: shapes",),
    "tensors: per-head norms": ("tensors: shapes",),
    "optimizer state": ("checkpoint",),
    "config": ("checkpoint",),
    "function": ("checkpoint", "tensors: shapes", "config"),
}


@dataclass
class Check:
    name: str
    status: Status
    message: str
    figures: dict[str, Any] = field(default_factory=dict)
    blocked_by: str | None = None  # a skipped check: the failed check it needed
    unverified: bool = False  # a skipped check that was needed (no runtime for the function): not a pass


def _covers(a: str, b: str) -> bool:
    """One name is the other, or the group of the other ("tensors" and "tensors: names")."""
    return a == b or a.startswith(b + ": ") or b.startswith(a + ": ")


def blocker(checks: Iterable[Check], name: str) -> str | None:
    """The failed check that keeps ``name`` from running (see :data:`NEEDS`), if any."""
    for c in checks:
        if any(_covers(c.name, need) for need in NEEDS[name]):
            if c.status == "fail":
                return c.name
            if c.blocked_by is not None:
                return c.blocked_by
    return None


def run_check(checks: list[Check], name: str, run: Callable[[], Iterable[Check]]) -> list[Check]:
    """Append the checks ``run`` gives (``name`` or ``name: ...``), or, when a check it needs failed, one
    skipped check saying which; ``run`` is not called then."""
    failed = blocker(checks, name)
    new = [Check(name, "skip", f"{failed} failed", blocked_by=failed)] if failed else list(run())
    checks.extend(new)
    return new


@dataclass
class Report:
    fused: str
    sources: list[str]
    checks: list[Check] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)  # per-layer deviation for the plot

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def run(self, name: str, run: Callable[[], Iterable[Check]]) -> list[Check]:
        """Run check ``name`` unless a check it needs failed (:func:`run_check`)."""
        return run_check(self.checks, name, run)

    @property
    def passed(self) -> bool:
        return all(c.status != "fail" and not c.unverified for c in self.checks)

    @property
    def first_failure(self) -> Check | None:
        """The first failed check, else the first needed check that could not run."""
        return next((c for c in self.checks if c.status == "fail"), None) or next(
            (c for c in self.checks if c.unverified), None)

    def to_json(self) -> dict[str, Any]:
        failed = self.first_failure
        return {"fused": self.fused, "sources": self.sources, "passed": self.passed,
                "failed": failed.name if failed else None,
                "checks": [asdict(c) for c in self.checks], "layers": self.layers, "meta": self.meta}

    def write_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, sort_keys=True, default=str) + "\n")

    def write_junit(self, path: Path) -> None:
        suite = ET.Element("testsuite", name="deepfuse-verify", tests=str(len(self.checks)),
                           failures=str(sum(c.status == "fail" or c.unverified for c in self.checks)),
                           skipped=str(sum(c.status == "skip" and not c.unverified for c in self.checks)))
        for c in self.checks:
            case = ET.SubElement(suite, "testcase", classname="deepfuse.verify", name=c.name)
            if c.status == "fail" or c.unverified:
                ET.SubElement(case, "failure", message=c.message).text = json.dumps(c.figures, default=str)
            elif c.status == "skip":
                ET.SubElement(case, "skipped", message=c.message)
            else:
                ET.SubElement(case, "system-out").text = f"{c.status}: {c.message} {json.dumps(c.figures, default=str)}"
        ET.ElementTree(ET.Element("testsuites")).getroot().append(suite)
        tree = ET.ElementTree(suite)
        ET.indent(tree)
        tree.write(path, encoding="utf-8", xml_declaration=True)

    def write_markdown(self, path: Path) -> None:
        path = Path(path)
        lines = [f"# deepfuse verify: {'PASS' if self.passed else 'FAIL'}", "",
                 f"Fused checkpoint: `{self.fused}`", "", "Sources: " + ", ".join(f"`{s}`" for s in self.sources), ""]
        failed = self.first_failure
        if failed is not None and failed.unverified:
            lines += [f"Not verified: `{failed.name}` could not run ({failed.message})", ""]
        elif failed is not None:
            lines += [f"Failed: `{failed.name}` (the checks that need it are skipped)", ""]
        lines += ["| check | status | message |", "|---|---|---|"]
        for c in self.checks:
            lines.append(f"| {c.name} | {c.status} | {c.message.replace('|', '/')} |")
        if self.layers:
            lines += ["", "## Per-layer deviation of the fusion property", "",
                      "| layer | max abs error | relative |", "|---|---|---|"]
            lines += [f"| {r['layer']} | {r['max_abs']:.3g} | {r['relative']:.3g} |" for r in self.layers]
            png = path.with_suffix(".png")
            if _plot(self.layers, png):
                lines += ["", f"![per-layer deviation]({png.name})"]
            else:
                lines += ["", "(plot skipped: install matplotlib, e.g. `pip install 'deepfuse[verify]'`)"]
        lines += ["", "```json", json.dumps(self.meta, indent=2, sort_keys=True, default=str), "```", ""]
        path.write_text("\n".join(lines))


def _plot(layers: list[dict[str, Any]], png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.semilogy([r["layer"] for r in layers], [max(r["relative"], 1e-12) for r in layers], marker="o")
    ax.set_xlabel("hidden state (layer)")
    ax.set_ylabel("relative max abs error")
    ax.set_title("fused hidden state vs concatenation of the sources'")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True
