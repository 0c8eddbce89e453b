"""The `fate` command line: one thin entry per command; the work lives in each command's module."""

from __future__ import annotations

import sys

import typer

from fate_cli.errors import EXIT_RESOURCES, FateError, oom_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run Mixture-of-Experts language models on one memory-constrained GPU, or a CPU.",
)

VRAM_HELP = "expert memory budget on the device, e.g. 8GB, 8GiB, 7.5G, 800MB [default: free memory less a margin]"
POLICY_HELP = "expert cache policy: fate, ondemand, lru, eap, fmoe, klotski or resident"
MODEL_HELP = "alias from models.toml, a pulled Hub repo id (org/name), or a local model folder"


@app.command()
def run(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: str = typer.Argument(None, help="the prompt (wrapped in the chat template unless --raw)"),
    max_tokens: int = typer.Option(256, "-n", "--max-tokens", min=1, help="tokens to generate at most"),
    temperature: float = typer.Option(None, min=0.0, help="0 is greedy [default: generation_config.json]"),
    top_p: float = typer.Option(None, min=0.0, max=1.0, help="nucleus sampling mass"),
    top_k: int = typer.Option(None, min=0, help="sample among the k likeliest tokens (0: all)"),
    seed: int = typer.Option(0, help="random seed of the sampler"),
    raw: bool = typer.Option(False, "--raw", help="tokenize PROMPT as-is, without the chat template"),
    device: str = typer.Option(None, help="cpu or cuda [default: cuda when available]"),
    dtype: str = typer.Option(None, help="float32, bfloat16 or float16 [default: bfloat16 on cuda, float32 on cpu]"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of streaming text"),
    vram: str = typer.Option(None, help=VRAM_HELP),
    policy: str = typer.Option("fate", help=POLICY_HELP),
    transfer_bits: int = typer.Option(None, help="move every expert at this tier's bit width (all policies)"),
    prompts: str = typer.Option(None, "--prompts", help="a file of prompts, one per line or per paragraph"),
    batch: int = typer.Option(1, "--batch", min=1, help="with --prompts: prompts decoded together"),
    eager: bool = typer.Option(False, "--eager", help="decode with the eager forward (the reference) instead of "
                               "captured CUDA graphs with the fused expert kernels"),
) -> None:
    """Generate text from PROMPT, or for every prompt of --prompts FILE."""
    from fate_cli.run import run_command

    run_command(model, prompt, max_tokens, temperature, top_p, top_k, seed, raw, device, dtype, as_json,
                vram, policy, transfer_bits, prompts, batch, eager)


@app.command()
def pull(
    model: str = typer.Argument(..., help="alias from models.toml or a Hub repo id (org/name)"),
    revision: str = typer.Option(None, help="branch, tag or commit [default: main]"),
    quantize: bool = typer.Option(True, "--quantize/--no-quantize", help="requantize the experts into tiers"),
) -> None:
    """Download a model from the Hugging Face Hub into $FATE_HOME/models, then requantize its experts."""
    from fate_cli.hub import pull_command

    pull_command(model, revision, quantize)


@app.command("list")
def list_models() -> None:
    """List pulled and bundled models: name, family, size on disk."""
    from fate_cli.hub import list_command

    list_command()


@app.command()
def rm(
    model: str = typer.Argument(..., help="alias or Hub repo id of a pulled model"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
) -> None:
    """Delete a pulled model from $FATE_HOME/models."""
    from fate_cli.hub import rm_command

    rm_command(model, yes)


@app.command()
def chat(
    model: str = typer.Argument(None, help=MODEL_HELP + " [default: the bundled model]"),
    prompt: str = typer.Option(None, "--prompt", "-p", help="answer this one message and exit"),
    system: str = typer.Option(None, help="system message"),
    max_tokens: int = typer.Option(512, "-n", "--max-tokens", min=1, help="tokens per answer at most"),
    temperature: float = typer.Option(None, min=0.0, help="0 is greedy [default: generation_config.json]"),
    seed: int = typer.Option(0, help="random seed of the sampler"),
    device: str = typer.Option(None, help="cpu or cuda [default: cuda when available]"),
    dtype: str = typer.Option(None, help="float32, bfloat16 or float16"),
    vram: str = typer.Option(None, help=VRAM_HELP),
    policy: str = typer.Option("fate", help=POLICY_HELP),
    transfer_bits: int = typer.Option(None, help="move every expert at this tier's bit width (all policies)"),
    top_p: float = typer.Option(None, min=0.0, max=1.0, help="nucleus sampling mass"),
    top_k: int = typer.Option(None, min=0, help="sample among the k likeliest tokens (0: all)"),
    panel: bool = typer.Option(True, "--panel/--no-panel", help="the live panel of speed, cache and memory"),
    eager: bool = typer.Option(False, "--eager", help="decode with the eager forward (the reference) instead of "
                               "captured CUDA graphs with the fused expert kernels"),
) -> None:
    """Chat with a model; reads messages from the terminal, or one from --prompt or stdin."""
    from fate_cli.chat import chat_command

    chat_command(model, prompt, system, max_tokens, temperature, seed, device, dtype, vram, policy, transfer_bits,
                 top_p, top_k, panel, eager)


@app.command()
def bench(
    model: str = typer.Argument(
        None, help=MODEL_HELP + "; or synthetic:mixtral-8x7b | synthetic:qwen3-30b-a3b | synthetic:olmoe-1b-7b "
        "(real shapes, random weights), replay:mixtral-8x7b (the bundled model's routing at Mixtral's expert "
        "size); several, comma-separated [default: the bundled model]"),
    vram: str = typer.Option(None, help="budgets: 8GB, a list 4GB,8GB, a range 4GB-16GB+4GB, or shares of the "
                             "hot-tier expert bytes 25%,50%,75% [default: free memory less a margin]"),
    policy: str = typer.Option(None, help="policies, comma-separated "
                               "[default: resident,fate,lru,eap,fmoe,klotski,ondemand]"),
    prompt_len: int = typer.Option(512, "-p", "--prompt-len", min=1, help="prompt tokens (test ppP)"),
    gen_len: int = typer.Option(128, "-n", "--gen-len", min=2, help="generated tokens (test tgN)"),
    reps: int = typer.Option(3, "-r", "--repetitions", min=1, help="timed repetitions after one warm-up"),
    prompts: str = typer.Option(None, "--prompts", help="text file, one prompt per paragraph [default: held-out text]"),
    output: str = typer.Option("md", "-o", "--output", help="md, csv or json"),
    plot: str = typer.Option(None, "--plot", help="PNG file: decode tokens/s and hit rate against budget"),
    transfer_bits: int = typer.Option(None, help="move every expert at this tier's bit width (all policies)"),
    device: str = typer.Option(None, help="cpu or cuda [default: cuda when available]"),
    dtype: str = typer.Option(None, help="float32, bfloat16 or float16"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    batch: str = typer.Option("1", "--batch", help="prompts decoded together; a list 1,4,16 sweeps them"),
    rows_to: str = typer.Option(None, "--rows-to", help="also append each row to this file as a JSON line "
                                "as soon as it is measured (keeps a long sweep's rows if it is stopped)"),
    eager: bool = typer.Option(False, "--eager", help="decode with the eager forward (the reference) instead of "
                               "captured CUDA graphs with the fused expert kernels"),
) -> None:
    """Sweep VRAM budgets and policies side by side: prefill and decode speed, hit rate, bytes moved."""
    from fate_cli.bench import bench_command

    bench_command(model, prompt_len, gen_len, reps, device, dtype, output, vram, policy, transfer_bits, prompts,
                  plot, quiet, rows_to, batch, eager)


@app.command()
def quantize(
    model: str = typer.Argument(..., help=MODEL_HELP),
    hot_bits: int = typer.Option(4, "--hot-bits", help="bits of the hot tier (experts kept on the GPU): 8 or 4"),
    cold_bits: int = typer.Option(2, "--cold-bits", help="bits of the cold tier (transfers, misses): 4, 3 or 2"),
    group_size: int = typer.Option(64, "--group-size", help="hot tier: weights per scale/zero group"),
    cold_group_size: int = typer.Option(32, "--cold-group-size", help="cold tier: weights per scale/zero group"),
    dense_layers: int = typer.Option(1, "--dense-layers", min=0, help="first MoE layers also stored at 16 bits"),
    hqq_iters: int = typer.Option(20, "--hqq-iters", min=1, help="iterations of HQQ's optimiser (its default 20)"),
    method: str = typer.Option("hqq", "--method", help="hqq, or minmax (no optimiser, no hqq install)"),
    shard_mb: float = typer.Option(1024.0, "--shard-mb", min=0.0, help="largest store file, MiB"),
    device: str = typer.Option(None, help="where to quantize: cpu or cuda [default: cuda when available]"),
) -> None:
    """Requantize a model's experts into the tier store (hot INT4, cold INT2, layer 0 at 16 bits)."""
    from fate_cli.quantize import quantize_command

    quantize_command(
        model, hot_bits, cold_bits, group_size, cold_group_size, dense_layers, hqq_iters, method, shard_mb, device
    )


@app.command()
def verify(model: str = typer.Argument(..., help=MODEL_HELP)) -> None:
    """Check a model's tier store against its manifest (hashes, shapes, source checkpoint)."""
    from fate_cli.quantize import verify_command

    verify_command(model)


@app.command()
def perplexity(
    model: str = typer.Argument(None, help=MODEL_HELP + " [default: the bundled model]"),
    file: str = typer.Option(None, "--file", "-f", help="UTF-8 text [default: the bundled held-out text]"),
    tiers: str = typer.Option("bf16,hot,cold,mixed", help="comma-separated: bf16, hot, cold, mixed"),
    window: int = typer.Option(256, min=2, help="tokens per window"),
    max_windows: int = typer.Option(None, min=1, help="score at most this many windows"),
    device: str = typer.Option(None, help="cpu or cuda [default: cuda when available]"),
    dtype: str = typer.Option(None, help="float32, bfloat16 or float16"),
) -> None:
    """Perplexity on a text file, with experts from the checkpoint (bf16) or from the tier store."""
    from fate_cli.quantize import perplexity_command

    perplexity_command(model, file, tiers, window, max_windows, device, dtype)


@app.command()
def serve(
    model: str = typer.Argument(None, help=MODEL_HELP + " [default: the bundled model]"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (loopback by default)"),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: any free port, printed at start)"),
    api_key: str = typer.Option(None, "--api-key", envvar="FATE_API_KEY", show_envvar=True,
                                help="require `Authorization: Bearer KEY` on every request"),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="requests decoded together at most"),
    max_queue: int = typer.Option(64, "--max-queue", min=0, help="requests waiting for a row at most (then 429)"),
    context: int = typer.Option(None, "--context", min=2, help="tokens per request, prompt and answer "
                                "[default: 4096, or the model's limit if smaller]"),
    device: str = typer.Option(None, help="cpu or cuda [default: cuda when available]"),
    dtype: str = typer.Option(None, help="float32, bfloat16 or float16"),
    vram: str = typer.Option(None, help=VRAM_HELP),
    policy: str = typer.Option("fate", help=POLICY_HELP),
    transfer_bits: int = typer.Option(None, help="move every expert at this tier's bit width (all policies)"),
    eager: bool = typer.Option(False, "--eager", help="decode with the eager forward (the reference) instead of "
                               "captured CUDA graphs with the fused expert kernels"),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat and text completions, streamed or not)."""
    from fate_cli.serve import serve_command

    serve_command(model, host, port, api_key, max_batch, max_queue, context, device, dtype, vram, policy,
                  transfer_bits, eager)


def main() -> None:
    try:
        app()
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


def os_error_line(err: OSError) -> str:
    import errno

    where = f" {err.filename}" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"the disk is full{' writing' + where if where else ''}; free some space, or set FATE_HOME to a " \
            "folder on another disk"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
        return f"cannot write{where} ({err.strerror}); set FATE_HOME to a writable folder"
    return f"{err.strerror or err}{where}"
