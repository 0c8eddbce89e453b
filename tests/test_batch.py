"""Batched generation: several prompts decoded together give each prompt's greedy tokens from alone."""

from __future__ import annotations

import json

import pytest
import torch

from fate_cli.engine.generate import Sampler, SamplingParams, generate, generate_batch
from fate_cli.engine.runtime import open_model
from fate_cli.model.loader import load_model
from fate_cli.run import answer_paragraph
from tests.helpers import assert_one_line_error
from tests.test_cli_run import fate
from tests.tiny_models import make_tiny_model

CPU = torch.device("cpu")
TEXTS = ["The hacker ethic", "What does hack mean? It is a word that", "In Python, a list comprehension", "Unix"]


def greedy() -> Sampler:
    return Sampler(SamplingParams(temperature=0.0), CPU)


def alone_and_batched(model, prompts, n):  # noqa: ANN001, ANN202
    alone = [generate(model, p, n, greedy()).token_ids for p in prompts]
    return alone, generate_batch(model, prompts, n, greedy())


def test_bundled_model_batch_equals_each_prompt_alone():
    rt = open_model("tiny", "cpu", "float32")
    prompts = [rt.tokenizer.encode(t) for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # rows of different lengths
    alone, batched = alone_and_batched(rt.model, prompts, 16)
    assert [r.token_ids for r in batched.results] == alone
    assert batched.stats.generated_tokens == sum(map(len, alone))


def test_a_row_that_stops_early_keeps_its_tokens(tmp_path):
    path = make_tiny_model(tmp_path / "mixtral", family="mixtral")
    model = load_model(path, CPU, torch.float32).model
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    alone = [generate(model, p, 10, greedy()).token_ids for p in prompts]
    eos = alone[1][3]  # the second prompt's fourth token ends it
    expect = [generate(model, p, 10, greedy(), eos_ids=[eos]).token_ids for p in prompts]
    batched = generate_batch(model, prompts, 10, greedy(), eos_ids=[eos])
    assert [r.token_ids for r in batched.results] == expect
    assert batched.results[1].stats.stop_reason == "eos" and len(expect[1]) <= 4


def test_batch_under_offloading_equals_resident_alone():
    """fate at a small budget, moving experts at the hot tier, batched: resident's tokens for each prompt."""
    ref = open_model("tiny", "cpu", "float32", "resident", "1GB", 4)
    prompts = [ref.tokenizer.encode(t) for t in TEXTS[:3]]
    alone = [generate(ref.model, p, 12, greedy()).token_ids for p in prompts]
    offloaded = open_model("tiny", "cpu", "float32", "fate", "16MB", 4)
    assert offloaded.offload is not None and offloaded.setup.policy == "fate"
    batched = generate_batch(offloaded.model, prompts, 12, greedy())
    assert [r.token_ids for r in batched.results] == alone
    assert offloaded.offload.stats.misses > 0  # the cache really worked under the budget


def test_run_prompts_file_in_batches(tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(TEXTS[:3]) + "\n", encoding="utf-8")
    out = fate("run", "tiny", "--prompts", str(prompts_file), "--batch", "2", "-n", "10", "--json", "--device", "cpu",
               "--temperature", "0")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and [r["batch"] for r in rows] == [2, 2, 1]
    for r in rows:  # each row's stats are this prompt's, in the fields a single run reports
        s = r["stats"]
        assert s["prompt_tokens"] == len(r["prompt_token_ids"]) and s["generated_tokens"] == len(r["token_ids"])
        assert s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0 and s["stop_reason"] == "length"
        assert s["batch_total"]["generated_tokens"] == sum(len(o["token_ids"]) for o in rows
                                                           if o["index"] // 2 == r["index"] // 2)
    single = fate("run", "tiny", TEXTS[1], "-n", "10", "--json", "--device", "cpu", "--temperature", "0")
    assert json.loads(single.stdout)["token_ids"] == rows[1]["token_ids"]
    text = fate("run", "tiny", "--prompts", str(prompts_file), "--batch", "3", "-n", "10", "--device", "cpu",
                "--temperature", "0")
    assert text.returncode == 0 and "3 prompts in batches of 3" in text.stderr
    assert [p.strip() for p in text.stdout.split("\n\n") if p.strip()] == [answer_paragraph(r["text"]) for r in rows]
    # klotski prefills the batch's prompts together: on a CPU an expert call's fixed cost dwarfs the copies and
    # the rows of these short prompts, so the planner puts all three in one group
    grouped = fate("run", "tiny", "--prompts", str(prompts_file), "--batch", "3", "-n", "4", "--device", "cpu",
                   "--temperature", "0", "--policy", "klotski", "--vram", "16MB")
    assert grouped.returncode == 0 and "prefilled together in 1 group of up to 3" in grouped.stderr, grouped.stderr


def test_an_answer_with_blank_lines_stays_one_paragraph():
    assert answer_paragraph("\n  First line.\n\n\nSecond line.\n \n") == "First line.\nSecond line."
    assert answer_paragraph("one") == "one"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["hello", "--prompts", "PROMPTS"], "not both"),
        (["--batch", "2"], "--prompts FILE"),
        ([], "no prompt"),
        (["--prompts", "EMPTY"], "holds no text"),
    ],
)
def test_run_prompt_errors(tmp_path, args, needle):
    (tmp_path / "p.txt").write_text("hi\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    args = [str(tmp_path / "p.txt") if a == "PROMPTS" else str(tmp_path / "empty.txt") if a == "EMPTY" else a
            for a in args]
    assert_one_line_error(fate("run", "tiny", *args), 2, needle)


def test_klotski_prefills_prompts_together_with_each_prompts_tokens():
    """klotski's groups pass through each layer together: each prompt's tokens as alone, fewer copies."""
    from cache.microbatch import LayerTimes

    ref = open_model("tiny", "cpu", "float32", "resident", "1GB", 4)
    prompts = [ref.tokenizer.encode(t) for t in TEXTS]
    alone = [generate(ref.model, p, 6, greedy()).token_ids for p in prompts]
    moved = {}
    # scripted times: copies far slower than compute (all four together), then compute covering them (alone)
    for label, times in (("together", LayerTimes(1.0, 0.0, 1e-6)), ("alone", LayerTimes(0.0, 0.0, 1.0))):
        rt = open_model("tiny", "cpu", "float32", "klotski", "16MB", 4)
        rt.offload.layer_times = times
        assert [r.token_ids for r in generate_batch(rt.model, prompts, 6, greedy()).results] == alone
        assert rt.offload.last_groups == ([[0, 1, 2, 3]] if label == "together" else [[0], [1], [2], [3]])
        rt.offload.reset_stats()
        generate_batch(rt.model, prompts, 1, greedy())  # prefill only: the first token comes from it
        moved[label] = rt.offload.stats.misses
    assert moved["together"] < moved["alone"]
