"""`fate bench` on CPU with the bundled model: structure and counts of the sweep, never speed."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from cache.budget import format_size
from fate_cli.bench import BENCH_ORDER, FIELDS, markdown, parse_budgets, plot_figure
from fate_cli.bench_targets import ReplayTarget
from fate_cli.engine.replay import record
from fate_cli.errors import UsageError
from predictors.cross_layer import predict_next
from tests.helpers import assert_one_line_error, one_thread  # noqa: F401 - a fixture
from tests.test_cli_run import fate

POLICIES = list(BENCH_ORDER)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    png = tmp_path_factory.mktemp("plot") / "sweep.png"
    result = fate("bench", "--vram", "25%,50%,1KB", "-p", "24", "-n", "6", "-r", "1", "-o", "json",
                  "--transfer-bits", "4", "--plot", str(png), "-q")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), png


def test_one_row_per_policy_budget_and_test(sweep):
    rows, _ = sweep
    keys = [(r["policy"], r["vram"], r["test"]) for r in rows]
    assert sorted(keys) == sorted((p, v, t) for p in POLICIES for v in ("25%", "50%", "1KB") for t in ("pp24", "tg6"))
    for r in rows:
        assert set(FIELDS) - {"note", "minimum_budget_bytes"} <= set(r) or r["status"] != "ok", r
        assert r["model"] == "tiny" and r["kind"] == "model" and r["reps"] == 1


def test_impossible_budget_is_a_row_not_a_crash(sweep):
    rows, _ = sweep
    small = [r for r in rows if r["vram"] == "1KB" and r["policy"] != "resident"]
    assert small and all(r["status"] == "does not fit" and "minimum" in r["note"] for r in small)


def test_offloading_never_changes_tokens_in_the_sweep(sweep):
    rows, _ = sweep
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2 * ((len(POLICIES) - 1) * 2 + 3)  # offloading policies at two budgets, resident at three
    assert all(r["same_tokens_as_resident"] for r in ok)


def test_bookkeeping_is_consistent(sweep):
    rows, _ = sweep
    by = {(r["policy"], r["vram"], r["test"]): r for r in rows if r["status"] == "ok"}
    for v in ("25%", "50%"):
        assert by[("resident", v, "tg6")]["gb_moved"] == 0 and by[("resident", v, "tg6")]["hit_rate"] == 1.0
        assert by[("ondemand", v, "tg6")]["hit_rate"] == 0.0  # it keeps nothing
        assert by[("fate", v, "tg6")]["decode_prediction_recall"] is not None
        assert by[("lru", v, "tg6")]["prediction_recall"] is None  # no predictor
    assert by[("lru", "50%", "tg6")]["hit_rate"] >= by[("lru", "25%", "tg6")]["hit_rate"]
    assert by[("fate", "50%", "tg6")]["gb_moved"] <= by[("ondemand", "50%", "tg6")]["gb_moved"]


def test_plot_is_a_real_png(sweep):
    _, png = sweep
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = struct.unpack(">II", data[16:24])
    assert width > 500 and height > 300


def test_plot_without_matplotlib_names_the_extra(tmp_path):
    """matplotlib is the optional `plot` extra: without it --plot stops before any work, in one line."""
    import subprocess
    import sys

    # sys.modules[name] = None is how Python marks a module as not importable: `import matplotlib` raises
    blocked = "import sys; sys.modules['matplotlib'] = None; from fate_cli.app import main; main()"
    result = subprocess.run([sys.executable, "-c", blocked, "bench", "--plot", str(tmp_path / "p.png"), "-q"],
                            capture_output=True, text=True, env={**os.environ, "FATE_HOME": str(tmp_path)}, timeout=120)
    assert_one_line_error(result, 2, "--plot needs matplotlib", "fate-moe[plot]")
    assert not (tmp_path / "p.png").exists()


def _cells(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("| ")]


def test_markdown_says_what_its_numbers_are(sweep):
    """One repetition shows no spread; resident says it ignores the budget; a budget that does not fit names the
    minimum; a policy that predicted nothing while decoding shows that, not a recall of 0."""
    rows, _ = sweep
    table = markdown(rows)
    cells = _cells(table.split("\n\n")[0])[2:]
    assert cells and all("±" not in c[5] for c in cells)
    assert "one repetition (-r 1): no spread to show" in table
    assert {c[2] for c in cells if c[2].startswith("resident")} == {"resident (any budget)"}
    assert all(r["note"].startswith("ignores the budget") for r in rows if r["policy"] == "resident")
    minimum = {r["minimum_budget_bytes"] for r in rows if r["status"] == "does not fit"}
    assert len(minimum) == 1 and None not in minimum
    assert {c[5] for c in cells if c[3] == "1KB" and not c[2].startswith("resident")} == {
        f"does not fit (needs {format_size(minimum.pop())})"}
    klotski = [r for r in rows if r["policy"] == "klotski" and r["test"] == "tg6" and r["status"] == "ok"]
    assert klotski and all(r["decode_predicted"] == 0 for r in klotski)  # its counts never reach one token
    assert {c[7] for c in cells if c[2] == "klotski" and c[4] == "tg6" and c[3] != "1KB"} == {"none made"}
    fate_decode = [c[7] for c in cells if c[2] == "fate" and c[4] == "tg6" and c[3] != "1KB"]
    assert fate_decode and all(float(v) > 0 for v in fate_decode)


def test_a_spread_larger_than_the_mean_is_flagged(sweep):
    rows, _ = sweep
    ok = next(r for r in rows if r["status"] == "ok")
    calm = {**ok, "reps": 3, "stdev": ok["tokens_per_s"] / 10}
    wild = {**ok, "reps": 2, "stdev": ok["tokens_per_s"] * 1.4}
    assert "(!)" not in markdown([calm])
    flagged = markdown([wild])
    assert f"{wild['tokens_per_s']:.2f} ± {wild['stdev']:.2f} (!)" in flagged
    assert "the spread exceeds the mean" in flagged


def test_plot_reads_in_the_budgets_unit_with_the_legend_outside(sweep):
    rows, _ = sweep
    fig = plot_figure(rows)
    speed, hit = fig.axes[:2]
    assert speed.get_xlabel() == hit.get_xlabel() == "VRAM budget (MB)"  # tiny's budgets are megabytes
    assert max(speed.get_xticks()) > 1  # ticks in MB, not 0.0154 GB
    assert speed.get_legend() is None and hit.get_legend() is None and len(fig.legends) == 1


def test_markdown_table_parses():
    result = fate("bench", "--vram", "50%", "--policy", "fate,ondemand", "-p", "16", "-n", "4", "-r", "1", "-q")
    assert result.returncode == 0, result.stderr
    tables = [t.strip().splitlines() for t in result.stdout.strip().split("\n\n")]
    main, notes, ratio = tables
    assert main[0].split("|")[1:-1] == [" model ", " size (hot) ", " policy ", " vram ", " test ", " t/s ",
                                        " hit % ", " pred. recall ", " GB moved ", " on CPU ", " loads / MIN "]
    assert all(n.startswith("- ") for n in notes)
    assert len(main) == 2 + 4 and all(line.count("|") == main[0].count("|") for line in main)
    assert len(ratio) == 2 + 4 and "× ondemand" in ratio[0]
    csv_out = fate("bench", "--vram", "50%", "--policy", "fate", "-p", "16", "-n", "4", "-r", "1", "-q", "-o", "csv")
    assert csv_out.stdout.splitlines()[0].split(",") == FIELDS and len(csv_out.stdout.splitlines()) == 3


def test_bad_bench_input_is_one_line(tmp_path):
    assert_one_line_error(fate("bench", "--policy", "fate,nope", home=tmp_path), 2, "nope")
    assert_one_line_error(fate("bench", "synthetic:gpt-9", home=tmp_path), 2, "synthetic:mixtral-8x7b")
    assert_one_line_error(fate("bench", "--vram", "16GB-4GB+1GB", home=tmp_path), 2, "backwards")
    assert_one_line_error(fate("bench", "-o", "xml", home=tmp_path), 2, "md, csv or json")


def test_budget_lists_ranges_and_shares():
    class Fp:
        fixed, all_hot = 1000, 10_000

    assert parse_budgets("4GB-16GB+4GB", Fp) == [("4.00GB", 4 * 10**9), ("8.00GB", 8 * 10**9),
                                                 ("12.00GB", 12 * 10**9), ("16.00GB", 16 * 10**9)]
    assert parse_budgets("25%,2KB", Fp) == [("25%", 3500), ("2KB", 2000)]
    assert parse_budgets(None, Fp) == [("auto", None)]
    with pytest.raises(UsageError):
        parse_budgets("-5%", Fp)


@pytest.mark.usefixtures("one_thread")
def test_replay_recall_equals_offline_recall_on_the_same_traffic():
    """The runtime's Fate predictor, fed the recorded traffic, finds what the offline measure finds."""
    from fate_cli.bench import prompt_set
    from fate_cli.engine.runtime import open_model

    loaded = open_model("tiny", "cpu", "float32").loaded
    target = ReplayTarget("replay:64x96", loaded.model, 64, 96, torch.device("cpu"), torch.float32, None)
    prompt = prompt_set(24, 1, None)[0]
    steps = record(loaded.model, [prompt], 12)[0]
    session = target.session("fate", int(target.footprint.fixed + 0.5 * target.footprint.all_hot))
    session.run([prompt], 12)
    stats = session.offload.sync_stats()
    router = target.ctx.routers
    k = target.ctx.top_k
    for layer in target.ctx.moe_layers[1:]:
        found = wanted = 0
        for step in steps[1:]:  # decode steps: one token each
            prev = next(t for t in step.layers if t.layer == layer - 1)
            now = next(t for t in step.layers if t.layer == layer)
            predicted = set(predict_next(prev.gate_input, router[layer], k + 1).flatten().tolist())
            found += len(predicted & set(now.ids))
            wanted += len(now.ids)
        assert stats.decode_layers[layer].recall == pytest.approx(found / wanted)
    assert len(steps) == 12 and steps[0].tokens == 24 and all(s.tokens == 1 for s in steps[1:])


SMALL_MIXTRAL = {"model_type": "mixtral", "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 96,
                 "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
                 "num_experts_per_tok": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}


@pytest.mark.usefixtures("one_thread")
def test_synthetic_model_runs_every_policy(monkeypatch):
    """A synthetic model (random weights straight into tiers) through the same sweep; 16-bit when it all fits."""
    from fate_cli import synthetic
    from fate_cli.bench import open_target, prompt_set, sweep

    monkeypatch.setitem(synthetic.CONFIGS, "small-mixtral", SMALL_MIXTRAL)
    cpu = torch.device("cpu")
    rows = sweep([lambda: open_target("synthetic:small-mixtral", cpu, torch.float32, None)], "50%,10GB", POLICIES,
                 prompt_set(16, 2, None), 4, 1, cpu)
    assert len(rows) == 2 * 2 * len(POLICIES) and all(r["status"] == "ok" for r in rows)
    assert all(r["kind"] == "synthetic" for r in rows)
    roomy = [r for r in rows if r["vram"] == "10GB" and r["policy"] != "resident"]
    assert all(r["plan"].startswith("every expert") or r["gb_moved"] == 0 for r in roomy), roomy[0]["plan"]
    half = {r["policy"]: r for r in rows if r["vram"] == "50%" and r["test"] == "tg4"}
    assert half["ondemand"]["gb_moved"] > 0 and half["ondemand"]["hit_rate"] == 0.0


def test_batch_sweep_rows_and_tokens(tmp_path):
    """--batch 1,3: rows per batch size; batched requests keep resident's tokens under every policy."""
    result = fate("bench", "--vram", "50%", "--policy", "resident,fate,lru", "--batch", "1,3", "-p", "16", "-n", "5",
                  "-r", "1", "-o", "json", "--transfer-bits", "4", "-q")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    expected = [(p, b, t + ("" if b == 1 else " b3"))
                for p in ("resident", "fate", "lru") for b in (1, 3) for t in ("pp16", "tg5")]
    assert sorted((r["policy"], r["batch"], r["test"]) for r in rows) == sorted(expected)
    assert all(r["status"] == "ok" and r["same_tokens_as_resident"] for r in rows)
    assert "cannot read --batch" in fate("bench", "--batch", "0", home=tmp_path).stderr


@pytest.mark.usefixtures("one_thread")
def test_merged_prefill_steps_hold_every_prompts_traffic():
    from fate_cli.engine.replay import LayerTraffic, Step, merge_steps

    a = Step([LayerTraffic(1, torch.zeros(2, 4), [0, 3], [1, 3]), LayerTraffic(2, torch.zeros(2, 4), [1], [4])])
    b = Step([LayerTraffic(1, torch.ones(3, 4), [3, 5], [2, 4]), LayerTraffic(2, torch.ones(3, 4), [0, 1], [3, 3])])
    merged = merge_steps([a, b])
    assert merged.tokens == 5 and [t.layer for t in merged.layers] == [1, 2]
    assert (merged.layers[0].ids, merged.layers[0].counts) == ([0, 3, 5], [1, 5, 4])
    assert (merged.layers[1].ids, merged.layers[1].counts) == ([0, 1], [3, 7])
    assert merged.layers[1].gate_input[:2].sum() == 0 and merged.layers[1].gate_input[2:].sum() == 12


def test_replay_of_a_batch_plays_every_row():
    """A batch's trace: one prefill step per prompt, then steps of one token per prompt."""
    from fate_cli.bench import prompt_set
    from fate_cli.engine.runtime import open_model

    loaded = open_model("tiny", "cpu", "float32").loaded
    target = ReplayTarget("replay:64x96", loaded.model, 64, 96, torch.device("cpu"), torch.float32, None)
    prompts = prompt_set(10, 3, None)
    steps = target.steps(prompts, 4)
    assert [s.tokens for s in steps] == [10, 10, 10, 3, 3, 3]
    session = target.session("fate", int(target.footprint.fixed + 0.5 * target.footprint.all_hot))
    session.run(prompts, 4)
    moe = len(target.ctx.moe_layers)
    stats = session.offload.stats
    routed = sum(len(t.ids) for s in steps for t in s.layers)
    assert stats.hits + stats.misses == routed and routed >= moe * 6 * target.ctx.top_k
    # klotski prefills the three prompts as one group (scripted times): the layers see their routing merged
    from cache.microbatch import LayerTimes
    from fate_cli.engine.replay import merge_steps

    session = target.session("klotski", int(target.footprint.fixed + 0.5 * target.footprint.all_hot))
    session.offload.layer_times = LayerTimes(1.0, 0.0, 1e-6)
    session.run(prompts, 4)
    assert session.offload.last_groups == [[0, 1, 2]]
    stats = session.offload.stats
    routed = sum(len(t.ids) for s in [merge_steps(steps[:3]), *steps[3:]] for t in s.layers)
    assert stats.hits + stats.misses == routed


def test_every_row_holds_its_loads_against_min(sweep):
    rows, _ = sweep
    ok = [r for r in rows if r["status"] == "ok"]
    by = {(r["policy"], r["vram"], r["test"]): r for r in ok}
    for r in ok:
        if r["cpu_experts"]:  # a miss computed on the CPU needs no slot: the row may load less than MIN
            continue
        assert r["min_loads"] <= r["loads"] and r["min_bytes"] <= sum(r["bytes_moved"].values()), r
        assert r["min_tier"] == "hot"  # --transfer-bits 4: every transfer at the hot tier
    for v in ("25%", "50%"):
        assert by[("resident", v, "tg6")]["loads"] == by[("resident", v, "tg6")]["min_loads"] == 0
        lru, ondemand = by[("lru", v, "tg6")], by[("ondemand", v, "tg6")]
        # the same even slots and routing, but ondemand's floor starts from empty slots (it keeps nothing)
        assert ondemand["min_loads"] >= lru["min_loads"] > 0
        assert ondemand["loads_over_min"] >= lru["loads_over_min"] >= 1.0
        assert by[("fate", v, "tg6")]["hit_rate"] >= lru["hit_rate"]
    assert "loads / MIN" in markdown(rows)


def test_fate_against_lru_and_the_floor_on_the_replay(one_thread):  # noqa: F811 - the fixture
    """The bundled model's recorded traffic at three budgets: fate's hit rate at least lru's, fewer bytes than lru
    and than Fate's shallow split, and never fewer loads than MIN."""
    from fate_cli.bench import measure_row, open_target, prompt_set

    target = open_target("replay:64x128", torch.device("cpu"), torch.float32, None)
    prompts = prompt_set(64, 2, None)
    for label, budget in parse_budgets("25%,50%,75%", target.footprint):
        rows = {p: measure_row(target, p, label, budget, prompts, 32, 1, miss="link")[0][1]  # every miss moves
                for p in ("fate", "fate-shallow", "lru")}
        fate_row, shallow, lru = rows["fate"], rows["fate-shallow"], rows["lru"]
        assert fate_row["hit_rate"] >= lru["hit_rate"], label
        moved = {p: sum(r["bytes_moved"].values()) for p, r in rows.items()}
        assert moved["fate"] < moved["lru"] and moved["fate"] < moved["fate-shallow"], (label, moved)
        assert all(r["loads"] >= r["min_loads"] > 0 for r in rows.values())
        assert fate_row["min_loads"] <= shallow["min_loads"], label  # measured slots lower the floor itself


@pytest.mark.usefixtures("one_thread")
def test_offloaded_rows_carry_the_decode_steps_host_time(monkeypatch):
    """host_ms_per_token: positive where the decode step stopped at every MoE layer for the cache (lru at 50%),
    None where it never stopped (resident: every expert in its slot)."""
    from fate_cli import synthetic
    from fate_cli.bench import measure_row, open_target, prompt_set

    monkeypatch.setitem(synthetic.CONFIGS, "small-mixtral", SMALL_MIXTRAL)
    target = open_target("synthetic:small-mixtral", torch.device("cpu"), torch.float32, None)
    target.capture = False  # the decode step runs uncaptured: on the CPU too
    ((label, budget),) = parse_budgets("50%", target.footprint)
    prompts = prompt_set(8, 2, None)
    rows = {p: measure_row(target, p, label, budget, prompts, 5, 1)[0] for p in ("lru", "resident")}
    assert all(r["status"] == "ok" and r["decode"] == "decode: static, uncaptured" for v in rows.values() for r in v)
    assert rows["lru"][1]["hit_rate"] < 1.0
    assert all(r["host_ms_per_token"] > 0 for r in rows["lru"])
    assert all(r["host_ms_per_token"] is None for r in rows["resident"])


def test_a_row_whose_setup_runs_out_of_device_memory_says_so_and_the_sweep_goes_on(monkeypatch):
    """The device refusing a row's cache or banks (torch.OutOfMemoryError while the session is built) makes that
    row's two lines say so; the next row runs."""
    from fate_cli import synthetic
    from fate_cli.bench import measure_row, open_target, prompt_set

    monkeypatch.setitem(synthetic.CONFIGS, "small-mixtral", SMALL_MIXTRAL)
    target = open_target("synthetic:small-mixtral", torch.device("cpu"), torch.float32, None)
    ((label, budget),) = parse_budgets("50%", target.footprint)
    prompts = prompt_set(8, 2, None)
    real = type(target).session

    def session(self, policy, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - Target.session's
        if policy == "lru":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, policy, *args, **kwargs)

    monkeypatch.setattr(type(target), "session", session)
    refused, _ = measure_row(target, "lru", label, budget, prompts, 4, 1)
    assert [r["status"] for r in refused] == ["out of memory"] * 2
    assert all("ran out of memory setting up 50%" in r["note"] for r in refused)
    ran, _ = measure_row(target, "ondemand", label, budget, prompts, 4, 1)
    assert [r["status"] for r in ran] == ["ok", "ok"]
