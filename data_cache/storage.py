"""On-disk layout of a latent cache: Arrow IPC shards, per-rank journals and one manifest.

A cache directory holds::

    manifest.json                      merged, authoritative list of committed shards (atomic writes)
    journal/rank-00003.json            shards committed by one rank since the last merge (atomic writes)
    shards/shard-<start>-<end>-r<rank>.arrow
    rewards/<reward>/<shard stem>.arrow   columns added later by ``add-reward`` (one per shard)
    config.yaml, log.txt               the last ``lrm cache build`` command's config and the build log
    add-reward/<reward>/{config.yaml,log.txt}   the same for each ``lrm cache add-reward``
    rejects.jsonl                      every rejected record or missing reward, rebuilt from the shards

Commit protocol (crash safe at any point, SIGKILL included):
  1. a shard is serialised in memory, written to ``.<name>.tmp``, fsynced and renamed to its final name;
  2. the rank's journal (all shards it has committed) is rewritten atomically;
  3. rank 0 merges the journals into ``manifest.json`` atomically.
A crash between 1 and 2 leaves an *orphan* shard: on resume it is adopted if it reads back whole (its own
schema metadata says which records it holds) and deleted otherwise; temp files are deleted. Records are a
pure function of their source index, so anything not committed is regenerated identically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lrm.io import atomic_write_bytes, file_sha256, fsync_dir, read_json, write_json

FORMAT = "lrm-latent-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
JOURNAL_DIR = "journal"
REWARD_DIR = "rewards"
ADD_REWARD_RUNS = "add-reward"  # config.yaml + log.txt of each `lrm cache add-reward` run
REJECTS = "rejects.jsonl"
_SHARD_RE = re.compile(r"^shard-(\d{10})-(\d{10})-r(\d{3})\.arrow$")

ARROW_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
NP_DTYPES = {"float16": np.float16, "float32": np.float32}


class CacheError(RuntimeError):
    """A cache directory that is missing, damaged or used inconsistently."""


class CacheLockedError(CacheError):
    """Another process is writing the cache (see ``data_cache.lock``)."""


class CacheTooSmallError(CacheError, ValueError):
    """A cache (or a view of it) with too few records for what was asked of it (training needs two prompts)."""


class TextEncoderMismatchError(ValueError):
    """Text embeddings from another text encoder than the one a cache was built with."""


def repair_hint(root: str | Path) -> str:
    """The one fix named by every damage message."""
    return f"rebuild the damaged or missing shards with `lrm cache repair {root}`"


def reward_column(name: str) -> str:
    return f"reward/{name}"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def shard_name(start: int, end: int, rank: int) -> str:
    return f"shard-{start:010d}-{end:010d}-r{rank:03d}.arrow"


def parse_shard_name(name: str) -> tuple[int, int, int] | None:
    m = _SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def content_hash(*arrays: np.ndarray, text: str = "") -> str:
    """blake2b-128 of the record's source content (quantised pixels or latents) and its prompt."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    h.update(text.encode())
    return h.hexdigest()


# ---- schema and serialisation -----------------------------------------------------------------------
def _fixed_list(flat: np.ndarray, size: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), size)


def make_schema(latent_shape: tuple[int, ...], latent_dtype: str, text_shape: tuple[int, int], text_dtype: str,
                rewards: list[str], pooled_dim: int | None = None) -> pa.Schema:
    """``pooled_dim``: width of ``text_pooled`` (default the token width D; FLUX / SD3 / HunyuanVideo differ)."""
    L, D = text_shape
    fields = [
        pa.field("index", pa.int64()),
        pa.field("source_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("content_hash", pa.string()),
        pa.field("latent", pa.list_(ARROW_DTYPES[latent_dtype], int(np.prod(latent_shape)))),
        pa.field("text_tokens", pa.list_(ARROW_DTYPES[text_dtype], L * D)),
        pa.field("text_mask", pa.list_(pa.uint8(), L)),
        pa.field("text_pooled", pa.list_(ARROW_DTYPES[text_dtype], int(pooled_dim or D))),
    ]
    fields += [pa.field(reward_column(r), pa.float32()) for r in rewards]
    return pa.schema(fields)


def records_to_table(cols: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """``cols``: numpy arrays (N, ...) for tensor columns, lists for strings; built in ``schema`` order."""
    arrays = []
    for field in schema:
        v = cols[field.name]
        if pa.types.is_fixed_size_list(field.type):
            n = len(v)
            np_dtype = field.type.value_type.to_pandas_dtype()
            flat = np.asarray(v).reshape(n, field.type.list_size).astype(np_dtype, copy=False)
            flat = np.ascontiguousarray(flat).reshape(-1)
            arrays.append(_fixed_list(flat, field.type.list_size))
        elif field.type == pa.string():
            arrays.append(pa.array(list(v), pa.string()))
        else:
            arrays.append(pa.array(np.asarray(v), field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def table_to_bytes(table: pa.Table, metadata: dict[str, Any]) -> bytes:
    table = table.replace_schema_metadata({"lrm_shard": json.dumps(metadata, sort_keys=True)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def write_shard_file(path: Path, table: pa.Table, metadata: dict[str, Any]) -> dict[str, Any]:
    """Atomically write ``table`` (temp + fsync + rename); returns ``{"bytes", "sha256"}``."""
    data = table_to_bytes(table, metadata)
    atomic_write_bytes(path, data)
    fsync_dir(path.parent)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def open_table(path: Path, memory_map: bool = True) -> pa.Table:
    """Read a shard; memory-mapped (zero copy) by default."""
    source = pa.memory_map(str(path), "r") if memory_map else pa.OSFile(str(path), "rb")
    return pa.ipc.open_file(source).read_all()


def shard_metadata(table: pa.Table | pa.Schema) -> dict[str, Any]:
    meta = (table if isinstance(table, pa.Schema) else table.schema).metadata or {}
    raw = meta.get(b"lrm_shard")
    if raw is None:
        raise CacheError("shard has no lrm_shard metadata")
    return json.loads(raw)


def fixed_list_numpy(col: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-copy numpy view (N, *shape) of a fixed-size-list column (copies only if it has several chunks)."""
    if isinstance(col, pa.ChunkedArray):
        chunks = [fixed_list_numpy(c, shape) for c in col.chunks]
        if not chunks:
            return np.zeros((0,) + tuple(shape))
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    values = col.values
    if col.offset:
        size = col.type.list_size
        values = values.slice(col.offset * size, len(col) * size)
    return values.to_numpy(zero_copy_only=True).reshape((len(col),) + tuple(shape))


# ---- manifest and journals --------------------------------------------------------------------------
def manifest_path(root: Path) -> Path:
    return Path(root) / MANIFEST


def read_manifest(root: Path) -> dict[str, Any]:
    p = manifest_path(root)
    if not p.exists():
        raise CacheError(
            f"{root} is not a latent cache: {p.name} is missing. Build one with `lrm cache build --out_dir {root}`."
        )
    m = read_json(p)
    if m.get("format") != FORMAT:
        raise CacheError(f"{p} is not an {FORMAT} manifest (format={m.get('format')!r}).")
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise CacheError(f"{p} has format_version {m['format_version']}; this toolkit reads up to {FORMAT_VERSION}. "
                         "Upgrade the toolkit.")
    return m


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_json(manifest_path(root), manifest)


def update_manifest(root: Path, fn) -> dict[str, Any]:
    """Read-modify-write of ``manifest.json`` under the manifest mutex: ``fn(manifest)`` edits the fresh manifest
    in place (or returns a new one); concurrent writers (add-reward of other rewards) never lose each other's
    updates. Returns the manifest written."""
    from data_cache.lock import manifest_mutex

    with manifest_mutex(root):
        m = read_manifest(root)
        out = fn(m)
        m = m if out is None else out
        write_manifest(root, m)
    return m


def journal_path(root: Path, rank: int) -> Path:
    return Path(root) / JOURNAL_DIR / f"rank-{rank:05d}.json"


def read_journals(root: Path) -> list[dict[str, Any]]:
    out = []
    d = Path(root) / JOURNAL_DIR
    if d.exists():
        for p in sorted(d.glob("rank-*.json")):
            out.extend(read_json(p).get("shards", []))
    return out


def merge_shard_entries(*lists: list[dict[str, Any]], root: Path | None = None) -> list[dict[str, Any]]:
    """Union of shard entries by file name, sorted by start index; overlapping ranges are an error."""
    by_file: dict[str, dict[str, Any]] = {}
    for lst in lists:
        for e in lst:
            by_file[e["file"]] = e
    entries = sorted(by_file.values(), key=lambda e: (e["start"], e["end"]))
    for a, b in zip(entries, entries[1:]):
        if b["start"] < a["end"]:
            fix = repair_hint(root) if root is not None else "`lrm cache repair DIR` rebuilds the range"
            raise CacheError(f"shards {a['file']} and {b['file']} hold overlapping record ranges; the cache is "
                             f"inconsistent: {fix}")
    return entries


def covered_ranges(entries: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(e["start"], e["end"]) for e in sorted(entries, key=lambda e: e["start"])]


def missing_units(entries: list[dict[str, Any]], num_records: int, shard_size: int) -> list[tuple[int, int]]:
    """Index ranges of [0, num_records) not yet covered by a shard, split at multiples of ``shard_size``."""
    covered = np.zeros(num_records, dtype=bool)
    for s, e in covered_ranges(entries):
        covered[s:min(e, num_records)] = True
    units = []
    i = 0
    while i < num_records:
        if covered[i]:
            i += 1
            continue
        j = i
        limit = min(num_records, (i // shard_size + 1) * shard_size)
        while j < limit and not covered[j]:
            j += 1
        units.append((i, j))
        i = j
    return units


def summarize_counts(manifest: dict[str, Any]) -> dict[str, Any]:
    """Totals over committed shards: records, rejects per reason, missing values per reward."""
    records = 0
    rejects: dict[str, int] = {}
    missing: dict[str, int] = {}
    for e in manifest.get("shards", []):
        records += e["num_records"]
        for k, v in e.get("rejects", {}).items():
            rejects[k] = rejects.get(k, 0) + v
        for k, v in e.get("missing_rewards", {}).items():
            missing[k] = missing.get(k, 0) + v
    for name, entries in manifest.get("sidecars", {}).items():
        missing[name] = sum(e.get("missing", 0) for e in entries)
    return {"records": records, "rejects": rejects, "rejected": sum(rejects.values()), "missing_rewards": missing}


def rebuild_rejects_log(root: Path, manifest: dict[str, Any]) -> None:
    """``rejects.jsonl`` from the rejects stored in each committed shard (and each reward sidecar)."""
    lines = []
    for e in manifest.get("shards", []):
        for r in e.get("reject_log", []):
            lines.append(json.dumps(r, sort_keys=True))
    for name, entries in manifest.get("sidecars", {}).items():
        for e in entries:
            for r in e.get("reject_log", []):
                lines.append(json.dumps(r, sort_keys=True))
    atomic_write_bytes(Path(root) / REJECTS, ("\n".join(lines) + ("\n" if lines else "")).encode())


# ---- manifest validation and shard checks ----------------------------------------------------------------------
def sidecar_file(name: str, shard_file: str) -> str:
    """Where add-reward writes the scores of reward ``name`` for one shard (relative to the cache directory)."""
    return f"{REWARD_DIR}/{safe_name(name)}/{Path(shard_file).stem}.arrow"


def _outside(rel: Any) -> bool:
    p = str(rel)
    return os.path.isabs(p) or p.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", p)


def validate_manifest(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Structural problems of a manifest (no file is read): every path a plain name inside the cache directory
    (a ``../`` or absolute path is refused), shard names matching their ranges, ranges non-overlapping and, once the
    build is complete, covering every planned index (a removed entry), counts matching the shards, reward files
    belonging to listed shards."""
    problems: list[str] = []
    entries = manifest.get("shards", [])
    good = []
    for e in entries:
        f = e.get("file")
        if not isinstance(f, str) or _outside(f) or Path(f).name != f:
            problems.append(f"manifest entry {f!r} is not a file name inside {Path(root) / SHARD_DIR} (a ../ or "
                            "absolute path is refused)")
            continue
        try:
            start, end, n = int(e["start"]), int(e["end"]), int(e["num_records"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"manifest entry {f}: start / end / num_records missing or not integers")
            continue
        parsed = parse_shard_name(f)
        if parsed is None or parsed[:2] != (start, end):
            problems.append(f"manifest entry {f}: the name does not match its range [{start}, {end}) "
                            "(shard-<start>-<end>-r<rank>.arrow)")
            continue
        if not 0 <= start < end or not 0 <= n <= end - start:
            problems.append(f"manifest entry {f}: range [{start}, {end}) with {n} records is impossible")
            continue
        good.append(e)
    ordered = sorted(good, key=lambda e: (e["start"], e["end"]))
    for a, b in zip(ordered, ordered[1:]):
        if b["start"] < a["end"]:
            problems.append(f"shards {a['file']} and {b['file']} hold overlapping record ranges "
                            f"[{a['start']}, {a['end']}) and [{b['start']}, {b['end']})")
    planned = manifest.get("num_records_planned") or 0
    if manifest.get("complete") and len(good) == len(entries):
        gaps = missing_units(good, planned, max(1, int(manifest.get("shard_size") or 1)))
        if gaps:
            shown = ", ".join(f"[{a}, {b})" for a, b in gaps[:3]) + (" ..." if len(gaps) > 3 else "")
            problems.append(f"records {shown} are in no shard although the build is complete (an entry was removed "
                            "from manifest.json?)")
    counted = (manifest.get("counts") or {}).get("records")
    total = sum(int(e.get("num_records", 0) or 0) for e in good)
    if counted is not None and len(good) == len(entries) and counted != total:
        problems.append(f"manifest counts {counted} records, its shards hold {total} (an entry was removed or "
                        "edited?)")
    listed = {e.get("file") for e in good}
    for name, sides in (manifest.get("sidecars") or {}).items():
        seen = set()
        for e in sides:
            f, shard = e.get("file"), e.get("shard")
            if not isinstance(f, str) or f != sidecar_file(name, str(shard)):
                problems.append(f"reward file entry {f!r} ({name}) is not {sidecar_file(name, str(shard))!r}, the "
                                "only place its scores may be (a ../ or absolute path is refused)")
            elif shard not in listed:
                problems.append(f"reward file {f} ({name}) belongs to shard {shard}, which is not in the manifest")
            elif shard in seen:
                problems.append(f"reward {name} lists shard {shard} twice")
            seen.add(shard)
    return problems


def check_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Raise a one-line ``CacheError`` on the first problem ``validate_manifest`` finds."""
    problems = validate_manifest(root, manifest)
    if problems:
        more = f" (and {len(problems) - 1} more problems: `lrm cache verify {root}` lists them)" \
            if len(problems) > 1 else ""
        raise CacheError(f"cache {root}: {problems[0]}{more}; {repair_hint(root)}")


def size_problem(path: Path, entry: dict[str, Any] | None) -> str | None:
    """The fast check readers run: the file exists and has the size the manifest recorded (None = sound)."""
    if not path.exists():
        return f"{path} is missing"
    if entry is not None and entry.get("bytes") is not None:
        size = path.stat().st_size
        if size != entry["bytes"]:
            return (f"{path} is damaged: {size} bytes on disk, {entry['bytes']} in the manifest (truncated or "
                    "overwritten)")
    return None


def open_checked(root: Path, path: Path, entry: dict[str, Any] | None, memory_map: bool = True) -> pa.Table:
    """``open_table`` after the size check; any failure is a one-line ``CacheError`` naming the file and the fix."""
    problem = size_problem(path, entry)
    if problem:
        raise CacheError(f"{problem}; {repair_hint(root)}")
    try:
        return open_table(path, memory_map=memory_map)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a torn file
        msg = " ".join(str(e).split())[:200]
        raise CacheError(f"{path} is unreadable ({type(e).__name__}: {msg}); {repair_hint(root)}") from None


def rewards_failed_everywhere(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rewards scored during the build that failed (raised, timed out or returned NaN) on every record they were
    asked to score: name -> {"failures", "example"}."""
    out = {}
    counts = summarize_counts(manifest)
    for name, info in manifest.get("rewards", {}).items():
        if info.get("storage") != "shard":
            continue
        reasons = [f"{k}:{name}" for k in ("reward_error", "reward_nan", "reward_timeout")]
        fails = sum(counts["rejects"].get(r, 0) for r in reasons)
        scored_ok = counts["records"] - counts["missing_rewards"].get(name, 0)
        if fails and scored_ok <= 0:
            example = next((r.get("message", "") for e in manifest.get("shards", []) for r in e.get("reject_log", [])
                            if r.get("reason") in reasons), "")
            out[name] = {"failures": fails, "example": " ".join(str(example).split())[:300]}
    return out


def verify_shard_file(path: Path, entry: dict[str, Any] | None = None, deep: bool = True,
                      check_hash: bool = True) -> list[str]:
    """Problems with one shard file (empty list when it is sound): size and sha256 against the manifest entry
    (when it recorded them), then the Arrow file itself (``deep``: rows and index ranges too)."""
    problems = []
    if not path.exists():
        return [f"{path.name}: file is missing"]
    if entry is not None and entry.get("bytes") is not None and path.stat().st_size != entry["bytes"]:
        problems.append(f"{path.name}: size {path.stat().st_size} != {entry['bytes']} bytes in the manifest "
                        "(truncated or overwritten)")
    elif entry is not None and check_hash and entry.get("sha256"):
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            problems.append(f"{path.name}: sha256 {digest[:16]}... != {entry['sha256'][:16]}... in the manifest "
                            "(the file was damaged or changed after it was committed)")
    try:  # memory-mapped: the footer and schema are parsed, the records are read only when ``deep``
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        meta = shard_metadata(reader.schema)
        table = reader.read_all() if deep else None
    except Exception as e:  # any parse failure means a damaged file
        msg = " ".join(str(e).split())[:200]
        return problems + [f"{path.name}: unreadable Arrow file ({type(e).__name__}: {msg})"]
    if table is not None:
        idx = table.column("index").to_numpy()
        if len(idx) != meta.get("num_records", -1):
            problems.append(f"{path.name}: holds {len(idx)} rows but its metadata says {meta.get('num_records')}")
        if len(idx) and (idx.min() < meta["start"] or idx.max() >= meta["end"] or np.any(np.diff(idx) <= 0)):
            problems.append(f"{path.name}: record indices are outside [{meta['start']}, {meta['end']}) or unsorted")
        if entry is not None:
            for k in ("start", "end", "num_records"):
                if meta.get(k) != entry.get(k):
                    problems.append(f"{path.name}: {k}={meta.get(k)} in the file but {entry.get(k)} in the manifest")
    return problems
