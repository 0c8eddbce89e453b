"""The GEMV's tuned tiles as data: the per-GPU JSON files, their reader and writer, the note for a GPU without one."""

from __future__ import annotations

import json

import pytest
import torch

from quant import gemv_tiles as gt

H100 = "NVIDIA H100 80GB HBM3"  # torch.cuda.get_device_name() of the lent H100 the packaged tiles were tuned on
# the published experts' matrices, gate|up [2I, H] and down [H, I], at the INT4 g64 and INT2 g32 tiers
PUBLISHED = {"mixtral-8x7b": (4096, 14336), "qwen3-30b-a3b": (2048, 768)}
TIERS = ((4, 64), (2, 32))


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Each test reads the files anew (the module keeps what it read for the process)."""
    saved = dict(gt._BY_GPU)
    gt._BY_GPU.clear()
    yield
    gt._BY_GPU.clear()
    gt._BY_GPU.update(saved)


def test_file_name_of_a_device_name():
    assert gt.file_name(H100) == "gemv_tiles_NVIDIA_H100_80GB_HBM3.json"
    assert gt.file_name("NVIDIA GeForce RTX 4090 (laptop)") == "gemv_tiles_NVIDIA_GeForce_RTX_4090_laptop.json"


def test_the_h100_file_holds_every_published_matrix_with_a_whole_tile():
    tiles = gt.for_gpu(H100)
    expected = {(n, k, bits, group) for hidden, inter in PUBLISHED.values()
                for n, k in ((2 * inter, hidden), (hidden, inter)) for bits, group in TIERS}
    assert set(tiles) == expected
    for (_n, k, _bits, group), cfg in tiles.items():
        assert {"BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps"} <= set(cfg)
        assert cfg["BLOCK_K"] % group == 0 and cfg["SPLIT_K"] >= 1
        assert cfg["BLOCK_K"] <= 2 * k  # a tile of the sweep's grid: at most one step past K


def test_the_packaged_files_are_in_the_writers_form(tmp_path):
    """Every packaged file reads back the same after a write, byte for byte: what the tuner writes is what
    the package ships, and no entry is lost or changed on the way."""
    files = sorted(gt.CONFIG_DIR.glob("gemv_tiles_*.json"))
    assert files, f"no tiles files in {gt.CONFIG_DIR}"
    for path in files:
        tiles = gt.read(path)
        out = tmp_path / path.name
        gt.write(out, tiles)
        assert gt.read(out) == tiles
        assert out.read_text() == path.read_text()
        assert json.loads(out.read_text()) == json.loads(path.read_text())
        assert not list(tmp_path.glob("*.tmp"))


def test_off_cuda_the_lookup_is_empty_and_silent(capsys):
    assert gt.lookup(28672, 4096, 4, 64, torch.device("cpu")) == {}  # the GEMV does not run there
    assert capsys.readouterr().err == ""


def test_a_gpu_without_a_file_falls_back_with_one_note(tmp_path, capsys):
    name = "Example GPU 12GB"
    assert gt.for_gpu(name, config_dir=tmp_path) == {}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: no tuned GEMV tiles for this GPU (Example GPU 12GB")
    assert "gemv_tiles_Example_GPU_12GB.json" in err and "benchmarks/sweep_gemv.py" in err
    assert gt.for_gpu(name, config_dir=tmp_path) == {}
    assert capsys.readouterr().err == ""  # once per process


def test_a_written_file_is_read_for_its_gpu(tmp_path, capsys):
    tiles = {(1536, 2048, 4, 64): {"BLOCK_N": 4, "BLOCK_K": 2048, "SPLIT_K": 1, "num_warps": 8, "DIRECT": True}}
    gt.write(tmp_path / gt.file_name("Example GPU"), tiles)
    assert gt.for_gpu("Example GPU", config_dir=tmp_path) == tiles
    assert capsys.readouterr().err == ""
    gt.use("Example GPU", {})  # a benchmark's own tiles replace the file's for the process
    assert gt.for_gpu("Example GPU", config_dir=tmp_path) == {}


def test_bad_keys_and_fields_are_named(tmp_path):
    with pytest.raises(ValueError, match="not a GEMV tile key"):
        gt.parse_key("N=1,K=2,bits=4")
    with pytest.raises(ValueError, match="not a GEMV tile key"):
        gt.parse_key("1536x2048")
    bad = tmp_path / "gemv_tiles_x.json"
    bad.write_text(json.dumps({gt.key(8, 64, 4, 64): {"BLOCK_N": 8, "BLOCK_M": 16}}))
    with pytest.raises(ValueError, match="unknown tile fields"):
        gt.read(bad)
