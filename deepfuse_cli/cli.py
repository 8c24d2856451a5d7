"""Command-line interface: a thin typer layer. No fusion logic lives here.

Errors raised as DeepfuseError become one line on stderr and their exit code (2 bad input,
1 verification failed); set DEEPFUSE_DEBUG=1 for a traceback. Data goes to stdout (tables,
``--json``), progress and notes to stderr.
"""

from __future__ import annotations

import functools
import json
import re
import os
import signal
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.errors import ConsoleError
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import __version__, hub
from .errors import DeepfuseError, UsageError
from .formats import registry as formats
from .options import ConvertState, DType, FuseOptions, NoiseMode, NormMode, OptimizerState


class _Commands(typer.core.TyperGroup):
    """A bad option value (a choice not offered, a number that is not one) is one error line, as
    every other usage error."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except typer.BadParameter as exc:
            if os.environ.get("DEEPFUSE_DEBUG"):
                raise
            flags = sorted(getattr(exc.param, "opts", None) or [], key=len)
            detail = (exc.message or "").removeprefix("Value error, ")
            text = f"{flags[-1]}: {detail[:1].lower()}{detail[1:]}" if flags and detail else exc.format_message()
            text = text[:1].lower() + text[1:]
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            _fail(UsageError(text, f"see `{where} --help`"))


app = typer.Typer(
    cls=_Commands,
    name="deepfuse",
    help="Deep Fusion checkpoint surgery: fuse trained checkpoints into one wider model whose hidden state "
    "is the concatenation of theirs and whose output is the average of theirs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
rules_app = typer.Typer(help="List, show and check fusion rule presets and rules files.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")

# Console markup is off: every string printed (titles and cells of tables too) is shown as it is, so
# tensor names, paths and descriptions holding "[...]" can neither vanish nor crash the printing. Our
# own styling is explicit (``styled``), with user text escaped into it.
out = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)


def styled(template: str, *values: object) -> Text:
    """Our own markup ``template`` with ``values`` (user text, escaped) put in its ``{}`` slots."""
    return Text.from_markup(template.format(*(escape(str(v)) for v in values)))


def _fail(exc: DeepfuseError) -> None:
    err.print(styled("[bold red]error:[/] {}", exc.message), highlight=False)
    if exc.hint:
        err.print(styled("[yellow]hint:[/] {}", exc.hint), highlight=False)
    raise typer.Exit(exc.exit_code)


def command(fn):
    """Turn library errors into a one-line message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeepfuseError as exc:
            if os.environ.get("DEEPFUSE_DEBUG"):
                raise
            _fail(exc)
        except KeyboardInterrupt as exc:
            err.print(styled("[red]interrupted[/]: nothing was written"))
            raise typer.Exit(128 + getattr(exc, "signum", signal.SIGINT)) from None

    return wrapper


# ---- shared options -------------------------------------------------------------------------
RulesOpt = Annotated[Optional[str], typer.Option("--rules", help="Preset name or rules file (default: detected from config.json); fuse/self-fuse: 'infer' infers them from the first source and keeps the output only if its function check passes.")]
NormOpt = Annotated[NormMode, typer.Option("--norm", help="Norm mode: 'rule' (stock runtime) or 'prop' (grouped norms, exact).")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", help="Comma-separated positive weights, one per source (normalised to sum 1).")]
NoiseStdOpt = Annotated[float, typer.Option("--noise-std", help="Absolute std of off-diagonal noise (0: exact zeros).")]
NoiseScaleOpt = Annotated[float, typer.Option("--noise-scale", help="Off-diagonal noise std relative to the RMS of that tensor's source blocks.")]
NoiseModeOpt = Annotated[NoiseMode, typer.Option("--noise-mode", help="'offdiag' or 'preserving' (self-fusion: compensated, function unchanged).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for noise; output bytes depend only on inputs, options and seed.")]
DtypeOpt = Annotated[DType, typer.Option("--dtype", help="Output dtype ('keep': the sources').")]
ShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard, e.g. 5GB (decimal, as huggingface_hub counts), 4GiB or bytes.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show the plan and write nothing.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output (only once the new one is complete).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar or notes.")]
OutputOpt = Annotated[Path, typer.Option("-o", "--output", help="Output directory (must not exist, unless --force).")]
VerifyOpt = Annotated[bool, typer.Option("--verify", help="Run `deepfuse verify` on the output; report saved as verify-report.json in it.")]
AllowNonfiniteOpt = Annotated[bool, typer.Option("--allow-nonfinite", help="Fuse sources holding NaN/Inf (reported, and recorded in deepfuse.json) instead of refusing.")]
StepOpt = Annotated[Optional[int], typer.Option("--step", help="T5X/Orbax: the step to read (default: latest).")]
MaxMemoryOpt = Annotated[Optional[str], typer.Option("--max-memory", help="Refuse to start unless the run fits this much memory (e.g. 2GiB); lowers the noise drawn ahead to fit.")]
#: ``--to`` choices: every registered format's name and aliases
OutputFormat = Enum("OutputFormat", {name: name for name in formats.spellings()}, type=str)
_TO_HELP = "Output format: " + ", ".join(f"{' or '.join(a.spellings)} ({a.description})" for a in formats.ADAPTERS)
ToOpt = Annotated[Optional[OutputFormat], typer.Option("--to", case_sensitive=False, help=f"{_TO_HELP}; default: the first source's.")]
OptStateOpt = Annotated[OptimizerState, typer.Option("--optimizer-state", help="T5X/Orbax Adafactor state: 'drop' (restore with a fresh optimizer) or 'fuse' (widened, scaled as the first fused gradients).")]


def _fuse_options(sources: int, args: dict[str, Any], **fixed: Any) -> FuseOptions:
    """The fusion options among a command's arguments (named as the options' fields; ``to`` is
    --to), validated once for ``sources`` sources: a bad value is one error naming its flag."""
    values = {k: v for k, v in args.items() if k in FuseOptions.model_fields}
    to = args.get("to")
    return FuseOptions.parse({"sources": sources}, **values, output_format=to.value if isinstance(to, Enum) else to,
                             **fixed)


def _hash_ahead(paths: list[str], output: Path | None, dry_run: bool) -> None:
    """A run records the sources' sha256: start it now, on the idle core, while torch is imported."""
    if output is not None and not dry_run:
        from .formats.files import prefetch_sha256
        from .formats.hf_layout import likely_weight_files

        try:
            prefetch_sha256(f for p in dict.fromkeys(paths) for f in likely_weight_files(Path(p)))
        except OSError:  # unreadable: the reader reports it properly
            pass


def _note_local(specs: list[str], quiet: bool = False) -> None:
    """Say so where a source that reads as a Hugging Face Hub id is a local path (which wins)."""
    if quiet:
        return
    for spec in dict.fromkeys(specs):
        if hub.shadows_hub_id(spec):
            err.print(f"note: {spec}: using the local {'directory' if os.path.isdir(spec) else 'file'}, not the "
                      "Hugging Face Hub model of that name", highlight=False)


def _open_sources(paths: list[str], copies: int | None, step: int | None, quiet: bool = False) -> list:
    """The sources, Hub ids fetched (huggingface_hub's progress bars on stderr unless ``quiet``);
    ``copies``: self-fusion, the one source that many times."""
    from .sources import open_source

    _note_local(paths, quiet)
    with hub.progress_bars(show=not quiet):
        if copies is not None:
            return [open_source(paths[0], step=step)] * copies
        return [open_source(p, step=step) for p in paths]


def _build(paths: list[str], options: FuseOptions, rules: str | None, step: int | None, quiet: bool = False):
    from .plan import build_plan
    from .rules import load_rules

    sources = _open_sources(paths, len(options.weights) if options.self_fusion else None, step, quiet)
    preset = _inferred(sources[0])[1] if rules == INFER_RULES else load_rules(rules) if rules else None
    return build_plan(sources, options, preset)


#: ``--rules infer``: rules inferred from the first source's model (a fusion kept only if its function check passes)
INFER_RULES = "infer"


def _inferred(ck, partial: bool = False):
    """Rules inferred from checkpoint ``ck``'s config.json, with every tensor of its files classified
    (unless ``partial``): (inference, preset); refused naming the first unclassified parameter."""
    from .errors import RuleError
    from .plan import virtualise_output
    from .rules import RuleSet
    from .rules.infer import Classified, infer_rules, template

    directory = ck.path if ck.path.is_dir() else ck.path.parent
    inference = infer_rules(directory)
    preset = inference.validated()
    refs, _ = virtualise_output(ck, 0, preset)
    _, unmatched, _, _ = RuleSet(preset).coverage(list(refs))
    known = {r.template for r in inference.rows}
    for n in unmatched:
        if (tpl := template(n)) not in known:
            known.add(tpl)
            inference.rows.append(Classified(tpl, "-", tuple(refs[n].shape), None, "in the files, but no parameter "
                                             "of the model transformers builds has this name (renamed on load?)"))
    missing = inference.unclassified
    if missing and not partial:
        first = missing[0]
        raise RuleError(f"{directory}: cannot infer rules: cannot classify {first.template} ({first.module}, "
                        f"{first.why}); {len(missing)} parameter(s) unclassified",
                        f"`deepfuse rules infer {directory}` lists them; write rules for them by hand "
                        "(--partial emits the rest), starting from `deepfuse rules show llama --json`")
    return inference, preset


def _check_inferred(plan, output: Path, quiet: bool) -> None:
    """Keep a fusion made with inferred rules only if verify's function check passes on it."""
    import shutil
    import tempfile

    from .errors import RuleError
    from .verify import VerifyOptions, run_verify

    with tempfile.TemporaryDirectory() as tmp:
        rules_file = Path(tmp) / "inferred-rules.json"
        rules_file.write_text(json.dumps(plan.preset.model_dump(mode="json", exclude_defaults=True)))
        report = run_verify(output, VerifyOptions(rules=str(rules_file)))
    function = [c for c in report.checks if c.name.startswith("function")]
    bad = next((c for c in report.checks if c.status == "fail"), None) or next(
        (c for c in function if c.status != "pass"), None)
    if bad is not None or not function:
        shutil.rmtree(output, ignore_errors=True)
        why = f"{bad.name}: {bad.message}" if bad is not None else "no function check ran"
        hint = ("inferred rules are kept only where the fused function is exact: fuse different sources with "
                "--norm prop" if bad is not None and bad.status == "expected" else
                "write the family's rules by hand, starting from `deepfuse rules infer SRC --partial`")
        raise RuleError(f"{output}: removed: the rules inferred for {plan.preset.model_types[0]} do not give the "
                        f"fused function ({why})", hint)
    if not quiet:
        err.print(f"inferred rules: the function check passes ({function[0].message})", highlight=False)


#: options that change how a run reports, not what it writes: left out of the command a model card shows
_PRESENTATION = {"quiet", "as_json", "force", "dry_run"}


def _command_line(ctx: typer.Context | None) -> str | None:
    """The running command as a shell line (``deepfuse fuse A B --norm prop -o OUTPUT``): its arguments,
    then the options given on the command line, in the command's order, then the output as a
    placeholder (a model card must not depend on where the checkpoint was written)."""
    import shlex

    if ctx is None:
        return None

    def text(value: Any) -> str:
        return str(value.value if isinstance(value, Enum) else value)

    words, options, output = ["deepfuse", ctx.info_name or ""], [], []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "output":  # where it was written is no part of how it was made
            output = ["-o", "OUTPUT"] if value is not None else []
        elif param.param_type_name == "argument":
            words += [text(v) for v in value] if isinstance(value, (list, tuple)) else [text(value)]
        elif (param.name not in _PRESENTATION and value is not None
              and getattr(ctx.get_parameter_source(param.name), "name", None) == "COMMANDLINE"):
            flag = max(param.opts, key=len)
            if getattr(param, "is_flag", False):
                if value:
                    options.append(flag)
            else:
                options += [flag, *([text(v) for v in value] if isinstance(value, (list, tuple)) else [text(value)])]
    return shlex.join(words + options + output)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_plan(plan, as_json: bool) -> None:
    from .plan import role_summary

    if as_json:
        out.print_json(json.dumps(plan.to_json()))
        return
    table = Table(title=f"deepfuse plan: {plan.preset.name}, n={plan.n}, -> {plan.output_adapter.label}"
                  f"{' (self-fusion)' if plan.options.self_fusion else ''}, norm={plan.options.norm}",
                  caption=f"{len(plan.entries)} tensors, {_human(plan.total_bytes)} to write; "
                          f"peak memory ~{_human(plan.peak_memory)}; disk needed ~{_human(plan.disk_needed)}")
    for col in ("tensor", "rule", "op", "axes (* widened)", "sources -> fused", "dtype", "bytes"):
        table.add_column(col, overflow="fold", justify="right" if col == "bytes" else "left")
    for e in plan.entries:
        shapes = " + ".join("x".join(map(str, s)) for s in dict.fromkeys(e.source_shapes))
        if len(set(e.source_shapes)) == 1 and plan.n > 1:
            shapes = f"{plan.n} x [{shapes}]"
        table.add_row(e.name, str(e.rule_index), e.rule.op + (" +noise" if e.noise else ""), role_summary(e.rule),
                      f"{shapes} -> {'x'.join(map(str, e.shape))}", str(e.dtype).removeprefix("torch."),
                      _human(e.nbytes))
    out.print(table)
    for note in plan.notes:
        err.print(f"note: {note}", highlight=False)


def _plan_or_run(plan, output: Path | None, dry_run: bool, force: bool, quiet: bool, as_json: bool,
                 verify: bool, ctx: typer.Context | None = None) -> None:
    if dry_run:
        _print_plan(plan, as_json)
        return
    if output is None:
        raise UsageError("missing -o/--output", "name the output directory, or use --dry-run")
    _run(plan, output, force, quiet, as_json, verify, ctx)


def _run(plan, output: Path, force: bool, quiet: bool, as_json: bool, verify: bool = False,
         ctx: typer.Context | None = None) -> None:
    from .formats.objstore import is_url, parse_url
    from .fuse import write_plan

    if verify and is_url(output):
        raise UsageError(f"--verify writes its report into the output, which is on object storage ({parse_url(output)})",
                         "run `deepfuse verify` on a local copy, or fuse into a local directory with --verify")
    if not quiet:
        for note in plan.notes:
            err.print(f"note: {note}", highlight=False)
    show = not quiet and err.is_terminal
    command = _command_line(ctx)
    start = time.perf_counter()
    if show:
        with Progress(TextColumn("[bold]fusing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), TextColumn("{task.description}", markup=False), console=err,
                      transient=True) as bar:
            task = bar.add_task("", total=plan.total_bytes)
            result = write_plan(plan, output, force=force, command=command, progress=_never_fails(
                lambda e: bar.update(task, advance=e.nbytes, description=e.name)))
    else:
        result = write_plan(plan, output, force=force, command=command)
    elapsed = time.perf_counter() - start
    _never_fails(_say_written)(plan, result, elapsed, quiet, as_json)  # the output is complete whatever happens here
    if verify:
        from .verify import VerifyOptions, run_verify

        report = run_verify(result.output, VerifyOptions())
        report.write_json(result.output / "verify-report.json")
        if plan.output_adapter.model_card:  # the card shows the figures
            from .model_card import write_card

            write_card(result.output, result.manifest, command=command, verify=report.to_json())
        if not as_json:
            _emit_verify(report, None, None, None, False)
        elif not report.passed:
            _emit_verify(report, None, None, None, True)


#: what printing can raise: a closed or full stream, text the terminal's encoding cannot show, rich itself
PRINT_ERRORS = (OSError, UnicodeError, ConsoleError)


def _never_fails(show):
    """``show`` (progress or a summary, printed while or after writing) with its printing errors ignored:
    failing to tell about a write must not make the write fail or be reported as failed."""

    @functools.wraps(show)
    def wrapper(*args, **kwargs):
        try:
            show(*args, **kwargs)
        except PRINT_ERRORS:
            pass

    return wrapper


def _say_written(plan, result, elapsed: float, quiet: bool, as_json: bool) -> None:
    summary = {"output": str(result.output), "tensors": len(plan.entries), "bytes": result.total_bytes,
               "files": result.files, "seconds": round(elapsed, 3), "n": plan.n, "preset": plan.preset.name,
               "notes": plan.notes, "nonfinite": plan.nonfinite}
    if plan.nonfinite and not quiet:
        err.print("note: fused despite non-finite source values (--allow-nonfinite): " + "; ".join(
            f"{d['tensor']} in source {d['source']} ({d['count']} values)" for d in plan.nonfinite),
            markup=False, highlight=False)
    if as_json:
        out.print_json(json.dumps(summary))
    elif not quiet:
        where = plan.output_adapter.summary(result.files)
        err.print(f"wrote {result.output}: {len(plan.entries)} tensors, {_human(result.total_bytes)} in {where} "
                  f"in {elapsed:.1f} s", highlight=False)


# ---- commands -------------------------------------------------------------------------------
@app.command()
@command
def fuse(
    ctx: typer.Context,
    sources: Annotated[list[str], typer.Argument(help="Two or more checkpoints of one architecture: paths, or Hugging Face Hub ids (org/name, org/name@revision).")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output directory.")] = None,
    rules: RulesOpt = None, norm: NormOpt = NormMode.rule, weights: WeightsOpt = None, noise_std: NoiseStdOpt = 0.0,
    noise_scale: NoiseScaleOpt = 0.0, noise_mode: NoiseModeOpt = NoiseMode.offdiag, seed: SeedOpt = 0,
    dtype: DtypeOpt = DType.keep, max_shard_size: ShardOpt = "5GB", dry_run: DryRunOpt = False,
    force: ForceOpt = False, as_json: JsonOpt = False, quiet: QuietOpt = False, step: StepOpt = None,
    verify: VerifyOpt = False, to: ToOpt = None, optimizer_state: OptStateOpt = OptimizerState.drop,
    allow_nonfinite: AllowNonfiniteOpt = False, max_memory: MaxMemoryOpt = None,
):
    """Fuse different models: hidden state = concatenation, output = (weighted) average.

    Example: deepfuse fuse a/ b/ -o fused/ --norm prop --weights 0.25,0.75
    """
    if len(sources) < 2:
        raise UsageError("fuse needs at least two sources", "to widen one model, use `deepfuse self-fuse MODEL --times K`")
    options = _fuse_options(len(sources), locals())
    _hash_ahead(sources, output, dry_run)
    plan = _build(sources, options, rules, step, quiet)
    _plan_or_run(plan, output, dry_run, force, quiet, as_json, verify and rules != INFER_RULES, ctx)
    if rules == INFER_RULES and not dry_run:
        _check_inferred(plan, output, quiet)


@app.command("self-fuse")
@command
def self_fuse(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="The checkpoint to widen: a path, or a Hugging Face Hub id (org/name, org/name@revision).")],
    times: Annotated[int, typer.Option("--times", help="Number of copies K >= 2.")] = 2,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output directory.")] = None,
    rules: RulesOpt = None, norm: NormOpt = NormMode.rule, noise_std: NoiseStdOpt = 0.0, noise_scale: NoiseScaleOpt = 0.0,
    noise_mode: NoiseModeOpt = NoiseMode.offdiag, seed: SeedOpt = 0, dtype: DtypeOpt = DType.keep,
    max_shard_size: ShardOpt = "5GB", dry_run: DryRunOpt = False, force: ForceOpt = False, as_json: JsonOpt = False,
    quiet: QuietOpt = False, step: StepOpt = None, verify: VerifyOpt = False, to: ToOpt = None,
    optimizer_state: OptStateOpt = OptimizerState.drop, allow_nonfinite: AllowNonfiniteOpt = False,
    max_memory: MaxMemoryOpt = None,
):
    """Widen one model K times: computes exactly the source's function (the paper's self deep fusion).

    Example: deepfuse self-fuse small/ --times 2 -o big/ --noise-scale 0.01 --noise-mode preserving
    """
    from .plan import check_copies

    check_copies(times)  # before anything is sized by it
    options = _fuse_options(times, locals(), self_fusion=True)
    _hash_ahead([source], output, dry_run)
    plan = _build([source], options, rules, step, quiet)
    _plan_or_run(plan, output, dry_run, force, quiet, as_json, verify and rules != INFER_RULES, ctx)
    if rules == INFER_RULES and not dry_run:
        _check_inferred(plan, output, quiet)


@app.command()
@command
def convert(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="The checkpoint to convert: a path, or a Hugging Face Hub id.")],
    to: Annotated[OutputFormat, typer.Option("--to", case_sensitive=False, help=f"{_TO_HELP}.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output directory.")] = None,
    rules: RulesOpt = None, dtype: DtypeOpt = DType.keep, max_shard_size: ShardOpt = "5GB", dry_run: DryRunOpt = False,
    force: ForceOpt = False, as_json: JsonOpt = False, quiet: QuietOpt = False, step: StepOpt = None,
    optimizer_state: Annotated[ConvertState, typer.Option("--optimizer-state", help="T5X/Orbax Adafactor state: 'keep' (carried to a T5X/Orbax output) or 'drop'.")] = ConvertState.keep,
    max_memory: MaxMemoryOpt = None,
):
    """Convert a checkpoint between formats without fusing (T5X/Orbax T5 <-> Hugging Face T5).

    Example: deepfuse convert t5x_model/ --to safetensors -o hf_model/
    """
    options = _fuse_options(1, locals(), convert_only=True)
    _hash_ahead([source], output, dry_run)
    plan = _build([source], options, rules, step, quiet)
    _plan_or_run(plan, output, dry_run, force, quiet, as_json, False, ctx)


@app.command("plan")
@command
def plan_cmd(
    sources: Annotated[list[str], typer.Argument(help="Checkpoints to fuse (one with --times for self-fusion): paths, or Hugging Face Hub ids.")],
    times: Annotated[Optional[int], typer.Option("--times", help="Self-fusion: number of copies.")] = None,
    rules: RulesOpt = None, norm: NormOpt = NormMode.rule, weights: WeightsOpt = None, noise_std: NoiseStdOpt = 0.0,
    noise_scale: NoiseScaleOpt = 0.0, noise_mode: NoiseModeOpt = NoiseMode.offdiag, seed: SeedOpt = 0,
    dtype: DtypeOpt = DType.keep, max_shard_size: ShardOpt = "5GB", as_json: JsonOpt = False, step: StepOpt = None,
    to: ToOpt = None, optimizer_state: OptStateOpt = OptimizerState.drop, max_memory: MaxMemoryOpt = None,
):
    """Show every output tensor (rule, op, shapes, dtype, bytes), totals, peak memory and disk needed.

    Example: deepfuse plan a/ b/ --json
    """
    if times is not None:
        from .plan import check_copies

        if len(sources) != 1:
            raise UsageError("--times needs exactly one source")
        check_copies(times)
    elif len(sources) < 2:
        raise UsageError("plan needs two or more sources, or one with --times K")
    options = _fuse_options(times or len(sources), locals(), self_fusion=times is not None)
    plan = _build(sources, options, rules, step)
    _print_plan(plan, as_json)


@app.command()
@command
def inspect(
    model: Annotated[str, typer.Argument(help="A checkpoint (directory or file), or a Hugging Face Hub id (org/name, org/name@revision).")],
    rules: RulesOpt = None, as_json: JsonOpt = False, step: StepOpt = None,
):
    """List tensors, shapes, dtypes, the detected family and the rule claiming each tensor."""
    from .rules import RuleSet, load_rules, preset_for_config

    [ck] = _open_sources([model], None, step)
    preset = None
    family_error = None
    try:
        preset = load_rules(rules) if rules else preset_for_config(ck.config, str(model))
    except DeepfuseError as exc:
        family_error = exc.message
    ruleset = RuleSet(preset) if preset else None
    rows = []
    for ref in ck:
        ms = ruleset.claims(ref.name) if ruleset else []
        rows.append({"name": ref.name, "shape": list(ref.shape), "dtype": str(ref.dtype).removeprefix("torch."),
                     "bytes": ref.nbytes, "rules": [m.index for m in ms], "op": ms[0].rule.op if len(ms) == 1 else None})
    info = {"path": str(ck.path), "format": ck.format, "family": preset.name if preset else None,
            "family_error": family_error, "tensors": rows, "total_bytes": ck.total_bytes,
            "model_type": (ck.config or {}).get("model_type")}
    source = ck.metadata.get("hub")
    if source is not None:
        info["hub"] = {"repo_id": source.repo_id, "revision": source.revision, "commit": source.commit}
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(title=f"{ck.path} ({ck.format}, family: {info['family'] or 'unknown'})",
                  caption=f"{len(rows)} tensors, {_human(ck.total_bytes)}")
    for col in ("tensor", "shape", "dtype", "bytes", "rule", "op"):
        table.add_column(col, overflow="fold")
    for r in rows:
        rule = ", ".join(map(str, r["rules"])) if r["rules"] else (Text("none", style="red") if ruleset else "-")
        table.add_row(r["name"], "x".join(map(str, r["shape"])) or "scalar", r["dtype"], _human(r["bytes"]), rule,
                      r["op"] or "")
    out.print(table)
    if family_error:
        err.print(f"note: {family_error}", highlight=False)


@app.command()
@command
def verify(
    fused: Annotated[Path, typer.Argument(help="The fused checkpoint.")],
    sources: Annotated[Optional[list[str]], typer.Option("--sources", help="Source checkpoints: paths or Hugging Face Hub ids (default: from the manifest). Repeat or list.")] = None,
    times: Annotated[Optional[int], typer.Option("--times", help="Self-fusion: the one source was copied K times.")] = None,
    rules: RulesOpt = None,
    probes: Annotated[int, typer.Option("--probes", help="Probe sequences per forward pass.")] = 4,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Probe length in tokens.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the probe inputs.")] = 0,
    text: Annotated[Optional[Path], typer.Option("--text", help="Probe with this text file's tokens (the source's tokenizer, copied into FUSED), split into --probes sequences of --seq-len tokens, instead of seeded random ids.")] = None,
    tol: Annotated[Optional[float], typer.Option("--tol", help="Relative tolerance on logits and hidden states (default by dtype: fp32 1e-5, fp16 5e-3, bf16 3e-2).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Demand exactness: expected deviations (rule-mode norms, noise) fail.")] = False,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write every figure as JSON.")] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Write a Markdown report (plot as PNG beside it).")] = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Write JUnit XML (one test case per check).")] = None,
    integrity_only: Annotated[bool, typer.Option("--integrity-only", help="Only check the manifest's file digests (no sources).")] = False,
    function: Annotated[bool, typer.Option("--function/--no-function", help="Run the function-level check, in fp32, one layer in memory at a time (--no-function: integrity and tensor level only; the report says the function check was skipped). When no runtime can load the model, verify does not pass (exit 1) unless --no-function is given.")] = True,
    as_json: JsonOpt = False,
):
    """Prove FUSED computes the fusion of its sources: integrity, tensor level, function level.

    Exit 0 pass, 1 fail, 2 bad input. Example: deepfuse verify big/ --junit verify.xml
    """
    from .verify import VerifyOptions, run_verify

    for flag, path in (("--report", report), ("--markdown", markdown), ("--junit", junit)):
        _check_report_path(flag, path)
    _note_local(sources or [])
    with hub.progress_bars(show=True):
        result = run_verify(fused, VerifyOptions.parse(sources=sources, times=times, rules=rules, probes=probes,
                                                       seq_len=seq_len, seed=seed, tol=tol, strict=strict,
                                                       integrity_only=integrity_only, function=function, text=text))
    _emit_verify(result, report, markdown, junit, as_json)


def _check_report_path(flag: str, path: Path | None) -> None:
    """A report file can be written (checked before verifying, so that a typo does not waste the run)."""
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory", "name a file to write the report to")
    if os.path.lexists(path) and not path.is_file():
        raise UsageError(f"{flag} {path} is not a regular file (a dangling link or a device?)", "name a file")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {parent} does not exist", "create it first, or name another file")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: cannot write there (permission denied or read-only)",
                         "choose a writable location")


def _emit_verify(result, report: Path | None, markdown: Path | None, junit: Path | None, as_json: bool) -> None:
    from .errors import VerificationFailed

    for path, write in ((report, result.write_json), (markdown, result.write_markdown), (junit, result.write_junit)):
        if path:
            try:
                write(path)
            except OSError as exc:  # it changed since it was checked, or the disk is full
                raise UsageError(f"writing {path} failed: {exc.strerror or exc}", "choose another location") from None
    if as_json:
        out.print_json(json.dumps(result.to_json(), default=str))
    else:
        table = Table(title=styled("deepfuse verify {}: " + ("[green]PASS[/]" if result.passed else "[red]FAIL[/]"),
                                   result.fused))
        for col in ("check", "status", "details"):
            table.add_column(col, overflow="fold")
        colours = {"pass": "green", "fail": "red", "expected": "yellow", "skip": "dim"}
        for c in result.checks:
            table.add_row(c.name, Text(c.status, style=colours[c.status]), c.message)
        out.print(table)
    if not result.passed:
        bad = result.first_failure
        if bad.unverified:  # nothing failed, but a needed check could not run: not a pass
            raise VerificationFailed(f"{result.fused}: {bad.name}: {bad.message}",
                                     "install a runtime that loads the model (pip install 'deepfuse[verify]'), "
                                     "or pass --no-function to accept the tensor level alone")
        raise VerificationFailed(f"{result.fused}: {bad.name}: {bad.message}",
                                 "the checkpoint is not the fusion it claims to be; re-run the fusion")


@rules_app.command("list")
@command
def rules_list(as_json: JsonOpt = False):
    """List the built-in presets."""
    from .rules import list_presets, load_preset

    presets = [load_preset(n) for n in list_presets()]
    if as_json:
        out.print_json(json.dumps([{"name": p.name, "model_types": p.model_types, "namings": p.namings,
                                    "rules": len(p.rules), "description": p.description} for p in presets]))
        return
    table = Table(title="deepfuse presets (one per model family)")
    for col in ("name", "model_type", "namings", "rules", "description"):
        table.add_column(col, overflow="fold")
    for p in presets:  # the description's first clause; `rules show NAME` prints it whole
        summary = re.split(r"[:;(]|\. ", p.description, maxsplit=1)[0].strip().rstrip(".")
        table.add_row(p.name, ", ".join(p.model_types), ", ".join(p.namings), str(len(p.rules)), summary)
    out.print(table)
    out.print("`deepfuse rules show NAME` prints a family's whole description and rules", style="dim")


@rules_app.command("show")
@command
def rules_show(name: Annotated[str, typer.Argument(help="Preset name or rules file.")], as_json: JsonOpt = False):
    """Show a preset's rules (``--json``: the file itself, a template for your own)."""
    from .rules import OPS, load_rules
    from .plan import role_summary

    p = load_rules(name)
    if as_json:
        out.print_json(json.dumps(p.model_dump(mode="json", exclude_defaults=True)))
        return
    table = Table(title=f"{p.name}: {p.description}")
    for col in ("#", "pattern", "op", "axes (* widened)", "flags"):
        table.add_column(col, overflow="fold")
    for i, r in enumerate(p.rules):
        flags = ", ".join(f for f, on in (("optional", r.optional), ("norm", r.norm)) if on)
        if r.input_axis is not None:
            flags = ", ".join(filter(None, [flags, f"input_axis={r.input_axis}"]))
        if r.runtime_scale is not None:
            flags = ", ".join(filter(None, [flags, f"runtime x {r.runtime_scale}"]))
        table.add_row(str(i), r.pattern, r.op, role_summary(r), flags)
    out.print(table)
    for op, text in OPS.items():
        err.print(f"  {op}: {text}", highlight=False)


@rules_app.command("check")
@command
def rules_check(
    name: Annotated[str, typer.Argument(help="Preset name or rules file.")],
    model: Annotated[Optional[str], typer.Argument(help="A checkpoint to check coverage against (a path or a Hugging Face Hub id).")] = None,
    as_json: JsonOpt = False, step: StepOpt = None,
):
    """Validate a rules file; with MODEL, check every tensor is claimed by exactly one rule and every rule is used."""
    from .errors import RuleError
    from .plan import virtualise_output
    from .rules import RuleSet, load_rules

    preset = load_rules(name)
    report = {"rules": preset.name, "valid": True, "unmatched": [], "ambiguous": {}, "unused": []}
    if model is not None:
        [ck] = _open_sources([model], None, step)
        refs, _ = virtualise_output(ck, 0, preset)
        _, unmatched, ambiguous, unused = RuleSet(preset).coverage(list(refs))
        report.update(unmatched=unmatched, ambiguous={k: [m.index for m in v] for k, v in ambiguous.items()},
                      unused=[{"index": i, "pattern": preset.rules[i].pattern} for i in unused])
    ok = not (report["unmatched"] or report["ambiguous"] or report["unused"])
    if as_json:
        out.print_json(json.dumps(report))
    else:
        err.print(f"rules {preset.name}: valid ({len(preset.rules)} rules)", highlight=False)
        for n in report["unmatched"]:
            err.print(f"  unmatched tensor: {n}", highlight=False)
        for n, idx in report["ambiguous"].items():
            err.print(f"  tensor claimed by several rules {idx}: {n}", highlight=False)
        for u in report["unused"]:
            err.print(f"  rule {u['index']} claims nothing: {u['pattern']}", highlight=False)
        if model is not None and ok:
            err.print(f"  {model}: every tensor claimed by exactly one rule, every rule used", highlight=False)
    if not ok:
        raise RuleError(f"rules {preset.name} do not cover {model} one-to-one",
                        "add or fix rules (unmatched / ambiguous), or mark unused rules optional")


@rules_app.command("infer")
@command
def rules_infer(
    source: Annotated[Path, typer.Argument(help="A Hugging Face model directory (config.json) of a family no preset names.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write the rules file here (default: stdout).")] = None,
    partial: Annotated[bool, typer.Option("--partial", help="Also emit the rules when some parameters are unclassified (still exit 2).")] = False,
    force: ForceOpt = False, as_json: JsonOpt = False,
):
    """Infer a rules file from the model transformers builds for SRC's config.json (meta device, no weights).

    Example: deepfuse rules infer my-model/ -o my-family.json && deepfuse self-fuse my-model/ --rules my-family.json
    """
    from .errors import RuleError

    if output is not None and output.exists() and not force:
        raise UsageError(f"{output} exists", "pass --force to overwrite it, or choose another -o")
    [ck] = _open_sources([str(source)], None, None)
    inference, preset = _inferred(ck, partial=True)
    rules = preset.model_dump(mode="json", exclude_defaults=True)
    missing = inference.unclassified
    table = Table(title=f"{source}: {len(inference.rows) - len(missing)} of {len(inference.rows)} parameters classified")
    for col in ("parameter", "module", "shape (probe)", "op", "axes", "why"):
        table.add_column(col, overflow="fold")
    for r in inference.rows:
        op = r.rule["op"] if r.rule else Text("unclassified", style="red")
        table.add_row(r.template, r.module, "x".join(map(str, r.shape)), op,
                      ", ".join(r.rule["axes"]) if r.rule else "-", r.why)
    emit = not missing or partial
    text = json.dumps(rules, indent=2) + "\n"
    if as_json:
        out.print_json(json.dumps({"rules": rules if emit else None, "classified": len(inference.rows) - len(missing),
                                   "unclassified": [{"parameter": r.template, "module": r.module, "shape": list(r.shape),
                                                     "why": r.why} for r in missing]}))
    else:
        err.print(table)
    if emit and output is not None:
        output.write_text(text)
        err.print(f"wrote {output}: {len(rules['rules'])} rules; review it, then check it: "
                  f"deepfuse rules check {output} {source}", highlight=False)
    elif emit and not as_json:
        out.print(text, end="", highlight=False)
    if missing:
        first = missing[0]
        raise RuleError(f"{source}: cannot classify {first.template} ({first.module}, {first.why}); "
                        f"{len(missing)} parameter(s) unclassified",
                        "write rules for them by hand (--partial emits the rest), starting from `deepfuse rules show llama --json`")


def version_callback(value: bool):
    if value:
        out.print(f"deepfuse {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                              help="Show the version and exit.")] = False):
    pass


def run() -> None:  # console script entry point
    app(prog_name="deepfuse")


if __name__ == "__main__":
    run()
