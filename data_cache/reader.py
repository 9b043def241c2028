"""Reading a latent cache: memory-mapped shards as a torch ``Dataset``, filters, splits, statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from data_cache import storage as st
from lrm.latent_space import LatentSpace


class LatentCache(torch.utils.data.Dataset):
    """A cache directory opened for reading (memory-mapped Arrow shards, zero copy).

    ``cache[i]`` is a dict of tensors: ``latents`` float32 (C, h, w) / (T, C, h, w), ``text_tokens`` (L, D),
    ``text_mask`` (L,) bool, ``text_pooled`` (P,)
    (``manifest["text_pooled_dim"]``, default D), ``reward/<name>`` () float32 (NaN = missing) and ``index``
    (the record's source index). A view made by ``subset``/``filter`` shares the mapped shards.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], shards: list[dict[str, Any]],
                 rows: np.ndarray | None = None):
        self.root = root
        self.manifest = manifest
        self._shards = shards  # per shard: table, numpy views
        self._offsets = np.cumsum([0] + [s["n"] for s in shards])
        total = int(self._offsets[-1])
        self._rows = np.arange(total) if rows is None else np.asarray(rows, dtype=np.int64)

    # ---- opening ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, check_complete: bool = False) -> "LatentCache":
        root = Path(root)
        manifest = st.read_manifest(root)
        if check_complete and not manifest.get("complete"):
            raise st.CacheError(f"cache {root} is incomplete (the build was interrupted); finish it with "
                                "`lrm cache build --resume true` or open it with check_complete=False")
        # Fast checks (no hashing; `lrm cache verify` hashes): the manifest's entries, then each file's size.
        st.check_manifest(root, manifest)
        latent_shape = tuple(manifest.get("latent_shape") or ())
        L, D = manifest["text_shape"]
        rewards = list(manifest["rewards"])
        shards = []
        for e in manifest["shards"]:
            path = root / st.SHARD_DIR / e["file"]
            if e["num_records"] == 0:
                problem = st.size_problem(path, e)
                if problem:
                    raise st.CacheError(f"{problem}; {st.repair_hint(root)}")
                continue
            t = st.open_checked(root, path, e)
            if t.num_rows != e["num_records"]:
                raise st.CacheError(f"{path} holds {t.num_rows} rows, the manifest says {e['num_records']}; "
                                    f"{st.repair_hint(root)}")
            try:
                s = {"file": e["file"], "n": t.num_rows, "table": t,
                     "index": t.column("index").to_numpy(),
                     "latent": st.fixed_list_numpy(t.column("latent"), latent_shape),
                     "text_tokens": st.fixed_list_numpy(t.column("text_tokens"), (L, D)),
                     "text_mask": st.fixed_list_numpy(t.column("text_mask"), (L,)),
                     "text_pooled": st.fixed_list_numpy(t.column("text_pooled"),
                                                        (int(manifest.get("text_pooled_dim", D)),)),
                     "rewards": {}}
            except (KeyError, ValueError) as ex:  # a column missing or of another size than the manifest says
                raise st.CacheError(f"{path} does not match the manifest ({type(ex).__name__}: {ex}); "
                                    f"{st.repair_hint(root)}") from None
            for r in rewards:
                col = st.reward_column(r)
                if col in t.column_names:
                    s["rewards"][r] = t.column(col).to_numpy()
            shards.append(s)
        by_file = {s["file"]: s for s in shards}
        for r, entries in manifest.get("sidecars", {}).items():
            got = {e["shard"] for e in entries}
            for e in entries:
                if e["shard"] not in by_file:
                    continue
                t = st.open_checked(root, root / e["file"], e)
                s = by_file[e["shard"]]
                if not np.array_equal(t.column("index").to_numpy(), s["index"]):
                    raise st.CacheError(f"reward file {root / e['file']} does not line up with shard {e['shard']}; "
                                        f"{st.repair_hint(root)}")
                s["rewards"][r] = t.column(st.reward_column(r)).to_numpy()
            for s in shards:  # a shard not scored yet (add-reward interrupted): missing
                if s["file"] not in got:
                    s["rewards"][r] = np.full(s["n"], np.nan, np.float32)
        return cls(root, manifest, shards)

    # DataLoader workers started by spawn get the directory and rows, and map the shards themselves.
    def __getstate__(self) -> dict[str, Any]:
        return {"root": str(self.root), "rows": self._rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        other = LatentCache.open(state["root"])
        self.__dict__.update(other.__dict__)
        self._rows = state["rows"]

    # ---- basic properties ------------------------------------------------------------------------------------
    @property
    def latent_space(self) -> LatentSpace:
        return LatentSpace.from_dict(self.manifest["latent_space"])

    @property
    def text_encoder(self) -> dict[str, Any]:
        return self.manifest["text_encoder"]

    @property
    def reward_names(self) -> list[str]:
        return list(self.manifest["rewards"])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        if self.manifest.get("latent_shape") is None:  # set by the first committed record
            raise st.CacheTooSmallError(f"cache {self.root} holds no records ({self._empty_reason()}), so it has no "
                                        f"latent shape yet; build records into it with `lrm cache build --resume true "
                                        f"--out_dir {self.root}` or check the source")
        return tuple(self.manifest["latent_shape"])

    @property
    def is_video(self) -> bool:
        return len(self.latent_shape) == 4

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def num_records(self) -> int:
        """Records in the whole cache (not just this view)."""
        return int(self._offsets[-1])

    def _empty_reason(self) -> str:
        if self.num_records:
            return f"the filter left none of its {self.num_records}"
        rejected = (self.manifest.get("counts") or {}).get("rejected", 0)
        if rejected:
            return f"all {rejected} records were rejected: see {self.root / st.REJECTS}"
        return "nothing was built into it"

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self._offsets, rows, side="right") - 1
        return shard, rows - self._offsets[shard]

    def _column(self, key: str, rows: np.ndarray | None = None, reward: str | None = None) -> np.ndarray:
        """Column values for ``rows`` (global row numbers; default: this view's rows), copied out."""
        rows = self._rows if rows is None else rows
        shard, local = self._locate(rows)
        parts = []
        # Contiguous runs per shard keep reads sequential.
        for sid in np.unique(shard):
            sel = shard == sid
            src = self._shards[sid]["rewards"][reward] if reward is not None else self._shards[sid][key]
            parts.append((np.flatnonzero(sel), src[local[sel]]))
        if not parts:
            return np.zeros((0,))
        first = parts[0][1]
        out = np.empty((len(rows),) + first.shape[1:], dtype=first.dtype)
        for where, vals in parts:
            out[where] = vals
        return out

    @property
    def indices(self) -> np.ndarray:
        """Source index of every record in this view."""
        return self._column("index")

    @property
    def prompts(self) -> list[str]:
        return self.column("prompt")

    def column(self, name: str) -> list[Any]:
        """A string column (``prompt``, ``source_id``, ``content_hash``) for this view."""
        shard, local = self._locate(self._rows)
        tables = {s: self._shards[s]["table"].column(name).to_pylist() for s in np.unique(shard)}
        return [tables[s][int(i)] for s, i in zip(shard, local)]

    def rewards(self, name: str) -> np.ndarray:
        if name not in self.manifest["rewards"]:
            raise KeyError(f"reward {name!r} is not in this cache; it has {self.reward_names}. "
                           "Add it with `lrm cache add-reward`.")
        return self._column("", reward=name).astype(np.float32)

    # ---- torch Dataset ---------------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for a cache view of {len(self)} records")
        row = self._rows[i]
        sid, local = self._locate(np.array([row]))
        s, j = self._shards[sid[0]], int(local[0])
        out = {
            "latents": torch.from_numpy(np.array(s["latent"][j], dtype=np.float32)),
            "text_tokens": torch.from_numpy(np.array(s["text_tokens"][j], dtype=np.float32)),
            "text_mask": torch.from_numpy(np.array(s["text_mask"][j]).astype(bool)),
            "text_pooled": torch.from_numpy(np.array(s["text_pooled"][j], dtype=np.float32)),
            "index": torch.tensor(int(s["index"][j])),
        }
        for r in self.reward_names:
            out[st.reward_column(r)] = torch.tensor(float(s["rewards"][r][j]), dtype=torch.float32)
        return out

    def tensors(self, device: str | torch.device = "cpu", rewards: list[str] | None = None,
                latent_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Everything in this view as tensors on ``device`` (moved in the storage dtype, then cast there)."""
        device = torch.device(device)
        names = self.reward_names if rewards is None else rewards
        if len(self) == 0:
            raise st.CacheTooSmallError(
                f"{'cache' if self.num_records == 0 else 'this view of the cache'} {self.root} holds no "
                f"records ({self._empty_reason()}); build more with `lrm cache build --resume true --out_dir "
                f"{self.root} --source.num_samples N` or check the source")

        def put(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=False).to(dtype)

        out = {
            "latents": put(self._column("latent"), latent_dtype),
            "text_tokens": put(self._column("text_tokens"), torch.float32),
            "text_mask": put(self._column("text_mask"), torch.bool),
            "text_pooled": put(self._column("text_pooled"), torch.float32),
            "index": put(self._column("index"), torch.int64),
        }
        for r in names:
            out[st.reward_column(r)] = put(self.rewards(r), torch.float32)
        return out

    # ---- views ---------------------------------------------------------------------------------------------------
    def subset(self, idx: np.ndarray | list[int]) -> "LatentCache":
        """A view of records ``idx`` (positions in this view)."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset indices must lie in [0, {len(self)}), got [{idx.min()}, {idx.max()}]")
        return LatentCache(self.root, self.manifest, self._shards, self._rows[idx])

    def where(self, reward: str | None = None, present: bool = True, min: float | None = None,
              max: float | None = None, prompt: Callable[[str], bool] | None = None,
              require: list[str] | None = None) -> np.ndarray:
        """Positions of records that pass every filter: ``reward`` present (not NaN) and within
        [``min``, ``max``]; all rewards in ``require`` present; ``prompt(text)`` true."""
        keep = np.ones(len(self), dtype=bool)
        for r in ([reward] if reward else []) + list(require or []):
            v = self.rewards(r)
            ok = ~np.isnan(v)
            keep &= ok if present else ~ok
            if r == reward and present:
                if min is not None:
                    keep &= np.nan_to_num(v, nan=-np.inf) >= min
                if max is not None:
                    keep &= np.nan_to_num(v, nan=np.inf) <= max
        if prompt is not None:
            keep &= np.array([bool(prompt(p)) for p in self.prompts], dtype=bool)
        return np.flatnonzero(keep)

    def filter(self, **kw) -> "LatentCache":
        """``subset(where(**kw))``: e.g. ``cache.filter(reward="colorfulness", min=0.2)``."""
        return self.subset(self.where(**kw))

    def split_by_prompt(self, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(train_idx, val_idx) positions; every prompt lands wholly in one split."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        prompts = self.prompts
        uniq = sorted(set(prompts))
        if len(uniq) < 2:
            raise st.CacheTooSmallError(
                f"cannot split {self.root} into train and validation by prompt: it holds {len(self)} record(s) with "
                f"{len(uniq)} distinct prompt(s), at least 2 are needed; build more records with `lrm cache build "
                f"--resume true --out_dir {self.root} --source.num_samples N`")
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(uniq))
        counts: dict[str, int] = {}
        for p in prompts:
            counts[p] = counts.get(p, 0) + 1
        target = val_fraction * len(prompts)
        val_prompts: set[str] = set()
        n_val = 0
        for k in order:  # fill val with whole prompts until the record target is reached
            if n_val >= target:
                break
            p = uniq[k]
            if len(val_prompts) == len(uniq) - 1:
                break
            val_prompts.add(p)
            n_val += counts[p]
        is_val = np.array([p in val_prompts for p in prompts], dtype=bool)
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)

    # ---- statistics ------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, float]]:
        """Per reward: count (present), missing (NaN), mean, std, min, max over this view."""
        out = {}
        for r in self.reward_names:
            v = self.rewards(r)
            ok = v[~np.isnan(v)].astype(np.float64)
            out[r] = {"count": int(ok.size), "missing": int(v.size - ok.size),
                      "mean": float(ok.mean()) if ok.size else float("nan"),
                      "std": float(ok.std()) if ok.size else float("nan"),
                      "min": float(ok.min()) if ok.size else float("nan"),
                      "max": float(ok.max()) if ok.size else float("nan")}
        return out

    def __repr__(self) -> str:
        return (f"LatentCache({str(self.root)!r}, records={len(self)}, latent={self.manifest.get('latent_shape')} "
                f"{self.manifest['latent_dtype']}, space={self.latent_space.short()}, rewards={self.reward_names})")

