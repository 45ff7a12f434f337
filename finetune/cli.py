"""`lorekeeper finetune ...`: train, inspect data, evaluate and export LoRA adapters.

The commands are thin: they build a TrainConfig (whose fields hold every default and help text),
then call train/evaluate/export. torch and transformers are imported inside the commands so
`lorekeeper --help` stays fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from .augment import DEFAULT_MIN_SIMILARITY
from .config import ConfigError, TrainConfig, field_default, field_help

if TYPE_CHECKING:
    from .runs import RunDir

app = typer.Typer(
    help="Fine-tune the local model on your own data (LoRA, QLoRA for big bases), evaluate it and export it as GGUF.",
    no_args_is_help=True,
)
console = Console(stderr=True)


def _opt(name: str, *flags: str):
    return typer.Option(field_default(name), *flags, help=field_help(name))


def _fail(message: str) -> None:
    # soft_wrap keeps paths whole for copy-paste; markup=False keeps "[...]" in messages literal.
    console.print("[red]error:[/red]", end=" ")
    console.print(message, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command()
def train(
    ctx: typer.Context,
    data: list[Path] | None = typer.Option(None, "--data", "-d", help=field_help("data") + " Repeatable."),
    base: str | None = _opt("base", "--base"),
    from_index: bool = _opt("from_index", "--from-index"),
    path: str | None = typer.Option(None, "--path", help=field_help("index_path_glob")),
    qa_pairs: int = _opt("index_qa_pairs", "--qa-pairs"),
    name: str | None = typer.Option(None, "--name", help="Run name (a folder under the runs directory)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Run directory (overrides --name)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --name/--output from its last checkpoint."
    ),
    max_seq_len: int = _opt("max_seq_len", "--max-seq-len"),
    overlong: str = _opt("overlong", "--overlong"),
    chat_template: str | None = _opt("chat_template", "--chat-template"),
    packing: bool = _opt("packing", "--packing/--no-packing"),
    train_on_prompt: bool = _opt("train_on_prompt", "--train-on-prompt/--answers-only"),
    eval_fraction: float = _opt("eval_fraction", "--eval-fraction"),
    eval_data: list[Path] | None = typer.Option(
        None, "--eval-data", help=field_help("eval_data") + " Repeatable."
    ),
    seed: int = _opt("seed", "--seed"),
    lora_r: int = _opt("lora_r", "--rank", "-r"),
    lora_alpha: int = _opt("lora_alpha", "--alpha"),
    lora_dropout: float = _opt("lora_dropout", "--dropout"),
    target: list[str] | None = typer.Option(
        None, "--target", help=field_help("target_modules") + " Repeatable."
    ),
    use_rslora: bool = _opt("use_rslora", "--rslora/--no-rslora"),
    use_dora: bool = _opt("use_dora", "--dora/--no-dora"),
    neftune_alpha: float = _opt("neftune_alpha", "--neftune-alpha"),
    goal: str | None = _opt("goal", "--goal"),
    base_precision: str = _opt("base_precision", "--base-precision"),
    quantize_4bit: bool | None = typer.Option(
        None, "--4bit/--no-4bit", help="Shorthand for --base-precision nf4 / --base-precision full."
    ),
    epochs: float = _opt("epochs", "--epochs"),
    max_steps: int = _opt("max_steps", "--max-steps"),
    batch_size: int = _opt("batch_size", "--batch-size", "-b"),
    grad_accum: int = _opt("grad_accum", "--grad-accum"),
    learning_rate: float = _opt("learning_rate", "--lr"),
    lr_scheduler: str = _opt("lr_scheduler", "--scheduler"),
    warmup_ratio: float = _opt("warmup_ratio", "--warmup-ratio"),
    optimizer: str = _opt("optimizer", "--optimizer"),
    precision: str = _opt("precision", "--precision"),
    gradient_checkpointing: bool = _opt(
        "gradient_checkpointing", "--gradient-checkpointing/--no-gradient-checkpointing"
    ),
    loss_chunk_tokens: int = _opt("loss_chunk_tokens", "--loss-chunk-tokens"),
    eval_steps: int = _opt("eval_steps", "--eval-steps"),
    save_steps: int = _opt("save_steps", "--save-steps"),
    early_stopping_patience: int = _opt("early_stopping_patience", "--patience"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train a LoRA adapter (on the deployed weights, or QLoRA for big bases) and write a run directory."""
    options = dict(locals())  # the CLI options, taken before any other local exists
    _setup_logging(verbose)
    from .data import DataError
    from .runs import new_run_dir

    run = new_run_dir(name, output)
    given = {option for option in options if _given(ctx, option)}
    config = _resumed_config(run, max_steps) if resume else _new_run_config(run, options, given)
    if config.use_dora:
        console.print(
            "note: a DoRA adapter cannot be exported to GGUF (llama.cpp cannot apply it); "
            "`finetune eval` measures it in transformers",
            markup=False,
        )
    from .base_model import BaseModelError
    from .train import TargetModuleError, train_run

    fresh = not run.root.exists()
    try:
        result = train_run(config, run, resume=resume, console=console)
    except (DataError, BaseModelError, TargetModuleError, ConfigError) as exc:
        _discard_untrained(run, fresh)
        _fail(str(exc))
    except BaseException:
        _discard_untrained(run, fresh)
        raise
    console.print(
        f"[green]done[/green]: {result.steps} steps, held-out loss {result.eval_loss_text}; run in {run.root}"
    )
    typer.echo(str(run.root))


def _discard_untrained(run: RunDir, fresh: bool) -> None:
    """Remove the folder a failed `train` made, when it holds no checkpoint and no adapter, so
    `finetune runs` lists only runs that trained."""
    if fresh and run.root.is_dir() and run.latest_checkpoint() is None and not run.is_trained():
        import shutil

        shutil.rmtree(run.root, ignore_errors=True)


# `train` options that are not TrainConfig fields, and those named differently from their field.
_TRAIN_OPTIONS_NOT_IN_CONFIG = ("ctx", "name", "output", "resume", "verbose")
_TRAIN_OPTION_FIELDS = {"path": "index_path_glob", "qa_pairs": "index_qa_pairs", "target": "target_modules"}


def _resumed_config(run: RunDir, max_steps: int) -> TrainConfig:
    """The saved config of the run in `run`, with --max-steps applied when it was given."""
    if not run.config.is_file():
        _fail(f"--resume: no run at {run.root} (give the same --name or --output as the first time)")
    config = TrainConfig.load(run.config)
    if max_steps != field_default("max_steps"):
        config.max_steps = max_steps  # extending a finished run is the usual reason to resume
    console.print(f"resuming {run.root} with its saved config (max_steps={config.max_steps})")
    return config


def _given(ctx: typer.Context, option: str) -> bool:
    """Whether the user typed `option` (a preset must not override it) rather than leaving its default."""
    try:
        source = ctx.get_parameter_source(option)
    except (AttributeError, KeyError):
        return False
    # by name: typer may bring its own copy of click's ParameterSource enum
    return getattr(source, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")


def _new_run_config(run: RunDir, options: dict, given: set[str]) -> TrainConfig:
    """A TrainConfig from the `train` options given (over --goal's preset, over the defaults);
    refuses a run directory that already holds a run."""
    from .recipes import config_for_goal

    fields = {
        _TRAIN_OPTION_FIELDS.get(option, option): value
        for option, value in options.items()
        if option in given and option not in _TRAIN_OPTIONS_NOT_IN_CONFIG
    }
    fields["data"] = [str(p) for p in (options["data"] or [])]
    if "target_modules" in fields:
        fields["target_modules"] = list(fields["target_modules"] or [])
    four_bit = fields.pop("quantize_4bit", None)
    if four_bit is not None:
        wanted = "nf4" if four_bit else "full"
        if fields.get("base_precision", wanted) != wanted:
            _fail(
                f"--{'' if four_bit else 'no-'}4bit contradicts --base-precision {fields['base_precision']}"
            )
        fields["base_precision"] = wanted
    goal = fields.pop("goal", None)
    try:
        config = config_for_goal(goal, **fields)
    except ConfigError as exc:
        _fail(str(exc))
    if run.config.is_file() and run.latest_checkpoint() is not None:
        _fail(f"{run.root} already holds a run: add --resume to continue it, or pick another --name")
    return config


@app.command("data")
def data_cmd(
    ctx: typer.Context,
    files: list[Path] | None = typer.Argument(None, help="JSONL files, .txt/.md files or folders."),
    goal: str | None = _opt("goal", "--goal"),
    epochs: float = _opt("epochs", "--epochs"),
    max_steps: int = _opt("max_steps", "--max-steps"),
    batch_size: int = _opt("batch_size", "--batch-size", "-b"),
    base: str | None = _opt("base", "--base"),
    from_index: bool = _opt("from_index", "--from-index"),
    path: str | None = typer.Option(None, "--path", help=field_help("index_path_glob")),
    max_seq_len: int = _opt("max_seq_len", "--max-seq-len"),
    packing: bool = _opt("packing", "--packing/--no-packing"),
    chat_template: str | None = _opt("chat_template", "--chat-template"),
    eval_fraction: float = _opt("eval_fraction", "--eval-fraction"),
    eval_data: list[Path] | None = typer.Option(
        None, "--eval-data", help=field_help("eval_data") + " Repeatable."
    ),
    show: int = typer.Option(0, "--show", help="Print this many formatted training examples."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Check a dataset, count its tokens and say how long training will take (errors name the file
    and line). With --goal, the counts and the plan follow that preset, as `train --goal` would."""
    options = dict(locals())
    _setup_logging(False)
    from .base_model import BaseModelError, load_tokenizer, resolve_base
    from .data import DataError, build_datasets, gather_records
    from .prompt import apply_chat_template
    from .recipes import config_for_goal

    names = ("epochs", "max_steps", "batch_size", "max_seq_len", "packing", "eval_fraction")
    given = {name: options[name] for name in names if _given(ctx, name)}
    try:
        config = config_for_goal(
            goal,
            base=base,
            data=[str(p) for p in (files or [])],
            from_index=from_index,
            index_path_glob=path,
            eval_data=[str(p) for p in (eval_data or [])],
            chat_template=chat_template,
            **given,
        )
        gathered = gather_records(config)  # bad files fail here, before the tokenizer loads
        ref = resolve_base(config.base)
        tokenizer = apply_chat_template(load_tokenizer(ref), config.chat_template)
        built = build_datasets(config, tokenizer, gathered=gathered)
    except (ConfigError, DataError, BaseModelError) as exc:
        _fail(str(exc))
    summary = {**built.summary.to_json(), **_training_plan(config, ref, built)}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        table = Table(title="dataset")
        table.add_column("")
        table.add_column("value", justify="right")
        for key, value in summary.items():
            table.add_row(key, str(value))
        Console().print(table)
    for example in built.train_examples[:show]:
        typer.echo("-" * 40)
        typer.echo(tokenizer.decode(example.input_ids))
    if config.goal == "facts":  # on stderr, so --json output stays parseable
        console.print(
            "tip: facts are recalled for more wordings when each question is trained in several; "
            "`lorekeeper finetune augment FILE.jsonl --out AUG.jsonl --paraphrases 3` drafts paraphrased "
            "questions with the local model (answers unchanged); then train on AUG.jsonl with --epochs 8 "
            "(measured: paraphrase recall 55% -> 67%)"
        )


def _training_plan(config: TrainConfig, ref, built) -> dict:
    """Epochs, steps and a rough CPU time the run would take (`finetune data`'s last rows)."""
    from .precision import base_parameter_count
    from .recipes import estimated_seconds, planned_steps

    epochs, steps = planned_steps(config, len(built.train_rows))
    seconds = estimated_seconds(round(built.summary.train_tokens * epochs), base_parameter_count(ref))
    plan = {
        "goal": config.goal or "none (general defaults)",
        "epochs": round(epochs, 2),
        "optimizer_steps": steps,
        "learning_rate": config.learning_rate,
        "lora_rank_alpha": f"{config.lora_r}/{config.lora_alpha}",
    }
    if seconds is not None:
        plan["estimated_cpu_minutes"] = f"~{seconds / 60:.1f} (estimate from a rate measured on 2 cores)"
    return plan


@app.command("augment")
def augment_cmd(
    data: Path = typer.Argument(..., help="A .jsonl file of question/answer rows."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="The .jsonl file to write: every row, then paraphrases."
    ),
    paraphrases: int = typer.Option(3, "--paraphrases", "-n", help="Paraphrases wanted per question."),
    model: Path | None = typer.Option(
        None,
        "--model",
        help="A .gguf model to draft with (default: the generator's model, embedded SmolLM2).",
    ),
    min_similarity: float = typer.Option(
        DEFAULT_MIN_SIMILARITY,
        "--min-similarity",
        help="Keep a draft only this close in meaning (embedder cosine, 0-1, names and numbers masked).",
    ),
    show: int = typer.Option(5, "--show", help="Print this many kept and dropped drafts."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
) -> None:
    """Add paraphrased questions (same answers) to question/answer data, drafted by the local model
    and filtered: still a question, same names and numbers, not a repeat, close in meaning."""
    _setup_logging(False)
    from .augment import Paraphraser, augment_rows, load_models, read_rows, write_rows
    from .data import DataError

    if paraphrases < 1:
        _fail(f"--paraphrases {paraphrases}: ask for at least 1 paraphrase per question")
    if not 0.0 < min_similarity <= 1.0:
        _fail(f"--min-similarity {min_similarity}: give a cosine similarity in (0, 1]")
    if out.resolve() == data.resolve():
        _fail(f"--out {out} is the input file: write the augmented rows to another file")
    try:
        rows, questions = read_rows(data)
    except DataError as exc:
        _fail(str(exc))
    try:
        generator, embedder = load_models(model)
    except ValueError as exc:
        _fail(f"--model: {exc}")
    console.print(
        f"drafting {paraphrases} paraphrase(s) for each of {questions} questions with {generator.model_id}"
    )
    try:
        written, report = augment_rows(
            rows,
            Paraphraser(generator, embedder, min_similarity),
            paraphrases,
            progress=_augment_progress(questions),
        )
    except (RuntimeError, OSError) as exc:  # the model failed to load or to answer: say so, no traceback
        _fail(f"drafting paraphrases with {generator.model_id} failed: {exc}")
    finally:
        generator.close()
    write_rows(written, out)
    _print_augment_report(report, out, show, as_json)


def _augment_progress(questions: int):
    """A progress printer for a terminal (one line, rewritten); None when stderr is not one."""
    if not console.is_terminal:
        return None
    return lambda r: console.print(f"  {r.questions}/{questions} questions, {r.kept} kept", end="\r")


def _print_augment_report(report, out: Path, show: int, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({**report.to_json(), "out": str(out)}, indent=2))
        return
    for line in report.summary_lines(show):
        console.print(line, markup=False, highlight=False)
    typer.echo(f"{report.rows_written} rows written to {out}")


@app.command("eval")
def eval_cmd(
    run: str = typer.Argument(..., help="Run directory or name."),
    prompts: int = typer.Option(3, "--prompts", help="Held-out prompts to answer side by side."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    llama_cpp: bool = typer.Option(
        True, "--llama-cpp/--no-llama-cpp", help="Also measure the exported GGUF(s)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", help="llama.cpp threads (default: its own choice)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Held-out perplexity of the base and of base+adapter, and answers side by side."""
    _setup_logging(False)
    from .evaluate import evaluate_run, render_report
    from .runs import RunNotFound, find_run

    try:
        run_dir = find_run(run)
    except RunNotFound as exc:
        _fail(str(exc))
    if not run_dir.is_trained():
        _fail(f"{run_dir.root} has no adapter yet: train it (or --resume it) before evaluating")
    report = evaluate_run(
        run_dir, n_prompts=prompts, max_new_tokens=max_new_tokens, llama_cpp=llama_cpp, threads=threads
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        render_report(report, Console())


runs_app = typer.Typer(help="List the fine-tuning runs (or remove one with `runs rm NAME`).")
app.add_typer(runs_app, name="runs")


@runs_app.callback(invoke_without_command=True)
def runs(ctx: typer.Context) -> None:
    """List the fine-tuning runs under the runs directory."""
    if ctx.invoked_subcommand is None:
        _list_runs()


@runs_app.command("rm")
def runs_rm(run: str = typer.Argument(..., help="Run directory or name.")) -> None:
    """Remove a run directory (checkpoints, adapter, exports). Registered adapters stay: they keep
    their own copy (`lorekeeper adapters rm NAME` removes one)."""
    import shutil

    from .runs import RunNotFound, find_run

    try:
        run_dir = find_run(run)
    except RunNotFound as exc:
        _fail(str(exc))
    shutil.rmtree(run_dir.root)
    typer.echo(f"removed run {run_dir.name} ({run_dir.root})")


def _list_runs() -> None:
    from lorekeeper.server.settings import Settings

    from .plot import read_metrics
    from .runs import RunDir

    runs_dir = Settings.load().runs_dir
    table = Table(title=str(runs_dir))
    for col in ("run", "trained", "steps", "held-out loss"):
        table.add_column(col)
    for path in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        run = RunDir(path)
        if not run.config.is_file():
            continue
        last_eval, steps = "-", "-"
        for row in read_metrics(run.metrics):
            steps = str(row.get("step", steps))
            if "eval_loss" in row:
                last_eval = f"{row['eval_loss']:.4f}"
        table.add_row(run.name, "yes" if run.is_trained() else "no", steps, last_eval)
    Console().print(table)


@app.command()
def export(
    run: str = typer.Argument(..., help="Run directory or name."),
    name: str | None = typer.Option(
        None, "--name", help="Adapter name in the adapters directory (default: the run's name)."
    ),
    adapter: bool = typer.Option(
        True, "--adapter/--no-adapter", help="Export the LoRA adapter as a GGUF adapter."
    ),
    merged: bool = typer.Option(False, "--merged", help="Also export base + adapter merged into one GGUF."),
    outtype: str = typer.Option(
        "f16", "--outtype", help="Merged model (and converted base) tensor type: f16, f32 or q8_0."
    ),
    quantize: str | None = typer.Option(
        None, "--quantize", help="Quantize the merged model with llama.cpp, e.g. Q4_K_M, Q5_K_M, Q8_0."
    ),
    register: bool = typer.Option(
        True, "--register/--no-register", help="Register the adapter so `ask --adapter NAME` finds it."
    ),
    output_dir: Path | None = typer.Option(
        None, "--output-dir", help="Where to write (default: RUN/export)."
    ),
    description: str | None = typer.Option(
        None, "--description", help="A short description kept in the adapter's record (see `adapters list`)."
    ),
    server_config: bool = typer.Option(
        False,
        "--server-config",
        help="Also print how to serve the adapter on llama-server, llama-cpp-python's server or vLLM "
        "(as `lorekeeper adapters serve-config NAME`).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show llama.cpp's own log."),
) -> None:
    """Export a run's adapter (and optionally a merged model) as GGUF for llama.cpp."""
    _setup_logging(verbose)
    if server_config and not (adapter and register):
        _fail("--server-config serves the registered adapter: leave out --no-adapter and --no-register")
    from .export import AdapterFormatError, ExportError, UnsupportedArchitecture, export_run
    from .runs import RunNotFound, find_run

    try:
        run_dir = find_run(run)
        result = export_run(
            run_dir.root,
            name=name,
            adapter=adapter,
            merged=merged,
            outtype=outtype,
            quantize=quantize,
            register=register,
            output_dir=output_dir,
            description=description,
            verbose=verbose,
        )
    except (RunNotFound, ExportError, UnsupportedArchitecture, AdapterFormatError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(result.to_json(), indent=2) if as_json else str(result))
    if server_config:
        _print_server_config(result.name, to_stderr=as_json)


def _print_server_config(name: str, *, to_stderr: bool) -> None:
    """The commands that serve the just-registered adapter (on stderr after --json, to keep it JSON)."""
    from lorekeeper.server.adapter_serving import plan_for, render
    from lorekeeper.server.adapters import AdapterError, AdapterRegistry
    from lorekeeper.server.settings import Settings

    settings = Settings.load()
    try:
        plan = plan_for(AdapterRegistry(settings.adapters_dir), [name], n_ctx=settings.n_ctx)
    except AdapterError as exc:
        _fail(str(exc))
    typer.echo("\n" + render(plan), err=to_stderr)
