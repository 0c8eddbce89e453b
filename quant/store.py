"""The tier store: every expert requantized into tiers, one contiguous buffer per expert per tier.

Where: <model folder>/fate-tiers for a pulled model (so `fate rm` removes it too); $FATE_HOME/tiers/<name>
for the bundled model (its folder is inside the installed package, maybe read-only) and for local folders.

What (format_version 1):
- `<tier>-NNNNN-of-MMMMM.safetensors`: shards of one tier, each holding experts in (layer, expert) order as
  uint8 tensors named `<tier>.<layer>.<expert>`, all of the tier's expert size (ExpertLayout.nbytes, a
  multiple of 128, so every buffer starts 128-byte aligned: the header is padded to 128 too). A shard holds
  as many experts as fit in max_shard_bytes (at least one).
- `manifest.json`, written last: format, format_version, complete, fingerprint, the model's shape, the
  source (path, repo, revision, and sha256/size/mtime of config.json, the index and every weight file),
  the quantizer and every parameter, per tier its kind, bits, group size, layers, layout and files, per
  expert its file and sha256, per store file its sha256 and size.
- Tiers: `hot` (default INT4 g64) and `cold` (default INT2 g32) for every MoE layer, and `dense`, a 16-bit
  copy (the checkpoint's dtype when it is 16-bit, else bfloat16) of the first `dense_layers` MoE layers,
  which a plan keeps unquantized (Fate keeps layer 0 at 16 bits).

Crash safety: each shard is written to `<name>.tmp`, fsynced and renamed; `progress.json` (rewritten
atomically after each shard) records finished shards under a fingerprint of everything that decides the
bytes (format, parameters, source hashes, layouts, shard plan). A re-run with the same fingerprint keeps
the finished shards whose sha256 still matches and redoes the rest. The manifest is removed before any
shard changes and written last, so a store without `manifest.json` is never taken as complete.

Checks: `check_store` raises on the first problem: missing or incomplete store, another format version, a
source file that changed since quantization (stale: size and mtime first, its sha256 when they differ), a
missing or wrong-sized store file, a safetensors header that does not list exactly the planned experts,
and with deep=True a file whose sha256 differs. TierStore.read checks each expert's sha256 as it reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import torch

from fate_cli.errors import BadModel, Busy, ModelNotFound, UsageError
from quant.files import UnreadableJSON, exclusive_lock, fsync_dir, lock_note, read_json_object, write_json_atomic
from quant.hqq_quant import METHODS, hqq_settings, hqq_version, quantize_matrix
from quant.layout import ALIGN, DTYPES, ExpertLayout, dtype_name
from quant.manifest import JOURNAL_SCHEMA, MANIFEST_SCHEMA, ManifestError, first_difference, is_valid
from quant.manifest import check as check_schema
from quant.packing import PackedMatrix
from quant.source import HASH_CHUNK, ExpertSet, SourceReader, file_record, source_files

FORMAT = "fate-tiers"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
LOCK = ".lock"
TIERS_DIRNAME = "fate-tiers"
HOT_BITS = (8, 4)
COLD_BITS = (4, 3, 2)
GROUP_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024)

Progress = Callable[[str, int, int], None]  # (phase "hash" | "quantize", done, total)


@dataclass(frozen=True)
class QuantParams:
    hot_bits: int = 4
    hot_group_size: int = 64
    cold_bits: int = 2
    cold_group_size: int = 32
    dense_layers: int = 1  # the first N MoE layers also get a 16-bit tier
    method: str = "hqq"
    iters: int = 20  # HQQ optimiser iterations (its default)
    max_shard_bytes: int = 1 << 30
    device: str = "cpu"  # where the quantizer runs ("cuda": HQQ's optimiser in float16 on the GPU)

    def validate(self) -> None:
        if self.hot_bits not in HOT_BITS:
            raise UsageError(f"--hot-bits {self.hot_bits} is not supported; use {' or '.join(map(str, HOT_BITS))}")
        if self.cold_bits not in COLD_BITS:
            raise UsageError(f"--cold-bits {self.cold_bits} is not supported; use one of {COLD_BITS}")
        for opt, g in (("--group-size", self.hot_group_size), ("--cold-group-size", self.cold_group_size)):
            if g not in GROUP_SIZES:
                raise UsageError(f"{opt} {g} is not supported; use a power of two from 8 to 1024")
        if self.method not in METHODS:
            raise UsageError(f"unknown quantization method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.iters < 1 or self.dense_layers < 0 or self.max_shard_bytes < 1:
            raise UsageError("--hqq-iters and the shard size must be positive, --dense-layers at least 0; "
                            "give such values")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> QuantParams:
        """The parameters a manifest records; ManifestError names the first missing, unknown or wrong field."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown or set(names) - set(data):
            what = f"has an unknown field {unknown[0]!r}" if unknown else f"lacks {sorted(set(names) - set(data))[0]!r}"
            raise ManifestError(f"params {what}")
        for f in fields(cls):
            value, kind = data[f.name], type(f.default)
            if type(value) is not kind:  # exact: a bool is no int here, a float no int
                raise ManifestError(f"params.{f.name} must be a {kind.__name__}, not {value!r}")
        params = cls(**data)
        try:
            params.validate()
        except UsageError as err:
            raise ManifestError(f"params: {err}") from None
        return params


@dataclass(frozen=True)
class TierPlan:
    name: str
    layout: ExpertLayout
    layers: tuple[int, ...]


@dataclass(frozen=True)
class ShardPlan:
    tier: str
    file: str
    experts: tuple[tuple[int, int], ...]


@dataclass
class BuildResult:
    store_dir: Path
    manifest: dict
    reused_shards: int = 0
    written_shards: int = 0
    up_to_date: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def expert_key(tier: str, layer: int, expert: int) -> str:
    return f"{tier}.{layer}.{expert}"


# ------------------------------------------------------------------------------------------ where


# ------------------------------------------------------------------------------------------ plans


def sixteen_bit(source_dtype: torch.dtype) -> str:
    """The dtype of a store's 16-bit copies (the dense tier, expert biases): the checkpoint's when it is 16-bit,
    else bfloat16."""
    return dtype_name(source_dtype if source_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16)


def plan_tiers(experts: ExpertSet, params: QuantParams, source_dtype: torch.dtype) -> dict[str, TierPlan]:
    h, i, layers = experts.hidden, experts.intermediate, experts.layers
    dense = sixteen_bit(source_dtype)
    bias = dense if experts.bias else None  # biases stay at 16 bits in every tier, beside the weights
    tiers = {
        "hot": TierPlan("hot", ExpertLayout.quantized(h, i, params.hot_bits, params.hot_group_size, bias), layers),
        "cold": TierPlan("cold", ExpertLayout.quantized(h, i, params.cold_bits, params.cold_group_size, bias),
                         layers),
    }
    if params.dense_layers:
        tiers["dense"] = TierPlan("dense", ExpertLayout.dense(h, i, dense, bias), layers[: params.dense_layers])
    return tiers


def plan_shards(tiers: dict[str, TierPlan], num_experts: int, max_shard_bytes: int) -> list[ShardPlan]:
    shards = []
    for tier in tiers.values():
        experts = [(layer, e) for layer in tier.layers for e in range(num_experts)]
        per = max(1, max_shard_bytes // tier.layout.nbytes)
        chunks = [tuple(experts[k : k + per]) for k in range(0, len(experts), per)]
        for n, chunk in enumerate(chunks, 1):
            shards.append(ShardPlan(tier.name, f"{tier.name}-{n:05d}-of-{len(chunks):05d}.safetensors", chunk))
    return shards


def _fingerprint(params: QuantParams, sources: dict, tiers: dict[str, TierPlan], shards: list[ShardPlan]) -> str:
    decided_by = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "params": params.to_json(),
        "quantizer": hqq_settings(params.iters) if params.method == "hqq" else {},
        "sources": {name: rec["sha256"] for name, rec in sources.items()},
        "tiers": {t.name: {"layout": t.layout.to_json(), "layers": list(t.layers)} for t in tiers.values()},
        "shards": [[s.file, [list(x) for x in s.experts]] for s in shards],
    }
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ files


def _read_json(path: Path) -> dict | None:
    """A store's JSON file, or None when it is missing or unusable (then it is rebuilt)."""
    try:
        return read_json_object(path)
    except UnreadableJSON:
        return None


def _st_header(tier: str, keys: list[str], nbytes: int) -> bytes:
    header: dict = {"__metadata__": {"format": FORMAT, "format_version": str(FORMAT_VERSION), "tier": tier}}
    for n, key in enumerate(keys):
        header[key] = {"dtype": "U8", "shape": [nbytes], "data_offsets": [n * nbytes, (n + 1) * nbytes]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-(8 + len(text))) % ALIGN)  # data starts aligned; JSON allows trailing spaces
    return struct.pack("<Q", len(text)) + text


def _parse_st_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 << 20:
            raise ValueError("header length out of range")
        return json.loads(f.read(n)), 8 + n


def _shard_digests(path: Path) -> tuple[str, dict[str, str]]:
    """One read of a shard: the file's sha256 and each expert's, from the header's offsets."""
    header, start = _parse_st_header(path)
    header.pop("__metadata__", None)
    spans = sorted((start + v["data_offsets"][0], start + v["data_offsets"][1], k) for k, v in header.items())
    file_hash, experts = hashlib.sha256(), {}
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:

        def feed(n: int, *hashes) -> None:  # noqa: ANN002 - hashlib objects
            while n > 0:
                got = f.readinto(view[: min(n, len(buf))])
                if not got:
                    raise ValueError(f"{path.name} ends early")
                for h in hashes:
                    h.update(view[:got])
                n -= got

        pos = 0
        for begin, end, key in spans:
            if begin < pos:
                raise ValueError(f"{path.name}: experts overlap")
            feed(begin - pos, file_hash)
            expert_hash = hashlib.sha256()
            feed(end - begin, file_hash, expert_hash)
            experts[key], pos = expert_hash.hexdigest(), end
        while got := f.readinto(buf):  # whatever follows the last expert
            file_hash.update(view[:got])
    return file_hash.hexdigest(), experts


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


class _ShardWriter:
    """Writes one shard sequentially to `<file>.tmp`; each expert's bytes are hashed as they go out."""

    def __init__(self, store_dir: Path, shard: ShardPlan, layout: ExpertLayout):
        self.final = store_dir / shard.file
        self.tmp = store_dir / f"{shard.file}.tmp"
        self.layout = layout
        self.keys = [expert_key(shard.tier, layer, e) for layer, e in shard.experts]
        self.file = open(self.tmp, "wb")  # closed in finish() or abandon()
        self.file_hash = hashlib.sha256()
        self.experts: dict[str, str] = {}
        self.key: str | None = None
        try:
            self._put(memoryview(_st_header(shard.tier, self.keys, layout.nbytes)))
        except BaseException:  # not yet the caller's to abandon: leave no partial shard
            self.abandon()
            raise

    def _put(self, data: memoryview) -> None:
        self.file.write(data)
        self.file_hash.update(data)
        if self.key is not None:
            self.expert_hash.update(data)
            self.pos += len(data)

    def begin(self, key: str) -> None:
        if key != self.keys[len(self.experts)]:
            raise RuntimeError(f"shard {self.final.name}: expected {self.keys[len(self.experts)]}, got {key}")
        self.key, self.pos, self.expert_hash = key, 0, hashlib.sha256()

    def write_at(self, offset: int, t: torch.Tensor) -> None:
        if offset < self.pos:
            raise RuntimeError(f"write at {offset} behind position {self.pos}")
        if offset > self.pos:
            self._put(memoryview(bytes(offset - self.pos)))
        self._put(_tensor_bytes(t))

    def end(self) -> bool:
        """Close the current expert; True when the shard is full."""
        self.write_at(self.layout.nbytes, torch.empty(0, dtype=torch.uint8))
        if self.pos != self.layout.nbytes:
            raise RuntimeError(f"expert {self.key} came out {self.pos} bytes, its layout says {self.layout.nbytes}")
        self.experts[self.key] = self.expert_hash.hexdigest()
        self.key = None
        return len(self.experts) == len(self.keys)

    def finish(self) -> dict:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.final)
        except BaseException:  # a full disk at the last flush, Ctrl-C: no partial shard is left
            self.abandon()
            raise
        fsync_dir(self.final.parent)
        return {"sha256": self.file_hash.hexdigest(), "size": self.final.stat().st_size, "experts": self.experts}

    def abandon(self) -> None:
        """Remove the partial shard. Closing flushes, which fails again on a full disk: the unlink still runs."""
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)


def _being_written(store_dir: Path) -> bool:
    """Whether a `fate quantize` holds the store's lock right now (probed, not held)."""
    return lock_note(store_dir / LOCK) is not None


def _busy(store_dir: Path) -> Busy:
    return Busy(f"another `fate quantize` is writing {store_dir}; wait for it to finish")


@contextlib.contextmanager
def store_lock(store_dir: Path) -> Iterator[None]:
    store_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(store_dir / LOCK, lambda _note: _busy(store_dir)):
        yield


# ------------------------------------------------------------------------------------------ build


def _hash_sources(model_dir: Path, known: dict, progress: Progress | None) -> dict:
    """sha256, size and mtime of each source file; a file whose size and mtime match `known` is not re-read."""
    names = source_files(model_dir)
    records, todo = {}, []
    for name in names:
        path = model_dir / name
        if not path.is_file():
            raise ModelNotFound(f"{path} is missing; run `fate pull` again to fetch it")
        st, old = path.stat(), known.get(name) or {}
        if old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and old.get("sha256"):
            records[name] = dict(old)
        else:
            todo.append(name)
    total = sum((model_dir / n).stat().st_size for n in todo)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("hash", done, total)

    for name in todo:
        records[name] = file_record(model_dir / name, advance)
    return {name: records[name] for name in names}


def _source_info(model_dir: Path, files: dict, origin: dict) -> dict:
    return {"path": str(model_dir.resolve()), "repo": origin.get("repo"), "revision": origin.get("revision"),
            "files": files}


def _reusable(store_dir: Path, journal: dict | None, fingerprint: str, shards: list[ShardPlan]) -> dict:
    """The finished shards a rebuild keeps: the file's sha256 matches the journal's and its header lists the
    planned experts. Their per-expert hashes are taken from the bytes, not the journal, which may be wrong."""
    if not journal or journal.get("fingerprint") != fingerprint:
        return {}
    done = {}
    for shard in shards:
        rec = journal["shards"].get(shard.file)
        path = store_dir / shard.file
        if not rec or not path.is_file() or path.stat().st_size != rec["size"]:
            continue
        try:
            digest, experts = _shard_digests(path)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            continue
        keys = [expert_key(shard.tier, layer, e) for layer, e in shard.experts]
        if digest == rec["sha256"] and list(experts) == keys:
            done[shard.file] = {"sha256": digest, "size": rec["size"], "experts": experts}
    return done


def _clean(store_dir: Path, keep: set[str]) -> None:
    for path in store_dir.iterdir():
        if path.name in keep or path.name == LOCK:
            continue
        if path.is_file() and (path.suffix in (".safetensors", ".tmp", ".json")):
            path.unlink()


def _quantize(w: torch.Tensor, bits: int, group: int, params: QuantParams) -> PackedMatrix:
    p = quantize_matrix(w.to(params.device), bits, group, params.method, params.iters)
    return p.map(torch.Tensor.cpu)


class _ExpertBuild:
    """One expert of one tier, streamed into a shard matrix by matrix (gate, up, down)."""

    def __init__(self, writer: _ShardWriter, tier: TierPlan, params: QuantParams):
        self.w, self.tier, self.params = writer, tier, params
        lay = tier.layout
        self.bits = lay.bits
        self.group = lay.group_size
        self.gate: PackedMatrix | None = None

    def add(self, which: str, w: torch.Tensor) -> None:
        lay = self.tier.layout
        if which.endswith("_bias"):  # after the weights: the bias segments come last
            seg = lay.segment("down.bias" if which == "down_bias" else "gate_up.bias")
            dt = DTYPES[lay.bias]
            self.w.write_at(seg.offset + (w.numel() * dt.itemsize if which == "up_bias" else 0), w.to(dt))
            return
        if lay.kind == "dense":
            dt = getattr(torch, lay.dtype)
            offset = {"gate": 0, "up": w.numel() * dt.itemsize, "down": 0}[which]
            seg = lay.segment("down" if which == "down" else "gate_up")
            self.w.write_at(seg.offset + offset, w.to(dt))
            return
        p = _quantize(w, self.bits, self.group, self.params)
        if which == "gate":
            self.w.write_at(lay.segment("gate_up.codes").offset, p.codes)
            self.gate = p  # its scale and zero go out after up's codes
        elif which == "up":
            self.w.write_at(lay.segment("gate_up.codes").offset + self.gate.codes.nbytes, p.codes)
            for part in ("scale", "zero"):
                seg = lay.segment(f"gate_up.{part}")
                self.w.write_at(seg.offset, getattr(self.gate, part))
                self.w.write_at(seg.offset + getattr(self.gate, part).nbytes, getattr(p, part))
            self.gate = None
        else:
            for part in ("codes", "scale", "zero"):
                self.w.write_at(lay.segment(f"down.{part}").offset, getattr(p, part))


def _check_source(experts: ExpertSet, reader: SourceReader) -> torch.dtype:
    dtype = None
    for layer in experts.layers:
        for e in range(experts.num_experts):
            biases = zip(experts.bias_names(layer, e) or (), experts.bias_shapes)
            for n, (name, shape) in enumerate([*zip(experts.names(layer, e), experts.shapes), *biases]):
                if name not in reader:
                    raise BadModel(f"{reader.dir}: tensor {name} is missing from the checkpoint; re-download the model")
                if reader.shape(name) != shape:
                    raise BadModel(
                        f"{reader.dir}: tensor {name} has shape {list(reader.shape(name))} but config.json implies "
                        f"{list(shape)}; the weights do not match the config"
                    )
                if not reader.dtype(name).is_floating_point:
                    raise BadModel(f"{reader.dir}: tensor {name} is {reader.dtype(name)}, not a float; cannot quantize")
                if n < 3:  # the weights' dtype decides the 16-bit copies'
                    dtype = dtype or reader.dtype(name)
    return dtype or torch.bfloat16


def build_store(
    model_dir: Path, store_dir: Path, experts: ExpertSet, params: QuantParams | None = None,
    progress: Progress | None = None, origin: dict | None = None,
) -> BuildResult:
    """Build (or finish, or confirm) the tier store of `experts` of the checkpoint in `model_dir` at `store_dir`.
    origin: where the checkpoint came from ({"repo", "revision"} of a pull), recorded in the manifest."""
    params = params or QuantParams()
    params.validate()
    t0 = time.perf_counter()
    reader = SourceReader(model_dir)
    source_dtype = _check_source(experts, reader)
    with store_lock(store_dir):
        # a manifest or journal that is not well formed is worth nothing: rebuild as if it were absent
        existing = _read_json(store_dir / MANIFEST)
        existing = existing if is_valid(existing, MANIFEST_SCHEMA) else None
        journal = _read_json(store_dir / PROGRESS)
        journal = journal if is_valid(journal, JOURNAL_SCHEMA) else None
        known = ((existing or {}).get("source") or {}).get("files") or (journal or {}).get("sources") or {}
        sources = _hash_sources(model_dir, known, progress)
        tiers = plan_tiers(experts, params, source_dtype)
        shards = plan_shards(tiers, experts.num_experts, params.max_shard_bytes)
        fingerprint = _fingerprint(params, sources, tiers, shards)

        if existing and existing.get("complete") and existing.get("fingerprint") == fingerprint:
            try:
                check_store(store_dir, model_dir, deep=True)
                return BuildResult(store_dir, existing, up_to_date=True, seconds=time.perf_counter() - t0)
            except (BadModel, ModelNotFound):
                pass  # damaged: rebuild below, reusing what still checks out
        (store_dir / MANIFEST).unlink(missing_ok=True)
        if existing and existing.get("fingerprint") == fingerprint and not journal:
            journal = _journal_from_manifest(existing)
        done = _reusable(store_dir, journal, fingerprint, shards)
        reused = len(done)
        _clean(store_dir, keep=set(done))
        journal = {"fingerprint": fingerprint, "sources": sources, "shards": dict(done)}
        write_json_atomic(store_dir / PROGRESS, journal)

        pending = {}
        for shard in shards:
            if shard.file not in done:
                for layer, e in shard.experts:
                    pending[(shard.tier, layer, e)] = shard
        total = len({(layer, e) for _, layer, e in pending})
        writers: dict[str, _ShardWriter] = {}
        count = 0
        if progress:
            progress("quantize", 0, total)
        try:
            for layer in experts.layers:
                for e in range(experts.num_experts):
                    todo = [t for t in tiers.values() if (t.name, layer, e) in pending]
                    if not todo:
                        continue
                    builds = []
                    for tier in todo:
                        if tier.name not in writers:
                            writers[tier.name] = _ShardWriter(store_dir, pending[(tier.name, layer, e)], tier.layout)
                        writers[tier.name].begin(expert_key(tier.name, layer, e))
                        builds.append(_ExpertBuild(writers[tier.name], tier, params))
                    names = [*zip(("gate", "up", "down"), experts.names(layer, e)),
                             *zip(("gate_bias", "up_bias", "down_bias"), experts.bias_names(layer, e) or ())]
                    for which, name in names:
                        w = reader.get(name)
                        if not torch.isfinite(w).all():  # HQQ would turn them into a store of garbage
                            raise BadModel(
                                f"{reader.dir}: tensor {name} holds NaN or infinite values; the checkpoint is "
                                "damaged, re-download it"
                            )
                        for b in builds:
                            b.add(which, w)
                        del w
                    for tier in todo:
                        if writers[tier.name].end():
                            writer = writers.pop(tier.name)
                            journal["shards"][writer.final.name] = writer.finish()
                            write_json_atomic(store_dir / PROGRESS, journal)
                    count += 1
                    if progress:
                        progress("quantize", count, total)
        finally:
            for writer in writers.values():
                writer.abandon()

        manifest = _manifest(experts, params, source_dtype, _source_info(model_dir, sources, origin or {}), tiers,
                             shards, journal, fingerprint)
        write_json_atomic(store_dir / MANIFEST, manifest)
        (store_dir / PROGRESS).unlink(missing_ok=True)
        return BuildResult(
            store_dir, manifest, reused_shards=reused, written_shards=len(shards) - reused,
            seconds=time.perf_counter() - t0,
        )


def _journal_from_manifest(manifest: dict) -> dict:
    """A complete store that no longer checks out: its files and hashes, so that intact shards are kept."""
    shards = {f: {"sha256": r["sha256"], "size": r["size"], "experts": {}} for f, r in manifest["files"].items()}
    for key, rec in manifest["experts"].items():
        if rec["file"] in shards:
            shards[rec["file"]]["experts"][key] = rec["sha256"]
    return {"fingerprint": manifest["fingerprint"], "sources": manifest["source"]["files"], "shards": shards}


def _manifest(expert_set, params, source_dtype, source, tiers, shards, journal, fingerprint) -> dict:
    records = journal["shards"]
    experts = {}
    for shard in shards:
        for key, digest in records[shard.file]["experts"].items():
            experts[key] = {"file": shard.file, "sha256": digest}
    quantizer = {"method": params.method, "device": params.device, "scale_dtype": "float16",
                 "dequantize": "W = (q - zero) * scale, per row, groups of group_size input columns"}
    if params.method == "hqq":
        quantizer |= {"hqq_version": hqq_version(), **hqq_settings(params.iters)}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": True,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "fingerprint": fingerprint,
        "model": {
            "family": expert_set.family,
            "hidden_size": expert_set.hidden,
            "moe_intermediate_size": expert_set.intermediate,
            "num_experts": expert_set.num_experts,
            "moe_layers": list(expert_set.layers),
            "source_dtype": dtype_name(source_dtype),
            **({"expert_bias": True} if expert_set.bias else {}),
        },
        "source": source,
        "params": params.to_json(),
        "quantizer": quantizer,
        "tiers": _tiers_json(tiers, shards),
        "files": {s.file: {"sha256": records[s.file]["sha256"], "size": records[s.file]["size"]} for s in shards},
        "experts": experts,
    }


def _tiers_json(tiers: dict[str, TierPlan], shards: list[ShardPlan]) -> dict:
    return {
        t.name: {
            "kind": t.layout.kind,
            "bits": t.layout.bits,
            "group_size": t.layout.group_size,
            "dtype": t.layout.dtype,
            "layers": list(t.layers),
            "expert_bytes": t.layout.nbytes,
            "layout": t.layout.to_json(),
            "files": [s.file for s in shards if s.tier == t.name],
        }
        for t in tiers.values()
    }


def _check_manifest(manifest: dict) -> None:
    """Every field well formed (quant.manifest), and the derived ones equal to what a build with the recorded
    parameters, shape and sources would write: tiers, layouts, shard plan, expert placement, fingerprint."""
    check_schema(manifest, MANIFEST_SCHEMA)
    params = QuantParams.from_json(manifest["params"])
    model = manifest["model"]
    if model["source_dtype"] not in DTYPES:
        raise ManifestError(f"model.source_dtype {model['source_dtype']!r} is not a dtype fate writes")
    layers = model["moe_layers"]
    if not layers or layers != sorted(set(layers)):
        raise ManifestError("model.moe_layers must list layer numbers in increasing order")
    # counted before planning, so that a damaged count cannot make the plan enumerate billions of experts
    planned = model["num_experts"] * (2 * len(layers) + min(params.dense_layers, len(layers)))
    if len(manifest["experts"]) != planned:
        raise ManifestError(f"experts lists {len(manifest['experts'])} experts, the recorded shape implies {planned}")
    # the recorded shape, planned as a build plans it (fused gpt_oss experts are the ones with biases)
    recorded = ExpertSet(model["family"], tuple(layers), model["num_experts"], model["hidden_size"],
                         model["moe_intermediate_size"], layout="gpt_oss" if model.get("expert_bias") else "separate")
    tiers = plan_tiers(recorded, params, DTYPES[model["source_dtype"]])
    shards = plan_shards(tiers, recorded.num_experts, params.max_shard_bytes)
    expected = {
        "fingerprint": _fingerprint(params, manifest["source"]["files"], tiers, shards),
        "tiers": _tiers_json(tiers, shards),
        "files": sorted(s.file for s in shards),
        "experts": {expert_key(s.tier, layer, e): s.file for s in shards for layer, e in s.experts},
    }
    found = {
        "fingerprint": manifest["fingerprint"],
        "tiers": manifest["tiers"],
        "files": sorted(manifest["files"]),
        "experts": {key: rec["file"] for key, rec in manifest["experts"].items()},
    }
    # the large sections compare at C speed (strings only); the path of a difference is looked for only then
    big_equal = found["files"] == expected["files"] and found["experts"] == expected["experts"]
    diff = first_difference({k: found[k] for k in ("fingerprint", "tiers")},
                            {k: expected[k] for k in ("fingerprint", "tiers")})
    diff = diff or (None if big_equal else first_difference(found, expected))
    if diff:
        raise ManifestError(f"{diff} disagrees with the recorded parameters and shape")


# ------------------------------------------------------------------------------------------ check & read


def _rebuild(name: str) -> str:
    return f"run `fate quantize {name}` to rebuild it"


def check_store(store_dir: Path, model_dir: Path, deep: bool = True, name: str | None = None) -> dict:
    """The store's manifest, once the store checks out; else the first problem as a FateError."""
    name = name or str(model_dir)
    manifest_path = store_dir / MANIFEST
    if not manifest_path.is_file():
        if _being_written(store_dir):  # not damaged: a build is under way
            raise _busy(store_dir)
        leftovers = store_dir.is_dir() and any(
            p.suffix in (".safetensors", ".tmp") or p.name == PROGRESS for p in store_dir.iterdir()
        )
        if leftovers:
            raise BadModel(
                f"the tier store at {store_dir} is incomplete (an interrupted `fate quantize`?); "
                f"run `fate quantize {name}` to finish it"
            )
        raise ModelNotFound(f"no tier store for {name} (looked in {store_dir}); run `fate quantize {name}` first")
    manifest = _read_json(manifest_path)
    if manifest is None or manifest.get("format") != FORMAT:
        raise BadModel(f"{manifest_path} is damaged (not a fate tier manifest); {_rebuild(name)}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BadModel(
            f"the tier store at {store_dir} has format version {manifest.get('format_version')}, this fate reads "
            f"{FORMAT_VERSION}; {_rebuild(name)}"
        )
    if manifest.get("complete") is not True:
        raise BadModel(f"the tier store at {store_dir} is incomplete; run `fate quantize {name}` to finish it")
    try:
        _check_manifest(manifest)
    except ManifestError as err:
        raise BadModel(f"{manifest_path} is damaged ({err}); {_rebuild(name)}") from None
    _check_sources(manifest, model_dir, store_dir, name)
    _check_files(manifest, store_dir, name, deep)
    return manifest


def _check_sources(manifest: dict, model_dir: Path, store_dir: Path, name: str) -> None:
    recorded = manifest["source"]["files"]
    current = source_files(model_dir)
    if sorted(current) != sorted(recorded):
        raise BadModel(
            f"the tier store at {store_dir} is stale: the checkpoint's files are now {', '.join(current)}, "
            f"it was built from {', '.join(recorded)}; {_rebuild(name)}"
        )
    for file, rec in recorded.items():
        path = model_dir / file
        if not path.is_file():
            raise ModelNotFound(f"{path} is missing; run `fate pull` again to fetch it")
        st = path.stat()
        if st.st_size == rec["size"] and st.st_mtime_ns == rec["mtime_ns"]:
            continue
        if st.st_size != rec["size"] or file_record(path)["sha256"] != rec["sha256"]:
            raise BadModel(
                f"the tier store at {store_dir} is stale: {file} changed since it was quantized; {_rebuild(name)}"
            )


def _check_files(manifest: dict, store_dir: Path, name: str, deep: bool) -> None:
    tiers = manifest["tiers"]
    by_file: dict[str, list[str]] = {}
    for key, rec in manifest["experts"].items():
        by_file.setdefault(rec["file"], []).append(key)
    for tier_name, tier in tiers.items():
        ExpertLayout.from_json(tier["layout"])
        for file in tier["files"]:
            rec = manifest["files"][file]
            path = store_dir / file
            if not path.is_file():
                raise BadModel(f"the tier store at {store_dir} is damaged: {file} is missing; {_rebuild(name)}")
            size = path.stat().st_size
            if size != rec["size"]:
                raise BadModel(
                    f"the tier store at {store_dir} is damaged: {file} is {size} bytes, the manifest says "
                    f"{rec['size']}; {_rebuild(name)}"
                )
            try:
                header, start = _parse_st_header(path)
            except (OSError, ValueError, struct.error):
                raise BadModel(
                    f"the tier store at {store_dir} is damaged: {file} has an unreadable header; {_rebuild(name)}"
                ) from None
            keys = by_file.get(file, [])
            nbytes = tier["expert_bytes"]
            expected = {k: {"dtype": "U8", "shape": [nbytes], "data_offsets": [n * nbytes, (n + 1) * nbytes]}
                        for n, k in enumerate(keys)}
            header.pop("__metadata__", None)
            if header != expected or start + len(keys) * nbytes != size or not all(
                k.startswith(f"{tier_name}.") for k in keys
            ):
                raise BadModel(
                    f"the tier store at {store_dir} is damaged: {file} does not hold the experts the manifest "
                    f"lists; {_rebuild(name)}"
                )
            if not deep:
                continue
            digest, experts = _shard_digests(path)
            if digest != rec["sha256"]:
                raise BadModel(
                    f"the tier store at {store_dir} is damaged: {file} does not match its sha256 in the manifest; "
                    f"{_rebuild(name)}"
                )
            for key in keys:  # what TierStore.read checks as it reads each expert
                if experts[key] != manifest["experts"][key]["sha256"]:
                    raise BadModel(
                        f"the tier store at {store_dir} is damaged: expert {key} in {file} does not match its "
                        f"sha256 in the manifest; {_rebuild(name)}"
                    )


@dataclass(frozen=True)
class TierInfo:
    name: str
    layout: ExpertLayout
    layers: tuple[int, ...]

    def describe(self) -> str:
        lay = self.layout
        return f"INT{lay.bits} g{lay.group_size}" if lay.kind == "quantized" else f"{lay.dtype}"


class TierStore:
    """A checked store, read one expert buffer at a time (plain reads, each checked against its sha256)."""

    def __init__(self, store_dir: Path, manifest: dict, name: str):
        self.dir, self.manifest, self.name = store_dir, manifest, name
        self.tiers = {
            t: TierInfo(t, ExpertLayout.from_json(d["layout"]), tuple(d["layers"]))
            for t, d in manifest["tiers"].items()
        }
        self._offsets: dict[str, dict[str, int]] = {}

    @classmethod
    def open(cls, store_dir: Path, model_dir: Path, name: str | None = None, deep: bool = False) -> TierStore:
        name = name or str(model_dir)
        return cls(store_dir, check_store(store_dir, model_dir, deep=deep, name=name), name)

    def read(self, tier: str, layer: int, expert: int) -> torch.Tensor:
        key = expert_key(tier, layer, expert)
        rec = self.manifest["experts"].get(key)
        if rec is None:
            raise KeyError(f"the tier store has no {key}")
        file = rec["file"]
        if file not in self._offsets:
            header, start = _parse_st_header(self.dir / file)
            header.pop("__metadata__", None)
            self._offsets[file] = {k: start + v["data_offsets"][0] for k, v in header.items()}
        nbytes = self.tiers[tier].layout.nbytes
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(self.dir / file, "rb", buffering=0) as f:
            f.seek(self._offsets[file][key])
            got = f.readinto(memoryview(buf.numpy()))
        if got != nbytes or hashlib.sha256(memoryview(buf.numpy())).hexdigest() != rec["sha256"]:
            raise BadModel(
                f"the tier store at {self.dir} is damaged: expert {key} in {file} does not match its sha256; "
                f"{_rebuild(self.name)}"
            )
        return buf
