"""``kedit``: each command parses its arguments and calls one library function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err = Console(stderr=True)


class OneLineUsageErrors(typer.core.TyperGroup):
    """Click's own usage errors (an unknown option, a value that is not a number, a missing
    argument) as the same one line, exit status 2, as every other user error; help stays help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        from kedit.util.shutdown import skip_exit_collection

        skip_exit_collection()      # a command that loaded a model would spend ~1.4 s exiting
        # typer vendors click in recent versions: its exception base class, wherever it lives
        click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exception as e:
            if type(e).__name__ == "NoArgsIsHelpError":        # no arguments: the help, as typer shows it
                if e.format_message().strip():                  # (recent typer has shown it already)
                    e.show()
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            where = f" (kedit {ctx.command.name} --help)" if ctx is not None and ctx.command is not self else ""
            msg = " ".join(e.format_message().split())
            err.print(f"[red]error:[/red] {_escape(msg)}{where}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge editing of language models: edit, measure, compare.")

BATCH_HELP = "cases per method call (default: all of them for a batch-native method, MEMIT and its relatives; else 1)"
ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="model name (kedit models), HF directory, .gguf file or hub id")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16")
DeviceMapOpt = typer.Option(None, "--device-map", help="spread the model over devices: auto | balanced | a JSON "
                            "file {module: device} (accelerate's device_map); replaces --device")
# kedit.data.cases.FORMATS, written out so that --help does not import the data layer
FORMAT_HELP = "cases layout: auto | kedit | easyedit | rome | zsre | knowedit | wikibio"
EvalOpt = typer.Option("teacher", "--eval", help="teacher (teacher-forced metrics) | generate (scores of greedy "
                       "answers, the WILD protocol) | all (both)")
CostOpt = typer.Option(False, "--cost", help="also measure what editing costs the model: ppl on WikiText-2 test, "
                       "retained_acc on 200 shipped known facts")
ChatOpt = typer.Option(False, "--chat-template", help="with --eval generate|all: ask through the model's chat template")
PplTokensOpt = typer.Option(20000, "--ppl-tokens", help="with --cost: tokens of the WikiText-2 test split for ppl")
ReportToOpt = typer.Option(None, "--report-to", help="log config, curve and final metrics to experiment trackers: "
                           "tensorboard | wandb | mlflow (repeatable or a comma list; offline, files under the run "
                           "directory)")
ReportDirOpt = typer.Option(None, "--report-dir", help="with --report-to: where the trackers' files go (default: "
                            "the run directory; a sweep: the sweep directory)")
JudgeOpt = typer.Option(None, "--judge", help="with --eval generate|all: a local causal LM directory that grades "
                        "each answer yes/no (gen_*_judge)")


def fail(msg: str) -> None:
    err.print(f"[red]error:[/red] {_escape(msg)}", highlight=False, soft_wrap=True)   # "kedit[gemma]" stays as it is
    raise typer.Exit(2)


def at_least(low: int, **options: int | None) -> None:
    """Refuse any integer option below ``low`` (``None``: not given) with the one-line error;
    the keyword is the option's name without dashes (``batch_size`` -> ``--batch-size``)."""
    for name, value in options.items():
        if value is not None and value < low:
            opt = "-n" if name == "n" else "--" + name.replace("_", "-")
            fail(f"{opt} {value}: must be at least {low}")


def seed_range(seed: int) -> None:
    """A seed torch takes: a 64-bit integer."""
    if not -2 ** 63 <= seed < 2 ** 64:
        fail(f"--seed {seed}: out of range (a 64-bit integer)")


def user_errors():
    """Exceptions that are the user's input, reported as one line with exit status 2."""
    from kedit.data.cases import CasesError
    from kedit.config import ConfigError
    from kedit.data.corpus import CorpusError
    from kedit.models.arch import UnsupportedArchitecture
    from kedit.models.load import ModelError
    from kedit.util.atomic import WriteError

    return (CasesError, ConfigError, CorpusError, ModelError, UnsupportedArchitecture, WriteError)


def writable(**paths: Path | str | None) -> None:
    """Refuse, before any work, an output option whose location cannot be written (a file
    where its directory must be, no permission); the keyword is the option without dashes."""
    from kedit.util.atomic import WriteError, check_writable

    for name, path in paths.items():
        if path is not None:
            try:
                check_writable(path, f"--{name.replace('_', '-')} {path}")
            except WriteError as e:
                fail(str(e))


def this_launch():
    """This process's place under a launcher (:class:`kedit.util.launch.Launch`; alone when
    started without one); a launcher environment that cannot be read is one line."""
    from kedit.util.launch import Launch, LaunchError

    try:
        return Launch.from_env()
    except LaunchError as e:
        fail(str(e))


def refuse_launch(command: str) -> None:
    """Commands that write one run from one process refuse a multi-process launch (one line)."""
    launch = this_launch()
    if launch.sharded:
        fail(f"{command} runs in one process (WORLD_SIZE={launch.world}); `kedit bench` is what splits cases "
             "over processes")


def evaluation_options(eval_mode: str, cost: bool, chat_template: bool, ppl_tokens: int, judge) -> None:
    """Refuse option values that cannot work together, in one line, before any work."""
    from kedit.evaluation.suite import EVAL_MODES

    if eval_mode not in EVAL_MODES:
        fail(f"--eval {eval_mode}: choose one of {' | '.join(EVAL_MODES)}")
    at_least(2, ppl_tokens=ppl_tokens)
    generates = eval_mode in ("generate", "all")
    if (chat_template or judge) and not generates:
        fail("--chat-template and --judge go with --eval generate or --eval all")
    if ppl_tokens != 20000 and not cost:
        fail("--ppl-tokens goes with --cost")
    if judge and not Path(judge).is_dir():
        fail(f"--judge {judge}: not a directory (a local causal LM: config.json, weights, tokenizer)")


def make_evaluation(loaded, eval_mode: str, cost: bool, chat_template: bool, ppl_tokens: int, judge,
                    device: str, dtype: str, say=None):
    """The :class:`~kedit.evaluation.suite.Evaluation` the options ask for (the judge loaded)."""
    from kedit.evaluation.suite import Evaluation

    if chat_template and not getattr(loaded.tokenizer, "chat_template", None):
        fail(f"--chat-template: the tokenizer of {loaded.name} has no chat template")
    from kedit.models.load import ModelError

    try:
        judge_model = _load(str(judge), device, dtype, say or _say) if judge else None
    except ModelError as e:                   # the judge is loaded as a model: name its own option
        fail(str(e).replace(f"--model {judge}", f"--judge {judge}", 1))
    return Evaluation.from_options(eval_mode, cost=cost, chat_template=chat_template, ppl_tokens=ppl_tokens,
                                   judge=judge_model)


def _say(msg: str) -> None:
    err.print(f"[dim]{msg}[/dim]", highlight=False)


def _quiet(msg: str) -> None:
    """What processes other than the main one say (nothing: only the main process prints)."""


def _load(model: str, device: str, dtype: str, say=_say, device_map: str | None = None):
    from kedit.models.load import load_model

    return load_model(model, device=device, dtype=dtype, progress=say, device_map=device_map)


def parse_layers(text: str) -> list[int]:
    """``"5"``, ``"3-7"``, ``"3,5,7"`` -> sorted layer list."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.update(range(int(a), int(b) + 1))
            elif part.strip():
                out.add(int(part))
    except ValueError:
        fail(f"--layers {text!r}: expected e.g. 5, 3-7 or 3,5,7")
    if not out:
        fail(f"--layers {text!r}: no layer in it (expected e.g. 5, 3-7 or 3,5,7)")
    return sorted(out)


def parse_sets(items: list[str]) -> dict:
    """``--set key=value`` (YAML value) -> overrides dict."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--set {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            fail(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e})")
    return out


# --------------------------------------------------------------------------- discovery

@app.command()
def validate(cases: Path = typer.Argument(..., help="edit cases (JSONL / JSON)"),
             fmt: str = typer.Option("auto", "--format", help=FORMAT_HELP)):
    """Check an edit-cases file without loading a model."""
    from kedit.data.cases import validate_cases

    try:
        n, layout = validate_cases(cases, fmt)
    except user_errors() as e:
        fail(str(e))
    console.print(f"{cases}: {n} cases ({layout} layout) OK")


@app.command()
def models():
    """List the embedded default, the model configs in configs/models and the cached models."""
    from kedit.models.catalog import DEFAULT_MODEL, model_configs, source_installed
    from kedit.util.paths import kedit_home

    t = Table(title="models")
    t.add_column("name", no_wrap=True)
    for col in ("installed", "source", "licence", "description"):
        t.add_column(col, overflow="fold")
    missing = []
    for name, cfg in model_configs().items():
        ok = source_installed(cfg.get("source", ""))
        if ok is False and cfg.get("install"):
            missing.append(f"  {name}: {cfg['install']}")
        t.add_row(name + (" (default)" if name == DEFAULT_MODEL else ""), {True: "yes", False: "no"}.get(ok, "-"),
                  str(cfg.get("source", "")), str(cfg.get("licence", "")), str(cfg.get("description", "")))
    console.print(t)
    if missing:
        console.print("not installed; to install:\n" + "\n".join(missing), highlight=False, markup=False)
    cache = kedit_home() / "models"
    cached = sorted(p for p in cache.glob("*") if (p / "config.json").exists()) if cache.exists() else []
    console.print(f"cache {cache}: {len(cached)} converted model(s)")
    for p in cached:
        src = p / "kedit-source.json"
        console.print(f"  {p.name}  {src.read_text().strip() if src.exists() else ''}", highlight=False)


@app.command()
def methods():
    """List the editing methods and their hyperparameter files."""
    from kedit.methods.catalog import shipped_methods  # read from source: no torch to import
    from kedit.util.paths import configs_dir

    t = Table(title="methods (kind: where the edit lives -- weights, adapter, memory, context)")
    for col in ("method", "kind", "description", "hparams files"):
        t.add_column(col)
    for m in shipped_methods():
        files = sorted(p.stem for p in (configs_dir() / "methods" / m.name).glob("*.yaml"))
        t.add_row(m.name, m.kind, m.description, ", ".join(files))
    console.print(t)


# --------------------------------------------------------------------------- statistics

@app.command()
def stats(model: str = ModelOpt,
          layers: str = typer.Option("5", "--layers", help="e.g. 5, 3-7 or 3,5,7"),
          samples: int = typer.Option(1000, "--samples", help="corpus texts (paragraphs)"),
          corpus: Optional[str] = typer.Option(None, "--corpus", help=".txt or .jsonl corpus (default: shipped WikiText-2)"),
          stats_dir: Optional[str] = typer.Option(None, "--stats-dir", help="cache directory (default ./stats or $KEDIT_STATS_DIR)"),
          force: bool = typer.Option(False, "--force", help="recompute even if cached"),
          max_length: int = typer.Option(1024, "--max-length", help="tokens per text (truncated)"),
          device: str = DeviceOpt, dtype: str = DtypeOpt):
    """Second moments E(k kᵀ) of MLP keys per layer, computed in one pass and cached."""
    refuse_launch("kedit stats")
    from kedit.config import check_layer_list
    from kedit.methods.core.stats import get_stats, stats_report

    at_least(1, samples=samples, max_length=max_length)
    wanted = parse_layers(layers)
    writable(stats_dir=stats_dir)
    try:
        loaded = _load(model, device, dtype)
        check_layer_list(wanted, loaded.adapter, f"--layers {layers}")
        if force:
            get_stats(loaded, wanted, corpus=corpus, samples=samples, max_length=max_length,
                      stats_dir=stats_dir, force=True, progress=True)
        report = stats_report(loaded, wanted, compute=True, corpus=corpus, samples=samples,
                              max_length=max_length, stats_dir=stats_dir)
    except user_errors() as e:
        fail(str(e))
    t = Table(title=f"statistics for {model} ({report[0]['corpus']}, max {report[0]['max_length']} tokens/text)")
    for col in ("layer", "cached", "samples", "tokens", "seconds"):
        t.add_column(col, justify="right")
    for row in report:
        secs = row.get("seconds")
        t.add_row(str(row["layer"]), "yes" if row["cached"] else "computed now", str(row["samples"]),
                  f"{row['tokens']:,}" if row.get("tokens") else "–", f"{secs:.1f}" if isinstance(secs, float) else "–")
    console.print(t)
    for row in report:
        console.print(f"  layer {row['layer']}: {row['path']}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- editing

METRIC_COLUMNS = {"rewrite_acc": "rewrite", "rephrase_acc": "rephrase", "locality_acc": "locality",
                  "portability_acc": "portab.", "efficacy_success": "ES", "paraphrase_success": "PS",
                  "neighborhood_success": "NS", "gen_rewrite_acc": "gen rw", "gen_rephrase_acc": "gen rp",
                  "gen_locality_acc": "gen loc"}


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def print_result(result, console: Console = console) -> None:
    cols = [c for c in METRIC_COLUMNS if any(c in r["post"] for r in result.records)]
    t = Table(title="per case: pre → post (ES/PS/NS: efficacy, paraphrase, neighbourhood success)",
              show_lines=False)
    t.add_column("case")
    for c in cols:
        t.add_column(METRIC_COLUMNS[c], justify="center")
    t.add_column("steps", justify="right")
    for r in result.records:
        cells = []
        for c in cols:
            a, b = r["pre"].get(c), r["post"].get(c)
            colour = "green" if b is not None and a is not None and b > a else ("red" if b is not None and a is not None and b < a else "")
            cells.append(f"{_fmt(a)} → [{colour}]{_fmt(b)}[/{colour}]" if colour else f"{_fmt(a)} → {_fmt(b)}")
        t.add_row(str(r["case_id"])[:16], *cells, str(r.get("method", {}).get("steps", "")))
    console.print(t)
    m = result.metrics
    a = Table(title=f"aggregate over {m['n']} cases (mean ± stderr)")
    for col in ("metric", "pre", "post"):
        a.add_column(col, justify="right" if col != "metric" else "left")
    for name, pre, post in result.summary_rows():
        se_pre = m["stderr"]["pre"].get(name)
        se_post = m["stderr"]["post"].get(name)
        a.add_row(name, f"{_fmt(pre)}" + (f" ± {se_pre:.2f}" if se_pre else ""),
                  f"{_fmt(post)}" + (f" ± {se_post:.2f}" if se_post else ""))
    console.print(a)


@app.command()
def edit(cases: Path = typer.Argument(..., help="edit cases (JSONL / JSON)"),
         method: str = typer.Option("rome", "--method", help="editing method (kedit methods)"),
         model: str = ModelOpt,
         hparams: Optional[Path] = typer.Option(None, "--hparams", help="hyperparameter YAML (kedit's or EasyEdit's)"),
         set_: list[str] = typer.Option(None, "--set", help="override one hyperparameter: key=value"),
         out: Path = typer.Option(Path("runs"), "--out", help="where run directories go"),
         sequential: bool = typer.Option(False, "--sequential", help="let edits accumulate instead of restoring"),
         batch_size: Optional[int] = typer.Option(None, "--batch-size", help=BATCH_HELP),
         seed: int = typer.Option(0, "--seed"),
         stats_dir: Optional[str] = typer.Option(None, "--stats-dir"),
         gen_tokens: int = typer.Option(24, "--gen-tokens", help="tokens per before/after generation (0: none)"),
         fmt: str = typer.Option("auto", "--format", help=FORMAT_HELP),
         editor: Optional[str] = typer.Option(None, "--editor", help="trained methods (mend, serac): the `kedit train` "
                                              "run to edit with (default: the newest for this model)"),
         eval_mode: str = EvalOpt, cost: bool = CostOpt, chat_template: bool = ChatOpt,
         ppl_tokens: int = PplTokensOpt, judge: Optional[Path] = JudgeOpt,
         device: str = DeviceOpt, dtype: str = DtypeOpt, device_map: Optional[str] = DeviceMapOpt):
    """Edit a model, measure every case before and after, write runs/<id>/."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from kedit.data.cases import load_cases
    from kedit.runs.experiment import generations_before_after, make_method, resolved_config, write_run
    from kedit.methods.base import RunContext
    from kedit.runs.runner import run_edits

    at_least(1, batch_size=batch_size)
    at_least(0, gen_tokens=gen_tokens)
    seed_range(seed)
    evaluation_options(eval_mode, cost, chat_template, ppl_tokens, judge)
    writable(out=out, stats_dir=stats_dir)
    refuse_launch("kedit edit")
    try:
        case_list = load_cases(cases, fmt)
        loaded = _load(model, device, dtype, device_map=device_map)
        loaded.check_new_tokens(gen_tokens, "--gen-tokens")
        evaluation = make_evaluation(loaded, eval_mode, cost, chat_template, ppl_tokens, judge, device, dtype)
        ctx = RunContext(stats_dir=stats_dir, seed=seed, progress=True, log=_say)
        overrides = {**parse_sets(set_), **({"editor": editor} if editor else {})}
        meth, source = make_method(loaded, method, str(hparams) if hparams else None, overrides, ctx)
    except user_errors() as e:
        fail(str(e))
    method = meth.name                      # the canonical name, whatever spelling was typed
    config = resolved_config(loaded, meth, source, cases_file=str(cases), cases=case_list, sequential=sequential,
                             batch_size=batch_size, command=" ".join(["kedit", *sys.argv[1:]]))
    config["evaluation"] = evaluation.describe()
    _say(f"{method} on {loaded.name} ({loaded.device}, {config['model']['dtype']}), {len(case_list)} cases, "
         f"hparams {source}")
    try:
        meth.prepare()
        with Progress(TextColumn("[bold]editing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=err, transient=False) as bar:
            task = bar.add_task("edit", total=len(case_list))
            result = run_edits(meth, case_list, sequential=sequential, batch_size=batch_size,
                               progress=lambda k: bar.advance(task, k), evaluation=evaluation)
        gens = generations_before_after(loaded, result, gen_tokens) if gen_tokens > 0 else None
        run_dir = write_run(out, loaded, meth, result, config, gens)
    except user_errors() as e:
        fail(str(e))
    except KeyboardInterrupt:
        err.print("interrupted: no run directory written")
        raise typer.Exit(130)
    print_result(result)
    if evaluation.seconds:
        console.print("evaluation seconds by part (pre + post): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in evaluation.seconds.items()), highlight=False)
    if gens:
        from kedit.evaluation.generation import render_table

        render_table([g for g in gens if g["kind"] in ("prompt", "rephrase", "locality", "subject")], console)
    console.print(f"run written to [bold]{run_dir}[/bold]")


@app.command()
def bench(benchmark: Optional[str] = typer.Argument(None, help="counterfact | zsre | knowedit | portability"),
          subset: Optional[str] = typer.Option(None, "--subset", help="knowedit: zsre | wiki-counterfact | wiki-recent | "
                                               "wikibio; portability: zsre-one-hop | counterfact-one-hop | "
                                               "zsre-subject-replace | counterfact-subject-replace | zsre-inverse-relation"),
          method: str = typer.Option("rome", "--method"),
          model: str = ModelOpt,
          n: Optional[int] = typer.Option(None, "-n", help="number of cases"),
          offset: int = typer.Option(0, "--offset", help="first case"),
          batch_size: Optional[int] = typer.Option(None, "--batch-size", help=BATCH_HELP),
          sequential: bool = typer.Option(False, "--sequential", help="edits accumulate (lifelong setting)"),
          checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every",
                                                         help="sequential: evaluate all edits so far every K edits (the curve)"),
          generation: bool = typer.Option(False, "--generation", help="also measure fluency (and consistency) of sampled generations"),
          gen_tokens: int = typer.Option(100, "--gen-tokens", help="with --generation: new tokens per generation "
                                         "(knowedit: tokens per text, the prompt's included, as KnowEdit counts them)"),
          reference: Optional[Path] = typer.Option(None, "--reference",
                                                   help="with --generation: dir with ROME's attribute_snippets.json, idf.npy, tfidf_vocab.json"),
          hparams: Optional[Path] = typer.Option(None, "--hparams"),
          set_: list[str] = typer.Option(None, "--set", help="override one hyperparameter: key=value"),
          data: Optional[str] = typer.Option(None, "--data", help="another file of the benchmark (any kedit layout)"),
          editor: Optional[str] = typer.Option(None, "--editor", help="trained methods (mend, serac): the `kedit train` "
                                               "run to edit with (default: the newest for this model)"),
          eval_mode: str = EvalOpt, cost: bool = CostOpt, chat_template: bool = ChatOpt,
          ppl_tokens: int = PplTokensOpt, judge: Optional[Path] = JudgeOpt,
          out: Path = typer.Option(Path("runs"), "--out"),
          resume: Optional[Path] = typer.Option(None, "--resume", help="continue an interrupted bench run"),
          seed: int = typer.Option(0, "--seed"),
          stats_dir: Optional[str] = typer.Option(None, "--stats-dir"),
          report_to: list[str] = ReportToOpt, report_dir: Optional[Path] = ReportDirOpt,
          device: str = DeviceOpt, dtype: str = DtypeOpt, device_map: Optional[str] = DeviceMapOpt):
    """Benchmark a method on CounterFact, zsRE, KnowEdit or the portability sets; resumable with --resume RUN_DIR."""
    args = dict(locals())
    from contextlib import ExitStack

    with ExitStack() as group:           # the process group, when launched with several processes
        _bench(group, **args)


def _bench(group, *, benchmark, subset, method, model, n, offset, batch_size, sequential, checkpoint_every,
           generation, gen_tokens, reference, hparams, set_, data, editor, eval_mode, cost, chat_template,
           ppl_tokens, judge, out, resume, seed, stats_dir, device, dtype, device_map, report_to=None,
           report_dir=None, run_name=None, report_group=None):
    """The body of ``kedit bench``; ``group`` holds the process group until the command ends.
    ``run_name``: the run directory's name under ``out`` (a sweep's point) instead of a new id;
    ``report_group``: the trackers' group (the sweep's name)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from kedit.runs.bench import BenchError, get_benchmark, load_bench_config, load_benchmark, new_bench_dir, run_bench
    from kedit.runs.experiment import make_method, resolved_config
    from kedit.runs.trackers import Reporter, TrackerError, parse_report_to
    from kedit.methods.base import RunContext
    from kedit.runs.rundir import new_run_id
    launch = this_launch()
    say = _say if launch.main else _quiet
    try:
        if resume:
            cfg = load_bench_config(resume)
            b = cfg["bench"]
            benchmark, n, offset, batch_size, sequential, data = (b["name"], b["n"], b["offset"], b["batch_size"],
                                                                  b["sequential"], b["data"])
            subset = b.get("subset")
            checkpoint_every, generation = b.get("checkpoint_every"), b.get("generation", False)
            gen_tokens, reference = b.get("gen_tokens", 100), b.get("reference")
            method, model, seed = cfg["method"], cfg["model"]["name"], cfg["seed"]
            device, dtype, stats_dir = cfg["model"]["device"], cfg["model"]["dtype"], cfg["stats_dir"]
            device_map = b.get("device_map")
            overrides, hparams = cfg["hparams"], None
            ev_cfg = b.get("evaluation") or {}
            eval_mode, cost = ev_cfg.get("mode", "teacher"), ev_cfg.get("cost", False)
            chat_template, ppl_tokens = ev_cfg.get("chat_template", False), ev_cfg.get("ppl_tokens", 20000)
            judge = Path(ev_cfg["judge"]) if ev_cfg.get("judge") else None
            report_to, report_dir = b.get("report_to") or [], b.get("report_dir")
            report_dir = Path(report_dir) if report_dir else None
        else:
            if benchmark is None:
                fail("give a benchmark (counterfact | zsre | knowedit | portability) or --resume RUN_DIR")
            overrides = {**parse_sets(set_), **({"editor": editor} if editor else {})}
        at_least(1, n=n, batch_size=batch_size, checkpoint_every=checkpoint_every, gen_tokens=gen_tokens)
        at_least(0, offset=offset)
        seed_range(seed)
        evaluation_options(eval_mode, cost, chat_template, ppl_tokens, judge)
        trackers = parse_report_to(report_to)
        if report_dir is not None and not trackers:
            fail("--report-dir goes with --report-to")
        writable(**({"resume": resume} if resume else {"out": out}), stats_dir=stats_dir, report_dir=report_dir)
        if checkpoint_every is not None and not sequential:
            fail("--checkpoint-every needs --sequential")
        if sequential and launch.sharded:
            fail(f"--sequential: edits accumulate in one model and cannot be split over {launch.world} processes "
                 f"(WORLD_SIZE={launch.world}); run it with one process")
        if device_map is not None and launch.sharded:
            fail(f"--device-map: one model spread over devices is one process's; not with WORLD_SIZE={launch.world}")
        if (reference or gen_tokens != 100) and not generation:
            fail("--reference and --gen-tokens go with --generation")
        ref_data = None
        if reference:
            from kedit.evaluation.fluency import TfidfReference
            try:
                ref_data = TfidfReference.load(reference)
            except (OSError, ValueError, KeyError) as e:
                fail(str(e))
        bm = get_benchmark(benchmark, subset)
        cases = load_benchmark(benchmark, data, n, offset, subset=subset)
        device = launch.device(device)
        group.enter_context(launch.group(device))
        with launch.main_first():                      # a GGUF is converted once, by the main process
            loaded = _load(model, device, dtype, say, device_map)
            if generation:
                loaded.check_new_tokens(gen_tokens, "--gen-tokens")
            evaluation = make_evaluation(loaded, eval_mode, cost, chat_template, ppl_tokens, judge, device, dtype,
                                         say)
        extra = None
        if generation:
            from functools import partial

            from kedit.evaluation.fluency import generation_metrics
            extra = partial(generation_metrics, loaded, max_new_tokens=gen_tokens, seed=seed, reference=ref_data,
                            **bm.fluency)
        ctx = RunContext(stats_dir=stats_dir, seed=seed, progress=launch.main, log=say)
        meth, source = make_method(loaded, method, cfg["hparams_source"] if resume else str(hparams) if hparams else None,
                                   overrides, ctx)
    except (BenchError, TrackerError, *user_errors()) as e:
        fail(str(e))
    method = meth.name                      # the canonical name, whatever spelling was typed
    try:
        with launch.main_first():           # statistics and context prefixes: computed once, by the main process
            meth.prepare()                  # (an editor, statistics: a failure here leaves no run directory)
    except user_errors() as e:
        fail(str(e))
    except KeyboardInterrupt:
        err.print("interrupted: " + (f"resume with  kedit bench --resume {resume}" if resume else
                                     "no run directory written"))
        raise typer.Exit(130)
    if resume:
        run_dir = Path(resume)
    elif not launch.main:
        run_dir = None
    else:
        config = resolved_config(loaded, meth, source, cases_file=data or bm.file, cases=cases,
                                 sequential=sequential, batch_size=batch_size,
                                 command=" ".join(["kedit", *sys.argv[1:]]))
        config["bench"] = {"name": benchmark, "subset": subset, "n": n, "offset": offset, "batch_size": batch_size,
                           "sequential": sequential, "checkpoint_every": checkpoint_every,
                           "generation": generation, "gen_tokens": gen_tokens,
                           "reference": str(reference) if reference else None,
                           "data": data, "note": bm.note, "fluency": bm.fluency or None, "device_map": device_map,
                           "evaluation": {"mode": eval_mode, "cost": cost, "chat_template": chat_template,
                                          "ppl_tokens": ppl_tokens, "judge": str(judge) if judge else None},
                           "report_to": trackers, "report_dir": str(report_dir) if report_dir else None}
        run_id = new_run_id(f"bench-{bm.label.replace('/', '-')}-{method}", loaded.name, config)
        try:
            run_dir = new_bench_dir(out, run_name or run_id, config)
        except user_errors() as e:
            fail(str(e))
    run_dir = launch.share(run_dir)                  # the main process's directory, for every process
    say(f"{bm.note}; {len(cases)} cases -> {run_dir}"
        + (f" (sharded over {launch.world} processes)" if launch.sharded else ""))
    reporter = None
    if launch.main and trackers:                     # only the main process logs
        reporter = Reporter(trackers, run_dir, report_dir=report_dir, group=report_group)
        reporter.start(cfg if resume else config)
        say(f"reporting to {', '.join(trackers)} (files under {report_dir or run_dir})")
    sums: dict[str, float] = {}
    count = [0]
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=err, disable=not launch.main) as bar:
            task = bar.add_task("bench", total=len(cases))

            label = f"bench (process 0 of {launch.world})" if launch.sharded else "bench"

            def planned(done: int, mine: int) -> None:
                if launch.sharded:   # the main process counts its own share
                    bar.update(task, total=mine, completed=0, description=label)
                else:
                    bar.update(task, completed=done)

            def on_case(rec: dict) -> None:
                count[0] += 1
                for k in ("rewrite_acc", "efficacy_success", "locality_acc", "portability_acc"):
                    if k in rec["post"]:
                        sums[k] = sums.get(k, 0.0) + rec["post"][k]
                means = "  ".join(f"{k.split('_')[0]} {v / count[0]:.2f}" for k, v in sums.items())
                bar.update(task, advance=1, description=f"{label}  {means}")
            metrics = run_bench(meth, cases, run_dir, batch_size=batch_size, sequential=sequential,
                                checkpoint_every=checkpoint_every, progress=on_case, extra_metrics=extra,
                                evaluation=evaluation, launch=launch, planned=planned, reporter=reporter)
    except KeyboardInterrupt:
        if reporter:
            reporter.finish(None)
        if launch.main:
            err.print(f"interrupted: resume with  kedit bench --resume {run_dir}")
        raise typer.Exit(130)
    except (BenchError, *user_errors()) as e:
        if reporter:
            reporter.finish(None)
        fail(str(e))
    if reporter:
        reporter.finish(metrics)
    if metrics is None:                                # not the main process: it merged and prints
        return
    t = Table(title=f"{bm.label}: {metrics['n']} cases, {method} on {loaded.name} (mean ± stderr)")
    for col in ("metric", "pre", "post", "n"):
        t.add_column(col, justify="right" if col == "n" else "left")
    counts = (metrics.get("count") or {}).get("post", {})
    for name in dict.fromkeys([*metrics["pre"], *metrics["post"]]):
        pre, post = metrics["pre"].get(name), metrics["post"].get(name)
        sp, so = metrics["stderr"]["pre"].get(name), metrics["stderr"]["post"].get(name)
        t.add_row(name, _fmt(pre) + (f" ± {sp:.2f}" if sp else ""), _fmt(post) + (f" ± {so:.2f}" if so else ""),
                  str(counts.get(name, "")))
    console.print(t)
    ts = metrics.get("time") or {}
    if ts:
        console.print(f"time: edits {ts['edit_s']:.0f} s, evaluation {ts['pre_eval_s'] + ts['eval_s']:.0f} s "
                      f"(pre {ts['pre_eval_s']:.0f} s + post {ts['eval_s']:.0f} s) = {100 * ts['eval_share']:.0f}% "
                      "of the edit + evaluation time")
        split = {k.removeprefix("eval_").removesuffix("_s"): v for k, v in ts.items()
                 if k.startswith("eval_") and k.endswith("_s") and k != "eval_s"}
        if split:
            console.print("evaluation by part (pre + post): " + ", ".join(f"{k} {v:.0f} s" for k, v in split.items()))
    console.print(f"run: [bold]{run_dir}[/bold]  ({bm.note})")


@app.command()
def sweep(benchmark: Optional[str] = typer.Argument(None, help="counterfact | zsre | knowedit | portability"),
          methods: list[str] = typer.Option(None, "--method", help="a method to sweep (repeatable)"),
          grid: list[str] = typer.Option(None, "--grid", help="an axis: key=v1,v2 (every method that has key) or "
                                         "method.key=v1,v2 (repeatable)"),
          subset: Optional[str] = typer.Option(None, "--subset", help="knowedit / portability subset"),
          model: str = ModelOpt,
          n: Optional[int] = typer.Option(None, "-n", help="number of cases"),
          offset: int = typer.Option(0, "--offset", help="first case"),
          batch_size: Optional[int] = typer.Option(None, "--batch-size", help=BATCH_HELP),
          data: Optional[str] = typer.Option(None, "--data", help="another file of the benchmark"),
          out: Path = typer.Option(Path("sweeps"), "--out", help="where sweep directories go"),
          resume: Optional[Path] = typer.Option(None, "--resume", help="continue an interrupted sweep"),
          seed: int = typer.Option(0, "--seed"),
          stats_dir: Optional[str] = typer.Option(None, "--stats-dir"),
          report_to: list[str] = ReportToOpt, report_dir: Optional[Path] = ReportDirOpt,
          device: str = DeviceOpt, dtype: str = DtypeOpt):
    """A grid over methods × hyperparameter values, each point a bench run (split over processes like one);
    resumable with --resume SWEEP_DIR."""
    from contextlib import ExitStack

    from kedit.methods.registry import get_method
    from kedit.runs.bench import BenchError, get_benchmark
    from kedit.runs.rundir import new_run_id, unique_run_id
    from kedit.runs.sweep import (REPORT, SweepError, TABLE, grid_points, hyperparameter_names, load_spec, parse_grid,
                                  point_state, save_spec, write_summary)
    from kedit.runs.trackers import TrackerError, parse_report_to
    launch = this_launch()
    try:
        if resume:
            spec = load_spec(resume)
            sweep_dir = Path(resume)
            parse_report_to(spec["bench"].get("report_to"))    # its trackers' libraries, before any work
        else:
            if benchmark is None or not methods:
                fail("give a benchmark and at least one --method (or --resume SWEEP_DIR)")
            at_least(1, n=n, batch_size=batch_size)
            at_least(0, offset=offset)
            seed_range(seed)
            trackers = parse_report_to(report_to)
            if report_dir is not None and not trackers:
                fail("--report-dir goes with --report-to")
            writable(out=out, stats_dir=stats_dir, report_dir=report_dir)
            bm = get_benchmark(benchmark, subset)
            classes = [get_method(m) for m in methods]
            names = [c.name for c in classes]
            axes = parse_grid(list(grid or []), names, {c.name: hyperparameter_names(c) for c in classes})
            spec = {"benchmark": benchmark, "subset": subset, "methods": names, "grid": axes,
                    "bench": {"model": model, "n": n, "offset": offset, "batch_size": batch_size, "data": data,
                              "seed": seed, "stats_dir": stats_dir, "device": device, "dtype": dtype,
                              "report_to": trackers, "report_dir": str(report_dir) if report_dir else None},
                    "command": " ".join(["kedit", *sys.argv[1:]])}
            sweep_dir = None
            if launch.main:
                root = Path(out)
                sweep_dir = root / unique_run_id(root, new_run_id(f"sweep-{bm.label.replace('/', '-')}", model, spec))
                sweep_dir.mkdir(parents=True)
                save_spec(sweep_dir, spec)
    except (SweepError, BenchError, TrackerError, *user_errors()) as e:
        fail(str(e))
    points = grid_points(spec["methods"], spec["grid"])
    say = _say if launch.main else _quiet
    b = spec["bench"]
    with ExitStack() as group:
        group.enter_context(launch.group(launch.device(b["device"])))
        sweep_dir = launch.share(sweep_dir)
        say(f"sweep {sweep_dir}: {len(points)} points")
        for p in points:
            state = launch.share(point_state(sweep_dir, p))     # as the main process sees it
            if state == "done":
                say(f"point {p.index}/{len(points)} {p.name}: done")
                continue
            say(f"point {p.index}/{len(points)} {p.name}" + (" (resumed)" if state == "partial" else ""))
            try:
                _bench(group, benchmark=spec["benchmark"], subset=spec["subset"], method=p.method, model=b["model"],
                       n=b["n"], offset=b["offset"], batch_size=b["batch_size"], sequential=False,
                       checkpoint_every=None, generation=False, gen_tokens=100, reference=None, hparams=None,
                       set_=p.sets(), data=b["data"], editor=None, eval_mode="teacher", cost=False,
                       chat_template=False, ppl_tokens=20000, judge=None, out=sweep_dir,
                       resume=sweep_dir / p.name if state == "partial" else None, seed=b["seed"],
                       stats_dir=b["stats_dir"], device=b["device"], dtype=b["dtype"], device_map=None,
                       report_to=b.get("report_to"),
                       report_dir=Path(b.get("report_dir") or sweep_dir) if b.get("report_to") else None,
                       run_name=p.name, report_group=sweep_dir.name)
            except typer.Exit as e:
                if e.exit_code == 130 and launch.main:
                    err.print(f"interrupted: resume the sweep with  kedit sweep --resume {sweep_dir}")
                raise
    if not launch.main:
        return
    table = write_summary(sweep_dir, points)
    console.print(table, highlight=False, markup=False)
    console.print(f"sweep: [bold]{sweep_dir}[/bold]  ({TABLE}, {REPORT}/report.md; each point a bench run directory)")


# --------------------------------------------------------------------------- compare-gen, apply, runs, report

def _run_errors():
    from kedit.runs.bench import BenchError
    from kedit.methods.edit import EditError
    from kedit.runs.report import ReportError
    from kedit.runs.result import PatchError

    return (PatchError, EditError, ReportError, BenchError, *user_errors())


@app.command("compare-gen")
def compare_gen(run: Optional[Path] = typer.Argument(None, help="run directory (kedit edit); or --cases to edit now"),
                prompt: list[str] = typer.Option(None, "--prompt", "-p", help="a prompt (repeatable); default: "
                                                 "the cases' prompts, rephrasings, locality and subject prompts"),
                prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="prompts file: one a line, or JSONL with 'prompt'"),
                max_new_tokens: int = typer.Option(24, "--max-new-tokens", help="tokens per continuation"),
                sample: bool = typer.Option(False, "--sample", help="sample instead of greedy decoding"),
                temperature: float = typer.Option(1.0, "--temperature", help="sampling temperature"),
                seed: int = typer.Option(0, "--seed", help="sampling seed (and the edit's seed with --cases)"),
                case: Optional[str] = typer.Option(None, "--case", help="only this case's edit and prompts"),
                all_: bool = typer.Option(False, "--all", help="every independent edit at once (their sum)"),
                model: Optional[str] = typer.Option(None, "--model", "-m", help="base model (default: the run's; "
                                                    "with --cases: smollm2-135m)"),
                force: bool = typer.Option(False, "--force", help="use a model whose fingerprint is not the run's"),
                cases: Optional[Path] = typer.Option(None, "--cases", help="edit these cases now instead of reading a run"),
                method: str = typer.Option("rome", "--method", help="with --cases: the editing method"),
                hparams: Optional[Path] = typer.Option(None, "--hparams", help="with --cases: hyperparameter YAML"),
                set_: list[str] = typer.Option(None, "--set", help="with --cases: override one hyperparameter"),
                stats_dir: Optional[str] = typer.Option(None, "--stats-dir"),
                out: Optional[Path] = typer.Option(None, "--out", help="with --cases: write compare-gen.md/.jsonl here"),
                device: str = DeviceOpt,
                dtype: Optional[str] = typer.Option(None, "--dtype", help="default: the run's (float32 with --cases)")):
    """Generate before and after an edit, side by side; writes compare-gen.md/.jsonl into the run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kedit.api import edit as api_edit
    from kedit.runs.compare import compare_result, compare_run, read_prompts_file, write_compare
    from kedit.evaluation.generation import render_table

    if (run is None) == (cases is None):
        fail("give a run directory or --cases FILE (not both)")
    at_least(1, max_new_tokens=max_new_tokens)
    seed_range(seed)
    if sample and not temperature > 0:
        fail(f"--temperature {temperature}: must be > 0")
    writable(out=out)
    try:
        prompts = list(prompt or []) + (read_prompts_file(prompts_file) if prompts_file else [])
        options = dict(case=case, all_=all_, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature,
                       seed=seed)
        if run is not None:
            with err.status("[bold]loading, then generating before and after the edit ..."):
                rows, paths = compare_run(run, model=model, prompts=prompts or None, force=force, device=device,
                                          dtype=dtype, progress=_say, **options)
        else:
            from kedit.data.cases import load_cases

            case_list = load_cases(cases)
            loaded = _load(model or "smollm2-135m", device, dtype or "float32")
            loaded.check_new_tokens(max_new_tokens, "--max-new-tokens")
            with Progress(TextColumn("[bold]editing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=err, transient=True) as bar:     # a refused method leaves one line
                task = bar.add_task("edit", total=len(case_list))
                result = api_edit(loaded, case_list, method, str(hparams) if hparams else None, seed=seed,
                                  stats_dir=stats_dir, on_progress=lambda k: bar.advance(task, k), **parse_sets(set_))
            with err.status("[bold]generating before and after the edit ..."):
                rows = compare_result(loaded, result, prompts or None, **options)
            paths = write_compare(rows, out, f"compare-gen: {method} on {loaded.name}, {cases} "
                                  f"({rows[0]['decoding']})") if out else None
    except _run_errors() as e:
        fail(str(e))
    render_table(rows, console, title=f"before / after ({rows[0]['decoding']}, {max_new_tokens} new tokens)")
    if paths:
        console.print(f"written: {paths[1]}  {paths[0]}", highlight=False, soft_wrap=True)


@app.command("apply")
def apply_patch(run: Path = typer.Argument(..., help="run directory whose edit.safetensors to apply"),
                out: Path = typer.Option(..., "--out", help="new directory for the edited model"),
                model: Optional[str] = typer.Option(None, "--model", "-m", help="base model (default: the run's)"),
                case: Optional[str] = typer.Option(None, "--case", help="the edit of this case (runs of several cases)"),
                all_: bool = typer.Option(False, "--all", help="every independent edit at once (their sum: a model "
                                          "no run evaluated)"),
                force: bool = typer.Option(False, "--force", help="apply to a model whose fingerprint is not the run's"),
                dtype: Optional[str] = typer.Option(None, "--dtype", help="default: the run's")):
    """Write the edited model as a Hugging Face directory (AutoModelForCausalLM.from_pretrained loads it)."""
    from kedit.runs.export import export_run

    writable(out=out)
    try:
        with err.status("[bold]loading the base model, applying the patch, saving ..."):
            path, applied, loaded = export_run(run, out, model=model, case=case, all_=all_, force=force, dtype=dtype,
                                               progress=_say)
    except _run_errors() as e:
        fail(str(e))
    labels = ", ".join(str(d.meta.get("label")) for d in applied)
    kinds = "/".join(sorted({d.kind for d in applied}))
    if all(d.mergeable for d in applied):
        how = f"merged into the weights; load it with AutoModelForCausalLM.from_pretrained({str(path)!r})"
    else:
        how = (f"the base model + kedit-edit.safetensors; load it edited with kedit.load_edited({str(path)!r}) "
               f"(from_pretrained gives the unedited base model)")
    console.print(f"{loaded.name} + {len(applied)} {kinds} edit(s) ({labels}) -> [bold]{path}[/bold]\n{how}",
                  highlight=False, soft_wrap=True)


@app.command("runs")
def runs_list(root: Path = typer.Argument(Path("runs"), help="directory of run directories")):
    """A table of the runs in a directory: time, method, model, n, headline metrics."""
    from kedit.runs.report import list_runs, runs_table

    try:
        found = list_runs(root)
    except _run_errors() as e:
        fail(str(e))
    if not found:
        console.print(f"{root}: no runs")
        return
    console.print(runs_table(found, title=f"{len(found)} runs in {root}"))


@app.command()
def report(runs: list[Path] = typer.Argument(..., help="run directories to compare"),
           out: Optional[Path] = typer.Option(None, "--out", help="where report.md and the PNGs go "
                                              "(default reports/<time>)"),
           table: Optional[str] = typer.Option(None, "--table", help="knowedit: KnowEdit's table (dataset × metric "
                                               "rows, method columns): knowedit.md and knowedit.png"),
           published: bool = typer.Option(True, "--published/--no-published", help="with --table knowedit: the "
                                          "published Llama-2-7b-chat values beside each method")):
    """Compare runs side by side: a markdown report and PNG charts (pre vs post; sequential curves)."""
    import datetime as dt

    from kedit.runs.report import comparison_table, distinguish, summarize, write_knowedit_table, write_report

    if table not in (None, "knowedit"):
        fail(f"--table {table}: the one table is 'knowedit'")
    writable(out=out)
    out = out or Path("reports") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        summaries = distinguish([summarize(r) for r in runs])
        if table == "knowedit":
            written = write_knowedit_table(summaries, out, published=published)
        else:
            written = write_report(summaries, out)
    except _run_errors() as e:
        fail(str(e))
    if table == "knowedit":
        console.print(written["markdown"].read_text(), markup=False, highlight=False, soft_wrap=True)
        for kind, path in written.items():
            console.print(f"{kind}: {path}", highlight=False, soft_wrap=True)
        return
    console.print(comparison_table(summaries))
    for kind, path in written.items():
        console.print(f"{kind}: {path}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- causal tracing

@app.command()
def trace(model: str = ModelOpt,
          prompt: Optional[str] = typer.Option(None, "--prompt", help="prompt to trace (heatmaps)"),
          subject: Optional[str] = typer.Option(None, "--subject", help="the subject, as it occurs in --prompt"),
          target: Optional[str] = typer.Option(None, "--target", help="answer traced through its first token "
                                               "(default: the model's greedy prediction)"),
          kind: list[str] = typer.Option(None, "--kind", help="hidden | mlp | attn, repeatable (default: all three; "
                                         "with --cases only: mlp and hidden)"),
          cases: Optional[Path] = typer.Option(None, "--cases", help="cases file: average indirect effect per layer "
                                               "at the last subject token (answer: ground_truth)"),
          samples: int = typer.Option(10, "--samples", help="noise draws"),
          noise: float = typer.Option(3.0, "--noise", help="noise = this x the embedding standard deviation"),
          window: int = typer.Option(10, "--window", help="layers restored together for mlp / attn"),
          seed: int = typer.Option(0, "--seed"),
          batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="tokens per forward pass"),
          out: Path = typer.Option(Path("runs"), "--out", help="where run directories go"),
          fmt: str = typer.Option("auto", "--format", help=FORMAT_HELP),
          device: str = DeviceOpt, dtype: str = DtypeOpt):
    """Causal tracing (ROME): which layers' states carry the fact; heatmaps and the layer to edit."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from kedit.data.cases import load_cases
    from kedit.runs.experiment import versions
    from kedit.analysis.trace import (TraceError, TraceSettings, configured_layers, embedding_std, prepare_prompt,
                             settings_dict, total_restorations, trace_cases, trace_prompt)
    from kedit.analysis.trace_report import write_trace_run

    if prompt is None and cases is None:
        fail("give --prompt and --subject (heatmaps), --cases FILE (average curve), or both")
    if prompt is not None and subject is None:
        fail("--prompt needs --subject (the subject as it occurs in the prompt)")
    seed_range(seed)
    writable(out=out)
    try:
        kinds = tuple(kind) if kind else (("hidden", "mlp", "attn") if prompt else ("mlp", "hidden"))
        settings = TraceSettings(kinds=kinds, samples=samples, noise=noise, window=window, seed=seed,
                                 batch_tokens=batch_tokens)
        case_list = load_cases(cases, fmt) if cases else None
        loaded = _load(model, device, dtype)
        noise_scale = embedding_std(loaded, noise)
        tp = prepare_prompt(loaded, prompt, subject, target) if prompt else None
    except (TraceError, *user_errors()) as e:
        fail(str(e))
    config = {"model": loaded.describe(), "settings": settings_dict(settings, noise_scale),
              "prompt": {"prompt": prompt, "subject": subject, "target": target} if prompt else None,
              "cases": {"file": str(cases), "n": len(case_list)} if case_list else None,
              "versions": versions(), "command": " ".join(["kedit", *sys.argv[1:]])}
    _say(f"tracing {loaded.name} ({loaded.device}): noise {noise} x std {noise_scale.std:.4g}, "
         f"{samples} draws, kinds {', '.join(settings.kinds)}")
    prompt_trace = cases_trace = None
    seconds: dict[str, float] = {}
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=err) as bar:
            if tp is not None:
                t0 = time.perf_counter()
                task = bar.add_task("restorations", total=total_restorations(tp, loaded.adapter.n_layers,
                                                                             settings.kinds))
                prompt_trace = trace_prompt(loaded, tp, settings, noise_scale, lambda k: bar.advance(task, k))
                seconds["prompt"] = time.perf_counter() - t0
            if case_list:
                t0 = time.perf_counter()
                ctask = bar.add_task("cases", total=len(case_list))
                cases_trace = trace_cases(loaded, case_list, settings, noise_scale,
                                          lambda rec: bar.advance(ctask, 1))
                seconds["cases"] = time.perf_counter() - t0
        configured = configured_layers(loaded)
        run_dir = write_trace_run(out, {**config, "configured": configured}, prompt_trace, cases_trace, configured,
                                  seconds)
    except (TraceError, *user_errors()) as e:
        fail(str(e))
    except KeyboardInterrupt:
        err.print("interrupted: no run directory written")
        raise typer.Exit(130)
    if prompt_trace is not None:
        console.print(f"answer {tp.answer!r} ({tp.answer_source}): p_clean {prompt_trace.p_clean:.4f}, "
                      f"p_corrupt {prompt_trace.p_corrupt:.4f}", highlight=False)
    if cases_trace is not None and (sug := cases_trace.suggestion()):
        console.print(f"average MLP indirect effect over {len(case_list)} cases: suggested ROME layer "
                      f"{sug['rome_layer']}, MEMIT layers {sug['memit_layers']} (configured: ROME "
                      f"{configured['rome_layer']}, MEMIT {configured['memit_layers']})", highlight=False)
    console.print(f"run written to [bold]{run_dir}[/bold]")


@app.command()
def train(method: Optional[str] = typer.Argument(None, help="a trained method: mend | serac"),
          model: str = ModelOpt,
          data: str = typer.Option("counterfact", "--data", help="counterfact | zsre | a cases FILE (with rephrasings "
                                   "and locality prompts)"),
          steps: Optional[int] = typer.Option(None, "--steps", help="optimiser steps (default: the config's); with --resume, a new budget for the run"),
          val_every: Optional[int] = typer.Option(None, "--val-every", help="validate every K steps"),
          hparams: Optional[Path] = typer.Option(None, "--hparams", help="hyperparameter YAML"),
          set_: list[str] = typer.Option(None, "--set", help="override one hyperparameter: key=value"),
          out: Path = typer.Option(Path("runs"), "--out", help="where the training run directory goes"),
          resume: Optional[Path] = typer.Option(None, "--resume", help="continue an interrupted training run"),
          seed: int = typer.Option(0, "--seed"),
          device: str = DeviceOpt, dtype: str = DtypeOpt):
    """Train an editor (MEND, SERAC) for a model: a run directory with the curve, checkpoints and the editor."""
    refuse_launch("kedit train")
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from kedit.config import check_layers, resolve_params
    from kedit.methods.learned.trainer import (cases_from_split, checkpoint_step, new_run_dir, read_config,
                                               run_config, settings_from, train_editor, training_split,
                                               write_config)
    from kedit.methods.registry import get_method
    from kedit.util.atomic import write_text

    at_least(1, steps=steps, val_every=val_every)
    seed_range(seed)
    writable(out=None if resume else out)
    try:
        if resume:
            cfg = read_config(resume)
            method, data, seed = cfg["method"], cfg["data"], cfg["seed"]
            model, device, dtype = cfg["model"]["name"], cfg["model"]["device"], cfg["model"]["dtype"]
            overrides, hparams = dict(cfg["hparams"]), None
            if val_every is not None:
                fail(f"--resume {resume}: --val-every cannot change on resume (the validation steps choose the "
                     "best editor and stop early); start a new run")
            if steps is not None:       # a new budget: the batches depend on seed and step only
                at = checkpoint_step(Path(resume))
                if at is not None and steps < at:
                    fail(f"--resume {resume}: --steps {steps} is below the step its checkpoint reached ({at})")
                overrides["steps"] = steps
        elif method is None:
            fail("give a method (mend | serac) or --resume RUN")
        else:
            overrides = parse_sets(set_)
            overrides.update({k: v for k, v in (("steps", steps), ("val_every", val_every)) if v is not None})
        cls = get_method(method)
        if not hasattr(cls, "learner"):
            fail(f"method '{method}' is not trained (kedit train takes a learned editor: mend, serac)")
        loaded = _load(model, device, dtype)
        source = cfg["hparams_source"] if resume else (str(hparams) if hparams else None)
        params, source = resolve_params(cls, loaded.name, loaded.adapter, None if resume else source, overrides)
        check_layers(params, loaded.adapter, source, set(overrides))
        if resume:
            if cfg["model"]["fingerprint"] != loaded.fingerprint:
                fail(f"--resume {resume}: the run trains for model fingerprint {cfg['model']['fingerprint']}, "
                     f"'{model}' now has {loaded.fingerprint}")
            split = cases_from_split(data, json.loads((Path(resume) / "split.json").read_text()))
            run_dir = Path(resume)
            if steps is not None and steps != cfg["hparams"].get("steps"):
                write_config(run_dir, {**cfg, "hparams": {**cfg["hparams"], "steps": steps}})
        else:
            split = training_split(data, params.val_cases, params.max_train)
        learner = cls.learner(loaded, params, seed)
        if not resume:
            config = run_config(method, loaded, params, source, data, seed)
            run_dir = new_run_dir(out, method, loaded.name, config)
            write_config(run_dir, config)
            write_text(run_dir / "split.json", json.dumps(split.info, indent=1) + "\n")
    except user_errors() as e:
        fail(str(e))
    settings = settings_from(params, seed)
    _say(f"train {method} for {loaded.name} ({loaded.device}): {len(split.train)} training cases, "
         f"{len(split.val)} validation cases ({data}); {settings.steps} steps of {settings.batch_size} -> {run_dir}")
    try:
        with Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=err) as bar:
            task = bar.add_task("", total=settings.steps)

            def on_step(step: int, total: int, info: dict) -> None:
                losses = "  ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in info.items() if k.startswith("loss"))
                bar.update(task, completed=step, description=losses)

            def say(msg: str) -> None:
                bar.console.print(f"[dim]{msg}[/dim]", highlight=False)

            summary = train_editor(learner, split, run_dir, settings, {"name": loaded.name,
                                   "fingerprint": loaded.fingerprint}, resume=bool(resume), progress=on_step, say=say)
    except KeyboardInterrupt:
        err.print(f"interrupted: resume with  kedit train --resume {run_dir}")
        raise typer.Exit(130)
    except user_errors() as e:
        fail(str(e))
    t = Table(title=f"{method} editor for {loaded.name}: {summary['steps']} steps ({summary['stopped']}), "
                    f"best at step {summary['best_step']} (validation, {summary['val_cases']} cases)")
    keys = [k for k in (summary["best"] or {}) if k not in ("step", "kind")]
    t.add_column("validation")
    for col in ("untrained", "best", "last"):
        t.add_column(col, justify="right")
    for k in keys:
        t.add_row(k, *(_fmt((summary[c] or {}).get(k)) for c in ("untrained", "best", "last")))
    console.print(t)
    console.print(f"run: [bold]{run_dir}[/bold]  (curve.png; edit with  --method {method} --editor {run_dir})")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
