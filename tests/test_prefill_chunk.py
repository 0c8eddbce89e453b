"""--prefill-chunk: a prompt longer than the chunk goes through the layers a chunk at a time (KV cache, linear
state and sliding rings carried between chunks) and gives the one-pass logits and tokens; the planner sizes its
workspace for one chunk."""

from __future__ import annotations

import pytest
import torch

from cache.setup import footprint
from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.model import model as model_module
from fate_cli.model.loader import load_model
from quant.store import QuantParams
from tests.helpers import one_thread  # noqa: F401 - one_thread applies to this module
from tests.tiny_gpt_oss import make_tiny_gpt_oss
from tests.tiny_models import FAMILIES, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def default_chunk():
    yield
    model_module.set_prefill_chunk(None)


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_oss"])
def test_a_chunked_prompt_gives_the_one_pass_logits_and_tokens(tmp_path, family):
    path = (make_tiny_gpt_oss(tmp_path / family) if family == "gpt_oss"
            else make_tiny_model(tmp_path / family, family=family))
    model = load_model(path, "cpu", torch.float32).model
    prompt = torch.randint(3, 100, (1, 45), generator=torch.Generator().manual_seed(2))
    sampler = Sampler(SamplingParams(temperature=0.0), torch.device("cpu"))
    with torch.no_grad():
        whole = model(prompt, model.new_cache(1, 64), 0)
    tokens = generate(model, prompt[0].tolist(), 12, sampler).token_ids
    model_module.set_prefill_chunk(16)  # 45 tokens: chunks of 16, 16 and 13
    passes = []
    hook = model.embed_tokens.register_forward_hook(lambda _m, inputs, _out: passes.append(inputs[0].shape[1]))
    with torch.no_grad():
        chunked = model(prompt, model.new_cache(1, 64), 0)
    hook.remove()
    assert passes == [16, 16, 13]
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    assert generate(model, prompt[0].tolist(), 12, sampler).token_ids == tokens


def test_the_planner_sizes_the_workspace_for_one_chunk(tmp_path):
    from fate_cli.model.loader import load_args

    args = load_args(make_tiny_model(tmp_path / "m", family="qwen3_moe"))
    default = footprint(args, torch.float32, 256, QuantParams(), False).workspace
    model_module.set_prefill_chunk(64)
    smaller = footprint(args, torch.float32, 256, QuantParams(), False).workspace
    model_module.set_prefill_chunk(2048)
    larger = footprint(args, torch.float32, 256, QuantParams(), False).workspace
    assert smaller < default < larger
