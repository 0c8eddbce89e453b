"""`fate chat`: a multi-turn conversation through the model's chat template, streamed.

The first version: every turn re-renders the whole conversation and prefills it. The live panel,
slash commands and KV-cache reuse across turns come with the chat issue.
"""

from __future__ import annotations

import sys

from rich.console import Console

from fate_cli.generate import Sampler, generate
from fate_cli.run import sampling_from
from fate_cli.runtime import open_model
from fate_cli.tokenizer import Message, StreamDecoder


def chat_command(
    model: str | None,
    prompt: str | None,
    system: str | None,
    max_tokens: int,
    temperature: float | None,
    seed: int | None,
    device: str | None,
    dtype: str | None,
    vram: str | None = None,
    policy: str | None = "fate",
    transfer_bits: int | None = None,
) -> None:
    err = Console(stderr=True, highlight=False)
    runtime = open_model(model, device, dtype, policy, vram, transfer_bits)
    runtime.announce(err)
    sampler = Sampler(sampling_from(runtime, temperature, None, None, seed), runtime.loaded.device)
    history = [Message("system", system)] if system else []
    interactive = prompt is None and sys.stdin.isatty()
    inputs = [prompt] if prompt is not None else None

    while True:
        if inputs is not None:
            if not inputs:
                return
            text = inputs.pop(0)
        elif interactive:
            try:
                text = input(">>> ")
            except EOFError:
                return
            if text.strip() in ("/exit", "/bye"):
                return
        else:
            text = sys.stdin.read()
            inputs = []
        if not text.strip():
            continue
        history.append(Message("user", text))
        ids = runtime.tokenizer.encode_chat(history)
        stream = StreamDecoder(runtime.tokenizer)

        def on_token(token_id: int, stream: StreamDecoder = stream) -> None:
            sys.stdout.write(stream.push(token_id))
            sys.stdout.flush()

        result = generate(
            runtime.model, ids, max_tokens, sampler, runtime.tokenizer.eos_ids, on_token=on_token
        )
        sys.stdout.write("\n")
        history.append(Message("assistant", runtime.tokenizer.decode(result.token_ids)))
