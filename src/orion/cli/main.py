"""The ``orion`` command. Each subcommand is a thin layer over the library; user errors end with one line on
stderr and exit status 2, constraint violations with exit status 1."""

from __future__ import annotations

import dataclasses
import functools
import os
import runpy
import sys
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orion import __version__
from orion.errors import OrionError

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

EXIT_VIOLATIONS = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _report(label: str, message: str) -> None:
    err.print(f"[bold red]{label}:[/] {escape(_one_line(message))}", highlight=False, soft_wrap=True)


def handle_errors(fn):
    """Turn Orion's errors and file-system errors into one line and exit status 2; never a traceback for those."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OrionError as exc:
            _report("error", str(exc))
            sys.exit(EXIT_USAGE)
        except OSError as exc:
            name = f" {exc.filename}" if exc.filename else ""
            _report("error", f"{name}: {exc.strerror or exc}".lstrip())
            sys.exit(EXIT_USAGE)
        except Exception as exc:  # a bug in Orion: say so, keep the traceback for ORION_TRACEBACK=1
            if os.environ.get("ORION_TRACEBACK"):
                raise
            _report("internal error", f"{type(exc).__name__}: {exc} (set ORION_TRACEBACK=1 to see where, "
                    "and please report it)")
            sys.exit(EXIT_INTERNAL)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="orion")
def cli() -> None:
    """Orion: compile graphs to Apple Neural Engine programs and run them on the ANE or its emulator."""


def _target_option(fn):
    return click.option("--target", "target_name", default="default", show_default=True,
                        help="Target profile (see `orion targets`).")(fn)


def _quantize_options(fn):
    """``--quantize`` and ``--keep-fp16``: how a model's programs compress their weights (:func:`_compression`)."""
    fn = click.option("--keep-fp16", "keep_fp16", multiple=True, metavar="PATTERN",
                      help="With --quantize: weight names (shell patterns, e.g. 'h00_*') left in fp16; "
                           "repeatable.")(fn)
    return click.option("--quantize", default=None, metavar="SCHEME[/BLOCK]",
                        help="Compress the programs' weights: int8, int4, lut2, lut4, lut6 or lut8, per output "
                             "channel or per block of 32/64/128 (int4/32).")(fn)


def _compression(quantize: str | None, keep_fp16: tuple[str, ...]):
    """The WeightCompression of ``--quantize`` and ``--keep-fp16`` (None: fp16 weights)."""
    from orion.compiler.passes import WeightCompression
    from orion.errors import SettingsError

    if keep_fp16 and quantize is None:
        raise SettingsError("--keep-fp16 needs --quantize")
    spec = WeightCompression.of(quantize)
    return spec and dataclasses.replace(spec, keep=keep_fp16)


def _backend_option(help_text: str | None = None):
    """Every command's ``--backend``, from the backend registry; ``help_text`` replaces the registry's meanings."""
    from orion.runtime.backends import BACKEND_ENV, BACKENDS

    meanings = "; ".join(f"{name}: {meaning}" for name, meaning in BACKENDS.items())
    return click.option("--backend", type=click.Choice(list(BACKENDS)), default="auto", show_default=True,
                        help=help_text or f"{meanings}. {BACKEND_ENV} sets what auto means.")


# -- compile ------------------------------------------------------------------------------------------------------


def load_graph_file(path: Path):
    """Run a Python file that builds a graph: it defines ``build()`` returning a Graph (or GraphBuilder)."""
    from orion.ir.builder import GraphBuilder
    from orion.ir.graph import Graph

    if not path.is_file():
        raise OrionError(f"graph file {path} not found")
    try:
        namespace = runpy.run_path(str(path), run_name="orion_graph")
    except OrionError:
        raise
    except Exception as exc:
        raise OrionError(f"{path}: building the graph failed: {type(exc).__name__}: {exc}") from None
    build = namespace.get("build")
    if not callable(build):
        raise OrionError(f"{path} defines no build() function returning a graph")
    try:
        graph = build()
    except OrionError:
        raise
    except Exception as exc:
        raise OrionError(f"{path}: build() failed: {type(exc).__name__}: {exc}") from None
    if isinstance(graph, GraphBuilder):
        graph = graph.graph
    if not isinstance(graph, Graph):
        raise OrionError(f"{path}: build() returned {type(graph).__name__}, not an orion Graph")
    return graph


def print_violations(violations) -> None:
    if not violations:
        out.print("[green]constraint check: no violations[/]")
        return
    table = Table(title="constraint report", show_lines=False)
    for col in ("id", "severity", "where", "problem", "fix"):
        table.add_column(col, overflow="fold")
    for v in violations:
        style = "red" if v.severity == "error" else "yellow"
        table.add_row(v.constraint, f"[{style}]{v.severity}[/]", v.where, v.message, v.fix)
    out.print(table)


@cli.command("compile")
@click.argument("graph_file", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@_target_option
@click.option("--weights", "weight_layout", type=click.Choice(["per-tensor", "single"]), default="per-tensor",
              show_default=True, help="One weight file per tensor, or all blobs in one file.")
@click.option("--print-graph", is_flag=True, help="Print the optimized graph.")
@handle_errors
def compile_cmd(graph_file: Path, out_dir: Path, target_name: str, weight_layout: str, print_graph: bool) -> None:
    """Compile GRAPH_FILE (a Python file with a build() function) to OUT/model.mil plus weight files."""
    from orion.compiler.compile import compile_graph
    from orion.compiler.targets import get_target

    target = get_target(target_name)
    graph = load_graph_file(graph_file)
    result = compile_graph(graph, target, weight_layout=weight_layout)
    result.module.write(out_dir)
    if print_graph:
        out.print(str(result.graph), highlight=False)
    prog = result.module.program
    out.print(f"wrote {out_dir / 'model.mil'} ({len(prog.statements)} statements, "
              f"{len(result.module.weight_files)} weight files, {result.module.weight_bytes() / 2**20:.2f} MiB) "
              f"for target {target.name} (MIL {target.mil_version})", highlight=False, markup=False)
    out.print(f"inputs (binding order): {', '.join(f'{n} {t}' for n, t in prog.inputs)}", highlight=False)
    out.print(f"outputs (binding order): {', '.join(f'{n} {t}' for n, t in prog.output_types())}", highlight=False)
    for warning in result.sram_warnings:
        out.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    print_violations(result.violations)
    if result.errors:
        sys.exit(EXIT_VIOLATIONS)


# -- run ----------------------------------------------------------------------------------------------------------


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip archive (empty or not)
            raise OrionError(f"{path} is not an .npz archive; save inputs with numpy.savez(path, name=array)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError) as exc:
        raise OrionError(f"{path} is not a readable .npz archive: {exc}") from None


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from orion.fileio import atomic_write

    with atomic_write(path) as f:
        np.savez(f, **arrays)


@cli.command("run")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--inputs", "inputs_file", type=click.Path(path_type=Path),
              help="A .npz with one array per MIL input name.")
@click.option("--random-inputs", "seed", type=int, default=None,
              help="Instead of --inputs: standard-normal inputs from this seed.")
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path), help="Output .npz.")
@click.option("--function", "function", default=None,
              help="Of a program with several functions (main, prefill, decode ...), the one to run (default main).")
@_backend_option()
@_target_option
@handle_errors
def run_cmd(model_dir: Path, inputs_file: Path | None, seed: int | None, out_file: Path, function: str | None,
            backend: str, target_name: str) -> None:
    """Run MODEL_DIR/model.mil (weights resolved under MODEL_DIR), or a Core ML .mlpackage's ML program, and write
    its outputs to OUT."""
    from orion.compiler.constraints import check_program
    from orion.compiler.targets import get_target
    from orion.runtime.program import Program, backends_that_ran

    if (inputs_file is None) == (seed is None):
        raise OrionError("give exactly one of --inputs IN.npz or --random-inputs SEED")
    target = get_target(target_name)
    inputs = _read_npz(inputs_file) if inputs_file is not None else None
    with Program.from_mil(model_dir, backend=backend, target=target, check=False, function=function) as program:
        rejected = sorted({v.constraint for v in check_program(program.module.program, target)
                           if v.severity == "error"})
        if rejected:
            err.print(f"warning: target {escape(target.name)} would reject this program ({', '.join(rejected)}); "
                      f"`orion check {escape(str(model_dir))}` lists why", highlight=False)
        if inputs is None:
            rng = np.random.default_rng(seed)
            inputs = {name: rng.standard_normal(program.module.program.var_types()[name].shape).astype(np.float32)
                      for name in program.input_names}
        outputs = program.run(inputs)
        used = backends_that_ran([program])
        write_npz_atomic(out_file, outputs)  # before cleanup: a failing unload must not lose the results
    for name, array in outputs.items():
        finite = array[np.isfinite(array)].astype(np.float64)
        out.print(f"{name}: {array.dtype}{list(array.shape)} mean {finite.mean() if finite.size else 0:.4g} "
                  f"max|x| {np.abs(finite).max() if finite.size else 0:.4g} "
                  f"non-finite {array.size - finite.size}", highlight=False, markup=False)
    out.print(f"ran on {used}; wrote {out_file}", highlight=False, markup=False)


# -- check --------------------------------------------------------------------------------------------------------


@cli.command("check")
@click.argument("path", type=click.Path(path_type=Path))
@_target_option
@handle_errors
def check_cmd(path: Path, target_name: str) -> None:
    """Validate a MIL program (a .mil file, a directory holding model.mil, with the weight files it names there, or a
    Core ML .mlpackage) against the constraint catalog: everything the emulator refuses at load fails here too. Every
    function of a program with several is checked."""
    from orion.compiler.constraints import check_program
    from orion.compiler.targets import get_target
    from orion.mil.parse import parse_functions, read_mil_file

    target = get_target(target_name)
    text, mil = read_mil_file(path)
    functions = parse_functions(text, str(mil))
    violations = []
    for name, program in functions.items():
        found = check_program(program, target, model_dir=mil.parent)
        if len(functions) > 1:  # say which function; the program-wide findings once
            found = [v if v.where == "program" else dataclasses.replace(v, where=f"function {name}, {v.where}")
                     for v in found if v.where != "program" or name == next(iter(functions))]
        violations += found
        out.print(f"{mil}: {'' if len(functions) == 1 else f'function {name}: '}{len(program.statements)} statements, "
                  f"target {target.name}", highlight=False, markup=False)
    print_violations(violations)
    if any(v.severity == "error" for v in violations):
        sys.exit(EXIT_VIOLATIONS)


# -- catalog and targets ----------------------------------------------------------------------------------------


@cli.command("constraints")
def constraints_cmd() -> None:
    """Print the catalog of ANE constraints."""
    from orion.compiler.constraints import CATALOG

    table = Table(title=f"ANE constraint catalog ({len(CATALOG)} entries)", show_lines=True)
    for col in ("id", "category", "constraint", "symptom", "fix", "checked at", "source"):
        table.add_column(col, overflow="fold")
    for c in CATALOG.values():
        title = c.title + (f" [CONFLICT: target.{c.conflict}]" if c.conflict else "")
        table.add_row(c.id, c.category, title, c.symptom, c.fix, c.checked_at, c.source)
    out.print(table)


@cli.command("targets")
@click.argument("name", required=False)
@handle_errors
def targets_cmd(name: str | None) -> None:
    """List target profiles, or show one profile's settings."""
    from orion.compiler.targets import TARGETS, get_target

    if name is None:
        for key in TARGETS:
            out.print(key)
        return
    target = get_target(name)
    table = Table(title=f"target {target.name}", show_lines=True)
    for col in ("setting", "value", "meaning and source"):
        table.add_column(col, overflow="fold")
    for row in target.describe():
        table.add_row(*[str(x) for x in row])
    out.print(table)


# -- doctor -------------------------------------------------------------------------------------------------------


@cli.command("doctor")
@_backend_option("auto: the ANE and the emulator side by side where an ANE exists, else the emulator; ane, emulator: "
                 "that backend only.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the full report (strict JSON) to this file.")
@click.option("--probe", "probe_ids", multiple=True, metavar="ID",
              help="Run only this probe; repeat for several (default: every probe).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds one probe may take in its child process before it counts as hung.")
@click.option("--write-profile", "profile_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a target profile with the overrides the ANE's verdicts imply (needs an ANE); "
                   "use it with --target FILE.json.")
@_target_option
@handle_errors
def doctor_cmd(backend: str, json_file: Path | None, probe_ids: tuple[str, ...], timeout: float,
               profile_file: Path | None, target_name: str) -> None:
    """Settle the contested ANE facts on this machine: each probe runs in its own process, on the ANE and the
    emulator where an ANE exists, else on the emulator (which shows what Orion assumes)."""
    from orion.errors import SettingsError
    from orion.runtime.backends import requested_backend
    from orion.runtime.doctor import ane_status, print_report, run_doctor, write_profile, write_report

    if profile_file is not None and (requested_backend(backend)[0] == "emulator" or not ane_status()[0]):
        raise SettingsError("--write-profile needs probe results from an Apple Neural Engine, and none can run "
                            "here; drop --write-profile or run on a Mac with Apple silicon")
    report = run_doctor(backend=backend, probes=list(probe_ids) or None, timeout=timeout, target=target_name,
                        on_result=lambda e: err.print(f"{e['id']}: {e['verdict']}", highlight=False, markup=False))
    print_report(report, out)
    if json_file is not None:
        write_report(report, json_file)
        out.print(f"wrote {json_file}", highlight=False, markup=False)
    if profile_file is not None:
        write_profile(report, profile_file)
        out.print(f"wrote profile {profile_file}", highlight=False, markup=False)


# -- models -------------------------------------------------------------------------------------------------------


def _speedup_options(fn):
    """``--draft``, ``--draft-tokens`` and the ``--quantize`` options: how generate and serve make a model faster
    (read by :func:`_load_with_speedups`)."""
    fn = _quantize_options(fn)
    fn = click.option("--draft-tokens", type=click.IntRange(min=1), default=4, show_default=True,
                      help="Tokens the draft proposes per verify pass.")(fn)
    return click.option("--draft", "draft_id", default=None,
                        help="A smaller model with the same tokenizer that drafts tokens for --model to verify in one "
                             "pass (exact speculative decoding: the output is --model's).")(fn)


def _load_with_speedups(stack, model_id: str, draft_id: str | None, quantize: str | None,
                        keep_fp16: tuple[str, ...], **options):
    """The model of ``--model``, its weights compressed as ``--quantize``/``--keep-fp16`` say, and the ``--draft``
    model (None without one; never quantized), both closed when ``stack`` closes."""
    import orion

    spec = _compression(quantize, keep_fp16)
    model = stack.enter_context(orion.load(model_id, quantize=spec, **options))
    draft = None if draft_id is None else stack.enter_context(orion.load(draft_id, **options))
    return model, draft


@cli.command("generate")
@click.option("--model", "model_id", required=True, help="A Hugging Face folder (config.json, model.safetensors, "
              "tokenizer files) or a hub id such as gpt2.")
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--max-tokens", type=click.IntRange(min=0), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=1), default=None)
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None)
@click.option("--seed", type=int, default=None, help="Same seed, same text.")
@_backend_option()
@_target_option
@click.option("--exact-numerics", is_flag=True,
              help="On the emulator, use the target's accumulator model (slow) instead of the fp32 accumulator.")
@click.option("--adapter", "adapter_path", default=None,
              help="A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) or hub id to apply.")
@click.option("--chat", is_flag=True, help="The prompt is a user message: format it with the model's chat template "
              "(tokenizer_config.json).")
@click.option("--head", type=click.Choice(["cpu", "ane"]), default="cpu", show_default=True,
              help="Run the classifier on the CPU or on the ANE (split along the vocabulary).")
@_speedup_options
@handle_errors
def generate_cmd(model_id: str, prompt: str, max_tokens: int, temperature: float, top_k: int | None,
                 top_p: float | None, seed: int | None, backend: str, target_name: str, exact_numerics: bool,
                 adapter_path: str | None, chat: bool, head: str, draft_id: str | None, draft_tokens: int,
                 quantize: str | None, keep_fp16: tuple[str, ...]) -> None:
    """Generate text; tokens stream to the terminal as they come, then one line of figures."""
    import contextlib

    with contextlib.ExitStack() as stack:
        model, draft = _load_with_speedups(stack, model_id, draft_id, quantize, keep_fp16, backend=backend,
                                           target=target_name, accumulator=None if exact_numerics else "fp32",
                                           head=head)
        if chat and getattr(model.tokenizer, "chat_template", None) is None:
            _warn("this model's tokenizer has no chat template: the prompt is formatted plainly, as "
                  "'user: PROMPT' and 'assistant:' lines")
        if adapter_path is not None:
            model.set_adapter(model.load_adapter(adapter_path))
        click.echo(prompt, nl=chat)
        for piece in model.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=seed, stream=True, chat=chat, draft=draft,
                                    draft_tokens=draft_tokens):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        adapter = f" | adapter {model.active_adapter}" if model.active_adapter else ""
        err.print(f"[dim]{escape(model.stats.line() + adapter)}[/]", highlight=False)


# -- serve --------------------------------------------------------------------------------------------------------


def _named_adapters(specs: tuple[str, ...], model_id: str) -> dict[str, str]:
    """``NAME=PATH`` options as {name: path}, refusing a missing part, a repeated name or the base model's id."""
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise OrionError(f"--adapter {spec!r} is not NAME=PATH (a name for the model field, then a PEFT adapter "
                             "folder or hub id)")
        if name in adapters or name == model_id:
            raise OrionError(f"--adapter name {name!r} is used twice: every adapter needs a name of its own, other "
                             "than the base model's id")
        adapters[name] = path
    return adapters


@cli.command("serve")
@click.option("--model", "model_id", required=True, help="A Hugging Face folder or hub id; clients ask for it by "
              "this string in the model field.")
@click.option("--adapter", "adapter_specs", multiple=True, metavar="NAME=PATH",
              help="A PEFT LoRA adapter (folder or hub id) that clients ask for by NAME; repeat for several.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network: set an API key).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True)
@click.option("--api-key", envvar="ORION_API_KEY", default=None, show_envvar=True,
              help="Every request must send Authorization: Bearer KEY.")
@click.option("--max-queue", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests that may wait for the device; one more gets 429.")
@_backend_option()
@_target_option
@click.option("--exact-numerics", is_flag=True,
              help="On the emulator, use the target's accumulator model (slow) instead of the fp32 accumulator.")
@_speedup_options
@handle_errors
def serve_cmd(model_id: str, adapter_specs: tuple[str, ...], host: str, port: int, api_key: str | None,
              max_queue: int, backend: str, target_name: str, exact_numerics: bool, draft_id: str | None,
              draft_tokens: int, quantize: str | None, keep_fp16: tuple[str, ...]) -> None:
    """Serve a model and its LoRA adapters over the OpenAI HTTP API (completions, chat completions, streaming); the
    model field of a request picks the base model or an adapter, switched without a compile."""
    import contextlib
    import ipaddress

    from orion.serve.app import serve  # first: without the serve extra, say so before loading anything

    adapters = _named_adapters(adapter_specs, model_id)
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    if not local and not api_key:
        _warn(f"listening on {host} without an API key: anyone who can reach this address can use the model")
    with contextlib.ExitStack() as stack:
        model, draft = _load_with_speedups(stack, model_id, draft_id, quantize, keep_fp16, backend=backend,
                                           target=target_name, accumulator=None if exact_numerics else "fp32")
        for name, path in adapters.items():  # all before the first request: the programs compile once
            model.load_adapter(path, name)  # the target's only: the draft drafts for every adapter as the base
        drafting = f", drafted by {escape(draft_id)}" if draft is not None else ""
        err.print(f"serving {escape(model_id)}" + (f" and adapters {escape(', '.join(adapters))}" if adapters else "")
                  + f"{drafting} on http://{escape(host)}:{port}/v1", highlight=False, soft_wrap=True)
        serve(model, model_id, host=host, port=port, api_key=api_key or None, max_queue=max_queue, draft=draft,
              draft_tokens=draft_tokens)


@cli.group("bench")
def bench_group() -> None:
    """Benchmarks that print a table and write JSON."""


def _bench_options(new_tokens: int, repeats: int, predict_help: str):
    """The options both model benchmarks take: where and against what they run, the sizes, the interleaved
    repetitions, --predict CHIP instead of measuring, weight compression and the JSON report."""
    options = [
        _backend_option(),
        _target_option,
        click.option("--reference", type=click.Choice(["transformers", "none"]), default="transformers",
                     show_default=True),
        click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True),
        click.option("--new-tokens", type=click.IntRange(min=2), default=new_tokens, show_default=True),
        click.option("--exact-numerics", is_flag=True,
                     help="Emulator: the target's accumulator model instead of fp32."),
        click.option("--repeats", type=click.IntRange(min=1), default=repeats, show_default=True,
                     help="Measured repetitions of each side, interleaved; the report gives medians and their spread."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Cap every side's BLAS/OpenMP threads (default: theirs); 1 keeps a busy machine's spread "
                          "narrow."),
        click.option("--predict", "chip", default=None, metavar="CHIP",
                     help="Instead of measuring: the ANE cost model's prediction on CHIP (m1, m4, m4max, m5pro) for "
                          "the programs Orion builds" + predict_help),
        _quantize_options,
        click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path),
                     help="Write the report here (required for a measured run)."),
    ]

    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


@bench_group.command("gpt2")
@click.option("--model", "model_dir", default=None, help="A local GPT-2 folder (default: random 124M weights).")
@click.option("--head", type=click.Choice(["cpu", "ane"]), default="cpu", show_default=True,
              help="With --predict: the classifier on the CPU or on the ANE (split along the vocabulary).")
@_bench_options(new_tokens=64, repeats=5, predict_help=" (for the chip's target unless --target is given).")
@handle_errors
def bench_gpt2_cmd(model_dir: str | None, backend: str, target_name: str, reference: str, prompt_tokens: int,
                   new_tokens: int, exact_numerics: bool, repeats: int, threads: int | None, chip: str | None,
                   head: str, quantize: str | None, keep_fp16: tuple[str, ...], json_file: Path | None) -> None:
    """Orion's GPT-2 against transformers on the same weights, in the same run (each side in its own process,
    their repetitions interleaved); or, with --predict, the cost model's figures."""
    from orion.models.bench import bench_gpt2

    spec = _compression(quantize, keep_fp16)
    if chip is not None:
        from orion.models.bench import random_gpt2_state
        from orion.models.gpt2 import GPT2, GPT2Config

        def random_model(target, **options):
            config, state = random_gpt2_state()
            return GPT2(GPT2Config.from_hf(config), state, backend="emulator", target=target, **options)

        _predict(model_dir, random_model, "random GPT-2 124M", chip, target_name, prompt_tokens, new_tokens, json_file,
                 head, spec)
        return
    _predict_only(head != "cpu" and "--head", spec and "--quantize")
    _needs_json(json_file)
    report = bench_gpt2(model_dir, backend, None if reference == "none" else reference, prompt_tokens, new_tokens,
                        exact_numerics, target_name, repeats, threads)
    _print_bench(report, "GPT-2", json_file)


def _predict_only(*given) -> None:
    """Refuse the options (their names in ``given``, falsy where not given) a measured run does not take."""
    named = [name for name in given if name]
    if named:
        raise OrionError(f"{' and '.join(named)}: only with --predict CHIP (a measured run does not take it)")


def _needs_json(json_file: Path | None) -> None:
    if json_file is None:
        raise OrionError("a measured run needs --json FILE (or give --predict CHIP for the cost model)")


def _print_bench(report: dict, family: str, json_file: Path) -> None:
    """The table of a bench report (every Orion side, the reference, their ratio), its warnings, and the JSON."""
    import json

    from orion.fileio import write_atomic
    from orion.models.bench import flatten

    chip = f", {report['chip']}" if report["chip"] else ""
    threads = report["threads"]
    table = Table(title=f"{family} ({report['model']}): prompt {report['prompt_tokens']} tokens, "
                        f"{report['new_tokens']} new; target {report['target']}{chip}; medians of {report['repeats']} "
                        "interleaved repetitions (± interquartile range / median)"
                        + (f"; {threads} thread(s) each" if threads else ""))
    for col in ("", "prefill tok/s", "decode tok/s", "first prefill s", "cached prefill s", "peak MB",
                "dispatches/token", "backend"):
        table.add_column(col, justify="right" if col.endswith(("s", "MB", "token")) else "left")
    sides = [k for k in report if k == "orion" or k.startswith("orion_")] + ["reference"]
    for side in sides:
        r = report.get(side)
        if r:
            label = side if side == "reference" else f"{side} (classifier on the {r.get('head', 'cpu')})"
            table.add_row(label, f"{r['prefill_tok_s']:.1f} ±{r['prefill_tok_s_spread']:.0%}",
                          f"{r['decode_tok_s']:.1f} ±{r['decode_tok_s_spread']:.0%}",
                          f"{r.get('first_prefill_s', float('nan')):.2f}", f"{r['cached_prefill_s']:.3f}",
                          f"{r['peak_mb']:.0f}", str(r.get("dispatches_per_token", "")),
                          f"{r['backend']}" + (f" ({r['accumulator']} accumulator)" if r.get("accumulator") else ""))
    if "ratios" in report:
        ratios = report["ratios"]
        table.add_row("orion / reference", f"{ratios['prefill']:.2f}x ±{ratios['prefill_spread']:.0%}",
                      f"{ratios['decode']:.2f}x ±{ratios['decode_spread']:.0%}", "", "",
                      f"{report['orion']['peak_mb'] / report['reference']['peak_mb']:.2f}x", "", "")
    out.print(table)
    if "faster_head" in report:
        out.print(f"faster decode with the classifier on the {report['faster_head']}", highlight=False, markup=False)
    for warning in report["warnings"]:
        err.print(f"warning: {warning}", highlight=False, markup=False)
    write_atomic(json_file, json.dumps(flatten(report), indent=2))
    out.print(f"wrote {json_file}", highlight=False, markup=False)


@bench_group.command("predict")
@click.option("--model", "model_id", required=True, help="A Hugging Face folder or hub id (any model Orion loads).")
@click.option("--chip", required=True, help="Chip whose figures to use: m1, m4, m4max, m5pro.")
@_target_option
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--head", type=click.Choice(["cpu", "ane"]), default="cpu", show_default=True,
              help="The classifier on the CPU or on the ANE (split along the vocabulary).")
@_quantize_options
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), help="Also write JSON here.")
@handle_errors
def bench_predict_cmd(model_id: str, chip: str, target_name: str, prompt_tokens: int, new_tokens: int, head: str,
                      quantize: str | None, keep_fp16: tuple[str, ...], json_file: Path | None) -> None:
    """The ANE cost model's decode and prefill figures for a model's programs on a chip (nothing runs)."""
    _predict(model_id, None, model_id, chip, target_name, prompt_tokens, new_tokens, json_file, head,
             _compression(quantize, keep_fp16))


def _predict(model_id: str | None, make_model, label: str, chip_name: str, target_name: str, prompt_tokens: int,
             new_tokens: int, json_file: Path | None, head: str = "cpu", quantize=None) -> None:
    """Print (and write) the cost model's table for ``model_id`` (or ``make_model(target, head=, quantize=)``,
    called ``label``) on ``chip_name``; the programs are built for the chip's target unless --target was given.
    ``head``: where the classifier runs; ``quantize``: the blocks' weight compression (a WeightCompression)."""
    import json

    from click.core import ParameterSource

    import orion
    from orion.compiler.costmodel import get_chip
    from orion.fileio import write_atomic
    from orion.models.lm import predict

    chip = get_chip(chip_name)
    given = click.get_current_context().get_parameter_source("target_name") is not ParameterSource.DEFAULT
    target = target_name if given else chip.target
    options = dict(head=head, quantize=quantize)
    model = (orion.load(model_id, backend="emulator", target=target, **options) if model_id else
             make_model(target, **options))
    with model:
        figures = predict(model, chip, prompt_tokens, new_tokens)
    weights = _weights_label(quantize)
    table = Table(title=f"ANE cost model: {model_id or label} on {chip.name} (programs for target "
                        f"{model.target.name}; weights {weights}, classifier on the {head}; prompt {prompt_tokens} "
                        f"tokens, {new_tokens} new)")
    columns = ("dispatches", "weights MB", "I/O MB", "host MB", "dispatch ms", "memory ms", "compute ms", "ANE ms",
               "host ms", "ms", "tok/s")
    for col in ("step", *columns):
        table.add_column(col, justify="left" if col == "step" else "right")
    for phase, e in figures.items():
        table.add_row(phase, str(e.dispatches), f"{e.weight_mb:.1f}", f"{e.io_mb:.1f}", f"{e.host_bytes / 1e6:.1f}",
                      f"{e.dispatch_ms:.2f}", f"{e.memory_ms:.2f}", f"{e.compute_ms:.2f}", f"{e.ane_ms:.2f}",
                      f"{e.host_ms:.2f}", f"{e.ms:.2f}", f"{e.tok_s:.0f}")
    out.print(table)
    sources = Table(title=f"figures of {chip.name} (reported, not measured here)")
    for col in ("figure", "value", "source"):
        sources.add_column(col, overflow="fold")
    for row in chip.rows():
        sources.add_row(*row)
    out.print(sources)
    if json_file is not None:
        report = {"model": model_id or label, "target": model.target.name, "weights": weights, "head": head,
                  "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                  **{phase: e.summary() for phase, e in figures.items()},
                  "figures": {name: {"value": value, "source": source} for name, value, source in chip.rows()}}
        write_atomic(json_file, json.dumps(report, indent=2))
        out.print(f"wrote {json_file}", highlight=False, markup=False)


def _weights_label(spec) -> str:
    """``fp16``, or the scheme and block of a WeightCompression as ``--quantize`` writes it (``int4/32``)."""
    return "fp16" if spec is None else spec.scheme + (f"/{spec.block}" if spec.block else "")


@bench_group.command("llama")
@click.option("--model", "model_dir", default=None,
              help="A local Llama, Mistral, Qwen2 or Qwen3 folder (default: random weights of --preset's size).")
@click.option("--preset", default="qwen2.5-0.5b", show_default=True,
              help="The size of the random weights without --model: smollm2-135m, qwen2.5-0.5b, qwen3-0.6b, "
                   "llama3.2-1b, tinyllama-1.1b (tiny: for tests).")
@click.option("--head", "heads", type=click.Choice(["both", "cpu", "ane"]), default="both", show_default=True,
              help="Where Orion's classifier runs; both: measure each and say which decodes faster.")
@_bench_options(new_tokens=32, repeats=3, predict_help=", with the classifier where --head says (cpu for both).")
@handle_errors
def bench_llama_cmd(model_dir: str | None, preset: str, heads: str, backend: str, target_name: str, reference: str,
                    prompt_tokens: int, new_tokens: int, exact_numerics: bool, repeats: int, threads: int | None,
                    chip: str | None, quantize: str | None, keep_fp16: tuple[str, ...],
                    json_file: Path | None) -> None:
    """A Llama-family model against transformers on the same weights (each side in its own process, their
    repetitions interleaved): prefill and decode tok/s, peak memory, dispatches per token, and which classifier
    place decodes faster; or, with --predict, the cost model's figures."""
    from orion.models.bench import bench_llama

    head = "ane" if heads == "ane" else "cpu"
    spec = _compression(quantize, keep_fp16)
    if chip is not None:
        from orion.models.bench import random_llama
        from orion.models.llama import Llama

        def random_model(target, **options):
            return Llama(*random_llama(preset), backend="emulator", target=target, **options)

        _predict(model_dir, random_model, f"random {preset}", chip, target_name, prompt_tokens, new_tokens,
                 json_file, head, spec)
        return
    _predict_only(spec and "--quantize")
    _needs_json(json_file)
    report = bench_llama(model_dir, preset, backend, None if reference == "none" else reference, prompt_tokens,
                         new_tokens, ("cpu", "ane") if heads == "both" else (heads,), exact_numerics, target_name,
                         repeats, threads)
    _print_bench(report, "Llama family", json_file)


# -- training -----------------------------------------------------------------------------------------------------


def _warn(message: str) -> None:
    _report("warning", message)


def _train_with_progress(trainer, label: str, stop_after: int | None = None) -> dict:
    """``trainer.run()`` under a rich progress bar (loss, tokens/s, ms per step split into backend, CPU and weight
    update), drawn from the step it starts at once the trainer is ready, so a refused resume draws none.
    ``stop_after``: a KeyboardInterrupt after that step, as a user's Ctrl-C (the demo's halfway stop)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), console=err, transient=False)
    task = progress.add_task(label, total=trainer.settings.steps, completed=trainer.start_step, info="")

    def on_step(r: dict) -> None:
        progress.update(task, completed=r["step"], info=(
            f"loss {r['loss']:.3f} | {r['tokens_per_s']:.0f} tok/s | {r['ms']:.0f} ms/step "
            f"(backend {r['ms_backend']:.0f}, cpu {r['ms_cpu']:.0f}, update {r['ms_update']:.0f})"
            + (" | skipped" if r["skipped"] else "")))
        if r["step"] == stop_after:
            raise KeyboardInterrupt

    trainer.on_step = on_step
    with progress:
        return trainer.run()


@cli.command("train")
@click.option("--config", "preset", default="tiny", show_default=True,
              help="Model preset: tiny or stories110m (on --resume: the checkpoint's).")
@click.option("--data", default=None, help="A .txt/.jsonl file or folder, a pre-tokenized uint16 .bin, or a hub "
              "dataset id (e.g. roneneldan/TinyStories:TinyStoriesV2-GPT4-train.txt); on --resume: the checkpoint's.")
@click.option("--steps", type=click.IntRange(min=1), required=True, help="Total optimizer steps.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences per micro-batch, over all ranks under torchrun (on --resume: the checkpoint's).")
@click.option("--accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches per step (on --resume: the checkpoint's).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-4, show_default=True,
              help="Peak learning rate of the cosine schedule (on --resume: the checkpoint's unless given).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out up to --steps; a flag "
              "left out is the checkpoint's (the LoRA flags and --base too), and --data, --steps, --lr, --save-every "
              "and --keep-last may change.")
@click.option("--save-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--keep-last", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=8), default=None,
              help="Override the preset's sequence length (on --resume: the checkpoint's).")
@click.option("--loss-scale", type=click.Choice(["dynamic", "static", "none"]), default="dynamic", show_default=True,
              help="fp16 gradient loss scaling (on --resume: the checkpoint's).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the weights and the batch order (on --resume: the checkpoint's).")
@click.option("--tokenizer", default=None, help="A tokenizer.json (or folder with one, or a SentencePiece model "
              "folder); default: a BPE trained on the data (on --resume: the checkpoint's).")
@_backend_option()
@_target_option
@click.option("--base", default=None, help="Start from this trained Llama (Hugging Face folder, hub id or Orion "
              "checkpoint) instead of fresh weights; its tokenizer is used unless --tokenizer is given (on --resume "
              "of an adapter: the checkpoint's, checked by sha256).")
@click.option("--lora-rank", type=click.IntRange(min=1), default=None,
              help="Train only a LoRA adapter of this rank on the frozen --base; checkpoints are PEFT adapters (on "
              "--resume: the checkpoint's).")
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True), default=16.0, show_default=True,
              help="LoRA scale numerator: the adapter adds (alpha / rank) B A (on --resume: the checkpoint's).")
@click.option("--lora-targets", default=None,
              help="Projections to adapt: q, k, v, o, gate, up, down (or attn, ffn, all), comma-separated "
              "[default: q,v] (on --resume: the checkpoint's).")
@click.option("--dist-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Launched by torchrun on several ranks: seconds a rank waits for the others (a gradient "
              "all-reduce, rank 0's checkpoint save) before the run stops with an error naming the rank that stopped.")
@handle_errors
def train_cmd(preset, data, steps, batch, accum, lr, out_dir, resume, save_every, keep_last, seq_len, loss_scale,
              seed, tokenizer, backend, target_name, base, lora_rank, lora_alpha, lora_targets, dist_timeout) -> None:
    """Train a Llama-style model (or a LoRA adapter of one); checkpoints, metrics.jsonl and loss.png go to --out.

    Data-parallel on several processes: torchrun --nproc-per-node N $(which orion) train ... (--batch is then the
    global batch, split over the ranks; see docs/training.md)."""
    import contextlib

    from click.core import ParameterSource

    from orion.models import model_backend
    from orion.train.distributed import ProcessGroup, launched
    from orion.train.trainer import Trainer, TrainSettings

    # A flag left at its default is unset (None), so a resumed run takes the checkpoint's value and a fresh run
    # the same default (--seq-len and --tokenizer default to None, which says the same).
    source = click.get_current_context().get_parameter_source
    given = {name: value for name, value in dict(preset=preset, batch=batch, accum=accum, lr=lr, save_every=save_every,
                                                 keep_last=keep_last, loss_scale=loss_scale, seed=seed,
                                                 lora_alpha=lora_alpha).items()
             if source(name) is not ParameterSource.DEFAULT}
    settings = TrainSettings(data=data, out=str(out_dir), steps=steps, seq_len=seq_len, tokenizer=tokenizer,
                             base=base, lora_rank=lora_rank, lora_targets=lora_targets, **given)
    group = ProcessGroup.from_environment(dist_timeout) if launched() else None
    with group if group is not None else contextlib.nullcontext():
        trainer = Trainer(settings, resume=resume, backend=model_backend(backend, target_name), target=target_name,
                          on_notice=_warn, group=group)
        summary = _train_with_progress(trainer, "training") if trainer.is_writer else trainer.run()
    if trainer.is_writer:
        out.print(f"done: {summary}", highlight=False, markup=False)


@cli.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@handle_errors
def export_cmd(checkpoint: Path, out_dir: Path) -> None:
    """Export a training checkpoint to Hugging Face Llama layout (config.json, model.safetensors, tokenizer), or a
    LoRA checkpoint to a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)."""
    from orion.fileio import write_atomic
    from orion.lora import Adapter, peft_files
    from orion.models.llama import LlamaConfig, adapter_spec, export_hf
    from orion.train.checkpoint import load_checkpoint

    weights, _, state = load_checkpoint(checkpoint)
    if "lora" in state:
        spec = adapter_spec(LlamaConfig(**state["config"]))
        adapter = Adapter.from_arrays(spec, weights, state["lora"]["alpha"])
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, data in peft_files(adapter, spec, state["base"]["path"]).items():
            write_atomic(out_dir / name, data)
        out.print(f"wrote {out_dir} (PEFT LoRA adapter of {state['base']['path']})", highlight=False, markup=False)
        return
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    export_hf(weights, LlamaConfig(**state["config"]), out_dir,
              {name: (checkpoint / name).read_bytes() for name in tokenizer_files if (checkpoint / name).is_file()})
    out.print(f"wrote {out_dir} (LlamaForCausalLM layout)", highlight=False, markup=False)


@cli.command("demo")
@click.option("--out", "out_dir", default="out/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--steps", type=click.IntRange(min=2), default=300, show_default=True)
@_backend_option()
@handle_errors
def demo_cmd(out_dir: Path, steps: int, backend: str) -> None:
    """Offline end to end: make a story corpus, train the tiny preset, stop halfway, resume, generate a story."""
    import shutil

    import orion
    from orion.models import model_backend
    from orion.train.checkpoint import latest_checkpoint
    from orion.train.corpus import make_story_corpus, write_corpus
    from orion.train.trainer import Trainer, TrainSettings

    if out_dir.exists():
        shutil.rmtree(out_dir)
    corpus = out_dir / "stories.txt"
    write_corpus(corpus, make_story_corpus(2000, seed=0))
    out.print(f"1. wrote a story corpus the project generated itself: {corpus}", highlight=False, markup=False)
    settings = TrainSettings(preset="tiny", data=str(corpus), out=str(out_dir / "run"), steps=steps, batch=8,
                             seq_len=64, lr=2e-3, save_every=max(1, steps // 4))
    chosen = model_backend(backend)
    half = steps // 2
    try:
        _train_with_progress(Trainer(settings, backend=chosen, on_notice=_warn), "training", stop_after=half)
    except KeyboardInterrupt:
        pass
    out.print(f"2. trained the tiny preset ({chosen.name}) and stopped at step {half}: "
              f"{latest_checkpoint(out_dir / 'run')}", highlight=False, markup=False)
    summary = _train_with_progress(Trainer(settings, resume=True, backend=chosen, on_notice=_warn), "resuming")
    out.print(f"3. resumed to step {summary['step']}: final loss {summary['final_loss']:.3f}, "
              f"{summary['skipped_steps']} skipped steps; loss curve {out_dir / 'run' / 'loss.png'}",
              highlight=False, markup=False)
    with orion.load(summary["checkpoint"], backend=chosen) as model:
        story = model.generate("Once upon a time", max_tokens=48, temperature=0.7, top_k=20, seed=1)
    out.print("4. a story from the trained model:", highlight=False, markup=False)
    out.print("   Once upon a time" + story, highlight=False, markup=False)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
