"""The `fate` command line: one thin entry per command; the work lives in each command's module."""

from __future__ import annotations

import sys

import typer

from fate_cli.cli_help import Abort, ClickException, FateCommand, FateGroup, NoArgsIsHelpError, usage_error_line
from fate_cli.errors import EXIT_RESOURCES, EXIT_USAGE, FateError, oom_line

app = typer.Typer(
    cls=FateGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Run Mixture-of-Experts language models on one memory-constrained GPU, or a CPU.",
)


def default(text: str) -> str:
    """A default typer cannot show (computed at run time), in a help string; the backslash keeps rich
    from reading the brackets as markup and dropping them."""
    return f"\\[default: {text}]"


VRAM_HELP = "expert memory budget on the device, e.g. 8GB, 8GiB, 7.5G, 800MB " + default("free memory less a margin")
POLICY_HELP = "expert cache policy: fate, ondemand, lru, eap, fmoe, klotski, cpu, freetoken or resident"
MISS_HELP = "where the fate policy serves a miss: auto (a cost model picks the CPU or the link per miss), cpu, or " \
    "link (always moved)"
LINK_HELP = "emulate a slower host-to-GPU link, e.g. 12GB (per second): the copy stream waits after each copy"
CPU_THREADS_HELP = "threads of the experts computed on the CPU " + default("--threads")
MODEL_HELP = "alias from models.toml, a pulled Hub repo id (org/name), or a local model folder"
DEVICE_HELP = "cpu or cuda " + default("cuda when available")
DTYPE_HELP = "float32, bfloat16 or float16 " + default("bfloat16 on cuda, float32 on cpu")
TEMPERATURE_HELP = "0 is greedy " + default("generation_config.json")
DEFAULT_WINDOWS = 64  # perplexity: windows scored unless --full or --max-windows (about a minute on a laptop CPU)
THREADS_HELP = "CPU threads; steps too small to gain from threads run on one " + default(
    "OMP_NUM_THREADS, else the physical cores")
PREFILL_HELP = "prompt tokens per pass through the layers; longer prompts go in chunks " + default("512")
DENSE_HELP = "int8: the dense (non-expert) weights at INT8 per row, for CPU runs (a CPU decode reads them every " \
    "token) " + default("the run's dtype")
TRANSFER_HELP = "move every expert at this tier's bit width (all policies)"
EAGER_HELP = "decode with the eager forward (the reference) instead of captured CUDA graphs with the fused " \
    "expert kernels"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"fate {version('fate-moe')}")
        except PackageNotFoundError:
            typer.echo("fate (not installed as a package)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_version,
                                      help="print the version and exit"),
) -> None:
    """Run Mixture-of-Experts language models on one memory-constrained GPU, or a CPU."""


def _threads(count: int | None) -> None:
    from fate_cli.model.threads import use_threads

    use_threads(count)


def _dense(kind: str | None) -> None:
    from fate_cli.errors import UsageError
    from fate_cli.model.model import DENSE_CHOICES, set_dense

    if kind is not None and kind not in DENSE_CHOICES:
        raise UsageError(f"unknown --dense '{kind}'; use {' or '.join(DENSE_CHOICES)}, or leave it out")
    set_dense(kind)


def _prefill(tokens: int | None) -> None:
    from fate_cli.model.model import set_prefill_chunk

    set_prefill_chunk(tokens)


@app.command(cls=FateCommand)
def run(
    model: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP),
    prompt: str = typer.Argument(None, metavar="PROMPT", help="the prompt (wrapped in the chat template unless --raw); "
                                 "- or none with piped stdin: read it from stdin"),
    max_tokens: int = typer.Option(256, "-n", "--max-tokens", min=1, metavar="N", help="tokens to generate at most"),
    temperature: float = typer.Option(None, min=0.0, metavar="T", help=TEMPERATURE_HELP),
    top_p: float = typer.Option(None, min=0.0, max=1.0, metavar="P",
                                help="nucleus sampling mass " + default("generation_config.json")),
    top_k: int = typer.Option(None, min=0, metavar="K", help="sample among the k likeliest tokens (0: all) "
                              + default("generation_config.json")),
    seed: int = typer.Option(0, metavar="S", help="random seed of the sampler"),
    raw: bool = typer.Option(False, "--raw", help="tokenize PROMPT as-is, without the chat template"),
    device: str = typer.Option(None, metavar="DEVICE", help=DEVICE_HELP),
    dtype: str = typer.Option(None, metavar="DTYPE", help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of streaming text"),
    vram: str = typer.Option(None, metavar="SIZE", help=VRAM_HELP),
    policy: str = typer.Option("fate", metavar="POLICY", help=POLICY_HELP),
    transfer_bits: int = typer.Option(None, metavar="B", help=TRANSFER_HELP),
    prompts: str = typer.Option(None, "--prompts", metavar="FILE",
                                help="a file of prompts, one per line or per paragraph"),
    batch: int = typer.Option(1, "--batch", min=1, metavar="B", help="with --prompts: prompts decoded together"),
    threads: int = typer.Option(None, "--threads", "-t", min=1, metavar="N", help=THREADS_HELP),
    prefill_chunk: int = typer.Option(None, "--prefill-chunk", min=16, metavar="N", help=PREFILL_HELP),
    dense: str = typer.Option(None, "--dense", metavar="KIND", help=DENSE_HELP),
    eager: bool = typer.Option(False, "--eager", help=EAGER_HELP),
    miss: str = typer.Option("auto", "--miss", metavar="WHERE", help=MISS_HELP),
    link: str = typer.Option(None, "--link", metavar="GB/s", help=LINK_HELP),
    cpu_threads: int = typer.Option(None, "--cpu-threads", min=1, metavar="N", help=CPU_THREADS_HELP),
) -> None:
    """Generate text from PROMPT, or for every prompt of --prompts FILE."""
    from fate_cli.engine.runtime import hybrid_options
    from fate_cli.run import run_command

    _threads(threads)
    _prefill(prefill_chunk)
    _dense(dense)
    run_command(model, prompt, max_tokens, temperature, top_p, top_k, seed, raw, device, dtype, as_json,
                vram, policy, transfer_bits, prompts, batch, eager, hybrid_options(miss, link, cpu_threads))


@app.command(cls=FateCommand)
def pull(
    model: str = typer.Argument(..., metavar="MODEL", help="alias from models.toml or a Hub repo id (org/name)"),
    revision: str = typer.Option(None, metavar="REV", help="branch, tag or commit " + default("main")),
    quantize: bool = typer.Option(True, "--quantize/--no-quantize", help="requantize the experts into tiers"),
) -> None:
    """Download a model from the Hugging Face Hub into $FATE_HOME/models, then requantize its experts."""
    from fate_cli.hub import pull_command

    pull_command(model, revision, quantize)


@app.command("list", cls=FateCommand)
def list_models() -> None:
    """List pulled and bundled models: family, parameters, context, quantization, size on disk."""
    from fate_cli.hub import list_command

    list_command()


@app.command(cls=FateCommand)
def show(
    model: str = typer.Argument(None, metavar="MODEL", help=MODEL_HELP + " " + default("the bundled model")),
) -> None:
    """A model's family, parameters, experts, context, tier store and where it lives."""
    from fate_cli.show import show_command

    show_command(model)


@app.command(cls=FateCommand)
def rm(
    model: str = typer.Argument(..., metavar="MODEL", help="alias or Hub repo id of a pulled model; with --tiers "
                                "any model, bundled and local folders too"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
    tiers: bool = typer.Option(False, "--tiers", help="delete only the model's tier store (rebuilt on next use)"),
) -> None:
    """Delete a pulled model from $FATE_HOME/models, or with --tiers only its tier store."""
    if tiers:
        from fate_cli.quantize import rm_tiers_command

        rm_tiers_command(model, yes)
        return
    from fate_cli.hub import rm_command

    rm_command(model, yes)


@app.command(cls=FateCommand)
def chat(
    model: str = typer.Argument(None, metavar="MODEL", help=MODEL_HELP + " " + default("the bundled model")),
    prompt: str = typer.Option(None, "--prompt", "-p", metavar="TEXT", help="answer this one message and exit"),
    system: str = typer.Option(None, metavar="TEXT", help="system message"),
    max_tokens: int = typer.Option(512, "-n", "--max-tokens", min=1, metavar="N", help="tokens per answer at most"),
    temperature: float = typer.Option(None, min=0.0, metavar="T", help=TEMPERATURE_HELP),
    seed: int = typer.Option(0, metavar="S", help="random seed of the sampler"),
    device: str = typer.Option(None, metavar="DEVICE", help=DEVICE_HELP),
    dtype: str = typer.Option(None, metavar="DTYPE", help=DTYPE_HELP),
    vram: str = typer.Option(None, metavar="SIZE", help=VRAM_HELP),
    policy: str = typer.Option("fate", metavar="POLICY", help=POLICY_HELP),
    transfer_bits: int = typer.Option(None, metavar="B", help=TRANSFER_HELP),
    top_p: float = typer.Option(None, min=0.0, max=1.0, metavar="P",
                                help="nucleus sampling mass " + default("generation_config.json")),
    top_k: int = typer.Option(None, min=0, metavar="K", help="sample among the k likeliest tokens (0: all) "
                              + default("generation_config.json")),
    panel: bool = typer.Option(True, "--panel/--no-panel", help="the live panel of speed, cache and memory"),
    lines: bool = typer.Option(False, "--lines", help="piped stdin: one turn per line (without it, all of stdin "
                               "is one message)"),
    threads: int = typer.Option(None, "--threads", "-t", min=1, metavar="N", help=THREADS_HELP),
    prefill_chunk: int = typer.Option(None, "--prefill-chunk", min=16, metavar="N", help=PREFILL_HELP),
    dense: str = typer.Option(None, "--dense", metavar="KIND", help=DENSE_HELP),
    eager: bool = typer.Option(False, "--eager", help=EAGER_HELP),
    think: bool = typer.Option(True, "--think/--no-think", help="the chat template's thinking switch "
                               "(enable_thinking: Qwen3, Qwen3.5); also /set think off"),
    miss: str = typer.Option("auto", "--miss", metavar="WHERE", help=MISS_HELP),
    link: str = typer.Option(None, "--link", metavar="GB/s", help=LINK_HELP),
    cpu_threads: int = typer.Option(None, "--cpu-threads", min=1, metavar="N", help=CPU_THREADS_HELP),
) -> None:
    """Chat with a model; reads messages from the terminal, or one from --prompt or stdin."""
    from fate_cli.chat import chat_command
    from fate_cli.engine.runtime import hybrid_options

    _threads(threads)
    _prefill(prefill_chunk)
    _dense(dense)
    chat_command(model, prompt, system, max_tokens, temperature, seed, device, dtype, vram, policy, transfer_bits,
                 top_p, top_k, panel, eager, lines, think, hybrid_options(miss, link, cpu_threads))


@app.command(cls=FateCommand)
def bench(
    model: str = typer.Argument(
        None, metavar="MODEL", help=MODEL_HELP + "; or synthetic:SHAPE, SHAPE one of mixtral-8x7b, qwen3-30b-a3b, "
        "qwen3.6-35b-a3b, olmoe-1b-7b, gpt-oss-20b, gpt-oss-120b (real shapes, random weights), replay:mixtral-8x7b "
        "(the bundled model's routing at Mixtral's expert size); several, comma-separated "
        + default("the bundled model")),
    vram: str = typer.Option(None, metavar="SIZES", help="budgets: 8GB, a list 4GB,8GB, a range 4GB-16GB+4GB, or "
                             "shares of the hot-tier expert bytes 25%,50%,75% " + default("free memory less a margin")),
    policy: str = typer.Option(None, metavar="POLICIES", help="policies, comma-separated "
                               + default("resident,fate,lru,eap,fmoe,klotski,ondemand")),
    prompt_len: int = typer.Option(512, "-p", "--prompt-len", min=1, metavar="N", help="prompt tokens (test ppN)"),
    gen_len: int = typer.Option(128, "-n", "--gen-len", min=2, metavar="N", help="generated tokens (test tgN)"),
    reps: int = typer.Option(3, "-r", "--repetitions", min=1, metavar="R",
                             help="timed repetitions after one warm-up (2 or more give a spread)"),
    prompts: str = typer.Option(None, "--prompts", metavar="FILE",
                                help="text file, one prompt per paragraph " + default("held-out text")),
    output: str = typer.Option("md", "-o", "--output", metavar="FORMAT", help="md, csv or json"),
    plot: str = typer.Option(None, "--plot", metavar="FILE.png",
                             help="decode tokens/s and hit rate against budget"),
    transfer_bits: int = typer.Option(None, metavar="B", help=TRANSFER_HELP),
    device: str = typer.Option(None, metavar="DEVICE", help=DEVICE_HELP),
    dtype: str = typer.Option(None, metavar="DTYPE", help=DTYPE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    batch: str = typer.Option("1", "--batch", metavar="SIZES", help="prompts decoded together; a list 1,4,16 "
                              "sweeps them"),
    rows_to: str = typer.Option(None, "--rows-to", metavar="FILE", help="also append each row to this file as a "
                                "JSON line as soon as it is measured (keeps a long sweep's rows if it is stopped)"),
    threads: int = typer.Option(None, "--threads", "-t", min=1, metavar="N", help=THREADS_HELP),
    prefill_chunk: int = typer.Option(None, "--prefill-chunk", min=16, metavar="N", help=PREFILL_HELP),
    dense: str = typer.Option(None, "--dense", metavar="KIND", help=DENSE_HELP),
    eager: bool = typer.Option(False, "--eager", help=EAGER_HELP),
    miss: str = typer.Option("auto", "--miss", metavar="WHERE", help=MISS_HELP + "; a list auto,link gives fate "
                             "a row for each"),
    link: str = typer.Option(None, "--link", metavar="GB/s", help=LINK_HELP),
    cpu_threads: int = typer.Option(None, "--cpu-threads", min=1, metavar="N", help=CPU_THREADS_HELP),
) -> None:
    """Sweep VRAM budgets and policies side by side: prefill and decode speed, hit rate, bytes moved."""
    from fate_cli.bench import bench_command

    _threads(threads)
    _prefill(prefill_chunk)
    _dense(dense)
    bench_command(model, prompt_len, gen_len, reps, device, dtype, output, vram, policy, transfer_bits, prompts,
                  plot, quiet, rows_to, batch, eager, miss, link, cpu_threads)


@app.command(cls=FateCommand)
def quantize(
    model: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP),
    hot_bits: int = typer.Option(4, "--hot-bits", metavar="B", help="bits of the hot tier (experts kept on the GPU): "
                                 "8 or 4"),
    cold_bits: int = typer.Option(2, "--cold-bits", metavar="B", help="bits of the cold tier (transfers, misses): "
                                  "4, 3 or 2"),
    group_size: int = typer.Option(64, "--group-size", metavar="G", help="hot tier: weights per scale/zero group"),
    cold_group_size: int = typer.Option(32, "--cold-group-size", metavar="G",
                                        help="cold tier: weights per scale/zero group"),
    dense_layers: int = typer.Option(1, "--dense-layers", min=0, metavar="L",
                                     help="first MoE layers also stored at 16 bits"),
    hqq_iters: int = typer.Option(20, "--hqq-iters", min=1, metavar="I",
                                  help="iterations of HQQ's optimiser (its default 20)"),
    method: str = typer.Option("hqq", "--method", metavar="METHOD", help="hqq, or minmax (no optimiser, no hqq "
                               "install)"),
    shard_mb: float = typer.Option(1024.0, "--shard-mb", min=0.0, metavar="MB", help="largest store file, MiB"),
    device: str = typer.Option(None, metavar="DEVICE", help="where to quantize: " + DEVICE_HELP),
) -> None:
    """Requantize a model's experts into the tier store (hot INT4, cold INT2, layer 0 at 16 bits)."""
    from fate_cli.quantize import quantize_command

    _threads(None)
    quantize_command(
        model, hot_bits, cold_bits, group_size, cold_group_size, dense_layers, hqq_iters, method, shard_mb, device
    )


@app.command(cls=FateCommand)
def verify(model: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP)) -> None:
    """Check a model's tier store against its manifest (hashes, shapes, source checkpoint)."""
    from fate_cli.quantize import verify_command

    verify_command(model)


@app.command(cls=FateCommand)
def perplexity(
    model: str = typer.Argument(None, metavar="MODEL", help=MODEL_HELP + " " + default("the bundled model")),
    file: str = typer.Option(None, "--file", "-f", metavar="FILE", help="UTF-8 text " + default(
        "the bundled held-out text")),
    tiers: str = typer.Option("bf16,hot,cold,mixed", metavar="TIERS", help="comma-separated: bf16 (the "
                              "checkpoint's experts at the run's dtype), hot, cold, mixed"),
    window: int = typer.Option(256, min=2, metavar="N", help="tokens per window"),
    max_windows: int = typer.Option(None, min=1, metavar="W", help="score at most this many windows, spread "
                                    "evenly over the text " + default(f"{DEFAULT_WINDOWS}; all with --full")),
    full: bool = typer.Option(False, "--full", help="score every window of the text"),
    device: str = typer.Option(None, metavar="DEVICE", help=DEVICE_HELP),
    dtype: str = typer.Option(None, metavar="DTYPE", help=DTYPE_HELP),
    threads: int = typer.Option(None, "--threads", "-t", min=1, metavar="N", help=THREADS_HELP),
    prefill_chunk: int = typer.Option(None, "--prefill-chunk", min=16, metavar="N", help=PREFILL_HELP),
    dense: str = typer.Option(None, "--dense", metavar="KIND", help=DENSE_HELP),
) -> None:
    """Perplexity on a text file, with experts from the checkpoint or from the tier store, per tier."""
    from fate_cli.quantize import perplexity_command

    if full and max_windows is not None:
        from fate_cli.errors import UsageError

        raise UsageError("--full and --max-windows both ask how much text to score; give one of them")
    _threads(threads)
    _prefill(prefill_chunk)
    _dense(dense)
    perplexity_command(model, file, tiers, window, None if full else max_windows or DEFAULT_WINDOWS, device, dtype)


@app.command(cls=FateCommand)
def serve(
    model: str = typer.Argument(None, metavar="MODEL", help=MODEL_HELP + " " + default("the bundled model")),
    host: str = typer.Option("127.0.0.1", metavar="ADDRESS", help="address to listen on (loopback by default)"),
    port: int = typer.Option(8000, min=0, max=65535, metavar="PORT",
                             help="TCP port (0: any free port, printed at start)"),
    api_key: str = typer.Option(None, "--api-key", envvar="FATE_API_KEY", show_envvar=True, metavar="KEY",
                                help="require `Authorization: Bearer KEY` on every request"),
    max_batch: int = typer.Option(8, "--max-batch", min=1, metavar="B", help="requests decoded together at most"),
    max_queue: int = typer.Option(64, "--max-queue", min=0, metavar="Q",
                                  help="requests waiting for a row at most (then 429)"),
    context: int = typer.Option(None, "--context", min=2, metavar="N", help="tokens per request, prompt and answer "
                                + default("4096, or the model's limit if smaller")),
    device: str = typer.Option(None, metavar="DEVICE", help=DEVICE_HELP),
    dtype: str = typer.Option(None, metavar="DTYPE", help=DTYPE_HELP),
    vram: str = typer.Option(None, metavar="SIZE", help=VRAM_HELP),
    policy: str = typer.Option("fate", metavar="POLICY", help=POLICY_HELP),
    transfer_bits: int = typer.Option(None, metavar="B", help=TRANSFER_HELP),
    threads: int = typer.Option(None, "--threads", "-t", min=1, metavar="N", help=THREADS_HELP),
    prefill_chunk: int = typer.Option(None, "--prefill-chunk", min=16, metavar="N", help=PREFILL_HELP),
    dense: str = typer.Option(None, "--dense", metavar="KIND", help=DENSE_HELP),
    eager: bool = typer.Option(False, "--eager", help=EAGER_HELP),
    miss: str = typer.Option("auto", "--miss", metavar="WHERE", help=MISS_HELP),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat and text completions, streamed or not)."""
    from fate_cli.serve import serve_command

    _threads(threads)
    _prefill(prefill_chunk)
    _dense(dense)
    serve_command(model, host, port, api_key, max_batch, max_queue, context, device, dtype, vram, policy,
                  transfer_bits, eager, miss)


def main() -> None:
    try:
        code = app(prog_name="fate", standalone_mode=False)
    except NoArgsIsHelpError as err:  # `fate` alone: the help, as asked for
        typer.echo(err.ctx.get_help())
        sys.exit(0)
    except ClickException as err:  # unknown option, missing argument, value out of range
        typer.echo(usage_error_line(err), err=True)
        sys.exit(EXIT_USAGE if err.exit_code == EXIT_USAGE else err.exit_code)
    except Abort:  # Ctrl-C or end of input at a confirmation prompt
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except FateError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as err:  # the file system refused: unwritable FATE_HOME, a full disk, a read-only mount
        typer.echo(f"error: {os_error_line(err)}", err=True)
        sys.exit(EXIT_RESOURCES)
    except RuntimeError as err:
        if "out of memory" not in str(err):  # torch.OutOfMemoryError is a RuntimeError
            raise
        typer.echo(f"error: {oom_line()}", err=True)
        sys.exit(EXIT_RESOURCES)
    if isinstance(code, int) and code:  # typer.Exit(code); 130: typer's own catch of Ctrl-C
        if code == 130:
            typer.echo("interrupted", err=True)
        sys.exit(code)


def os_error_line(err: OSError) -> str:
    import errno

    where = f" {err.filename}" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"the disk is full{' writing' + where if where else ''}; free some space, or set FATE_HOME to a " \
            "folder on another disk"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
        return f"cannot write{where} ({err.strerror}); set FATE_HOME to a writable folder"
    return f"{err.strerror or err}{where}"
