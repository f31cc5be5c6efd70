"""The latent cache: every shard's images (and captions) encoded once by the run's frozen
encoders, on Ray Data.

A latent run otherwise runs the VAE's encoder on every micro-batch of every epoch of every run
and sweep trial. The cache stores, per sample, the posterior's mean and std (not a drawn z), so
training still draws z = mean + std * eps with the run's own generator: the draw the on-the-fly
path makes (sfumato.models.vae.draw_latents), its loss equal to float tolerance, and every
epoch sees a fresh sample of the posterior. A text run whose pretrained encoder is frozen also
gets each caption's last hidden states (and the empty caption's, for caption dropout): the
denoiser takes them in place of token ids and its encoder never runs in the training step.

    DATA_DIR/cache/<key>/<res>/shard-NNNNNN.safetensors   mean, std [N, C, h, w]; text_states [N, L, D],
                                                          text_empty [1, L, D] (float16 by default)
                               shard-NNNNNN.json          completion marker: shard sha256, ids, bytes
                        cache.json                        the key's parts, bytes per sample, counts

<key> hashes what the values depend on apart from the shards: the VAE's hub id or folder,
subfolder and (local folders) the sha256 of its weights and config, the same for the frozen
text encoder and its tokenizer with max_length, and the stored dtype. The scaling and shift
factors are applied when training draws, so changing them reuses the cache. Each file records
the sha256 of the shard tar it was encoded from: a rebuilt shard is encoded again, an unchanged
one never is, so every run and sweep on the same shards and models shares one cache, built once.
Files are written to a temporary name and renamed; the sidecar comes last, so a killed build
resumes where it stopped and a half-written file is never read.

Training mirrors no image (the shards' allow_hflip is recorded, never applied), so one
orientation is stored; a trainer that flips must store both or skip the cache.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfumato.config import Config, content_hash
from sfumato.layout import (
    CacheFolder,
    DataFolder,
    atomic_write_json,
    commit_file,
    is_temporary,
    read_json,
    temporary_sibling,
)

log = logging.getLogger(__name__)

LATENT_MEAN, LATENT_STD = "latent_mean", "latent_std"
"""The batch columns of the latents (sfumato.train.step.model_inputs draws from them)."""
TEXT_STATES, TEXT_EMPTY = "text_states", "text_empty"
"""The batch columns of a frozen text encoder's states: per caption [B, L, D], and the empty
caption's [1, L, D] that classifier-free-guidance dropout substitutes (sfumato.train.step.conditions)."""
_COLUMNS = {"mean": LATENT_MEAN, "std": LATENT_STD, "text_states": TEXT_STATES}  # file tensor -> batch column
FORMAT = 1  # bump when the files' content changes meaning: a new key, a rebuild


# ------------------------------------------------------------------------------------- the key
_HASHED = (".safetensors", ".json", ".model", ".txt")
"""What a model folder's hash covers: weights, configs (a fast tokenizer's tokenizer.json among
them), a sentencepiece tokenizer (T5's spiece.model) and BPE merges (CLIP's merges.txt)."""


def _folder_digest(folder: Path) -> str | None:
    """sha256 over a local model folder's weights, configs and tokenizer files (_HASHED; None: not
    a local folder, a hub id, which names its weights). Local weights can be replaced under the same path."""
    files = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix in _HASHED)
    # Hashed once per process for each listing (names, sizes, modification times).
    return _digest(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)) if files else None


@functools.lru_cache(maxsize=16)
def _digest(listing: tuple) -> str:
    digest = hashlib.sha256()
    for name, _, _ in listing:
        digest.update(Path(name).name.encode() + b"\0")
        with open(name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _hub_revision(repo_id: str, subfolder: str | None, filename: str = "config.json") -> str | None:
    """The commit of the hub repo's snapshot in the local Hugging Face cache, which is what
    from_pretrained loads offline (None: not downloaded yet, or not a hub id)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, f"{subfolder}/{filename}" if subfolder else filename)
    except ValueError:  # not a valid repo id (a missing local path)
        return None
    if not isinstance(found, str):
        return None
    parts = Path(found).parts  # .../models--org--name/snapshots/<commit>/[subfolder/]config.json
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def _weights(root: Path, subfolder: str | None, pretrained: str, filename: str = "config.json") -> dict:
    folder = root / (subfolder or "")
    if folder.is_dir():
        return {"weights_sha256": _folder_digest(folder)}
    return {"hub_revision": _hub_revision(pretrained, subfolder, filename)}


def vae_identity(vae_cfg) -> dict:
    """What names the VAE's weights: hub id or folder, subfolder, and a local folder's content hash."""
    return {
        "pretrained": vae_cfg.pretrained,
        "subfolder": vae_cfg.subfolder,
        **_weights(Path(vae_cfg.pretrained), vae_cfg.subfolder, vae_cfg.pretrained),
    }


def frozen_text(cfg: Config):
    """The run's text config when it conditions on a frozen pretrained encoder (whose states per
    caption never change, so they are cached); else None."""
    t = cfg.train
    return t.text if t.conditioning == "text" and t.text.pretrained and not t.text.train_encoder else None


def text_identity(text_cfg) -> dict:
    """What fixes a caption's encoder states: encoder and tokenizer (and local folders' hashes), length."""
    root, t = Path(text_cfg.pretrained), text_cfg
    return {
        "pretrained": t.pretrained,
        "encoder_subfolder": t.encoder_subfolder,
        "tokenizer_subfolder": t.tokenizer_subfolder,
        "max_length": t.max_length,
        "encoder": _weights(root, t.encoder_subfolder, t.pretrained),
        "tokenizer": _weights(root, t.tokenizer_subfolder, t.pretrained, "tokenizer_config.json"),
    }


def cache_identity(cfg: Config) -> dict:
    text = frozen_text(cfg)
    return {
        "format": FORMAT,
        "vae": vae_identity(cfg.train.vae) if cfg.train.vae else None,
        "text": text_identity(text) if text else None,
        "dtype": cfg.data.cache.dtype,
    }


def cache_folder(cfg: Config) -> CacheFolder:
    """The run's cache folder: DATA_DIR/cache/<key> for its VAE, frozen text encoder and dtype."""
    return DataFolder(cfg.data.output_dir).cache_folder(content_hash(cache_identity(cfg)))


def cache_enabled(cfg: Config) -> str | None:
    """None: the config has something to cache (latents, frozen encoder states); else why not."""
    if cfg.train is None or (cfg.train.vae is None and frozen_text(cfg) is None):
        return "no train.vae and no frozen pretrained text encoder"
    if not cfg.data.cache.enabled:
        return "data.cache.enabled is false"
    # Bucketed shards train on each image at its own stored size; the cache holds square centre
    # crops of one size per shard file. Until it stores per-bucket tensors, those runs encode on the fly.
    return "data.shards.buckets is set (the cache holds square crops)" if cfg.data.shards.buckets is not None else None


# -------------------------------------------------------------------------------- the shards
@dataclass(frozen=True)
class ShardEntry:
    path: Path
    resolution_px: int
    index: int
    sha256: str


def _shards(data: DataFolder) -> list[ShardEntry]:
    manifest = data.shard_folder.manifest
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} does not exist: run `sfumato shards` first")
    with manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    return [
        ShardEntry(
            data.shards / r["shard"], int(r["resolution_px"]), int(Path(r["shard"]).stem.split("-")[-1]), r["sha256"]
        )
        for r in rows
    ]


def _complete(folder: CacheFolder, shard: ShardEntry) -> dict | None:
    """The sidecar of the shard's cache file when that file is whole and was encoded from this
    shard's bytes; None: (re)build it."""
    file = folder.shard(shard.resolution_px, shard.index)
    info = read_json(CacheFolder.sidecar(file))
    if info is None or info.get("shard_sha256") != shard.sha256 or not file.is_file():
        return None
    return info if file.stat().st_size == info["bytes"] else None


# ------------------------------------------------------------------------------------ build
class CacheEncoder:
    """Ray Data stage: one shard per row -> its cache file. The VAE and (text runs with a frozen
    pretrained encoder) the tokenizer and encoder are loaded once per actor."""

    def __init__(self, vae_cfg, text_cfg, dtype: str, batch_size: int, folder: str, device: str = "cpu"):
        import torch

        self.torch = torch
        self.device, self.dtype, self.batch_size = device, getattr(torch, dtype), batch_size
        self.folder = CacheFolder(folder)
        self.codec = self.encoder = None
        if vae_cfg is not None:
            from sfumato.models.vae import LatentCodec

            self.codec = LatentCodec.load(vae_cfg, device)
        if text_cfg is not None:
            from sfumato.models.text import build_text_encoder, load_pretrained_tokenizer

            self.max_length = text_cfg.max_length
            self.tokenizer = load_pretrained_tokenizer(text_cfg.pretrained, text_cfg.tokenizer_subfolder)
            self.encoder = build_text_encoder(text_cfg, self.tokenizer).eval().to(device)
            self.empty = self._states([""])

    def _states(self, captions: list[str]):
        """The encoder's last hidden states [B, L, D]: what the denoiser cross-attends to."""
        from sfumato.models.text import tokenize

        with self.torch.no_grad():
            ids = tokenize(self.tokenizer, captions, self.max_length).to(self.device)
            return self.encoder(input_ids=ids).last_hidden_state.float()

    def _encode(self, batch: dict) -> dict:
        out = {}
        if self.codec is not None:
            # The trainer's pixels: uint8 -> [-1, 1] in float32 (sfumato.train.step.batch_to_tensors).
            images = self.torch.from_numpy(batch["image"]).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            out["mean"], out["std"] = self.codec.posterior(images)
        if self.encoder is not None:
            out["text_states"] = self._states([c or "" for c in batch["caption"]])
        return {name: value.to(self.dtype).cpu() for name, value in out.items()}

    def __call__(self, row: dict) -> dict:
        from safetensors.torch import save_file

        from sfumato.data.loader import iter_batches_from, iter_samples

        res = int(row["resolution_px"])
        parts, ids = {}, []
        for batch in iter_batches_from(iter_samples([Path(row["shard"])]), self.batch_size, res, drop_last=False):
            for name, value in self._encode(batch).items():
                parts.setdefault(name, []).append(value)
            ids += [str(i) for i in batch["id"]]
        tensors = {name: self.torch.cat(values).contiguous() for name, values in parts.items()}
        if self.encoder is not None:
            tensors["text_empty"] = self.empty.to(self.dtype).cpu().contiguous()
        file = self.folder.shard(res, int(row["index"]))
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(file)
        save_file(tensors, str(tmp), metadata={"shard_sha256": row["sha256"], "ids": json.dumps(ids)})
        commit_file(tmp, file)
        sidecar = {
            "shard": row["shard_name"],
            "shard_sha256": row["sha256"],
            "samples": len(ids),
            "bytes": file.stat().st_size,
            "dtype": row["dtype"],
            "ids": ids,
            "shapes": {name: list(t.shape[1:]) for name, t in tensors.items() if name in _COLUMNS},
        }
        atomic_write_json(CacheFolder.sidecar(file), sidecar, indent=None)  # the completion marker, last
        return {"resolution_px": res, "index": int(row["index"]), "samples": len(ids)}


@dataclass(frozen=True)
class CacheSummary:
    folder: str
    files: int
    built: int
    reused: int
    samples: int
    bytes_per_sample: float
    resolutions_px: list

    def line(self) -> str:
        return (
            f"cache: {self.samples} samples in {self.files} files at {self.resolutions_px} px ({self.built} built, "
            f"{self.reused} reused), {self.bytes_per_sample:.0f} bytes/sample -> {self.folder}"
        )


def latent_resolutions(cfg: Config, shards: list[ShardEntry]) -> list[int]:
    """The shard resolutions the VAE divides into latents (all of them: sweeps and later runs on
    these shards may train at any); without a VAE (cached text states only) every resolution."""
    from diffusers import AutoencoderKL

    vae, factor = cfg.train.vae, 1
    if vae is not None:
        factor = 2 ** (
            len(AutoencoderKL.load_config(vae.pretrained, subfolder=vae.subfolder)["block_out_channels"]) - 1
        )
    return sorted({s.resolution_px for s in shards if s.resolution_px % factor == 0})


def run_cache(cfg: Config) -> CacheSummary:
    """Encode every shard whose cache file is missing or stale (Ray Data, an actor pool holding
    the encoders); reuse the rest. Writes cache.json with the bytes per sample."""
    import ray

    from sfumato.runtime import cluster_cpus, init_ray

    why_not = cache_enabled(cfg)
    if why_not:
        raise ValueError(f"nothing to cache: {why_not}")
    c, data, folder = cfg.data.cache, DataFolder(cfg.data.output_dir), cache_folder(cfg)
    every = _shards(data)
    resolutions = latent_resolutions(cfg, every)
    shards = [s for s in every if s.resolution_px in resolutions]
    pending = [s for s in shards if _complete(folder, s) is None]
    _remove_stale(folder, shards)
    if pending:
        init_ray(cfg.ray)
        workers = min(len(pending), c.num_workers or cluster_cpus())
        rows = [
            {
                "resolution_px": s.resolution_px,
                "index": s.index,
                "shard": str(s.path),
                "sha256": s.sha256,
                "shard_name": data.shard_folder.relative(s.path),
                "dtype": c.dtype,
            }
            for s in pending
        ]
        done = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
            CacheEncoder,
            fn_constructor_args=(
                cfg.train.vae,
                frozen_text(cfg),
                c.dtype,
                c.batch_size,
                str(folder.root),
                "cuda" if c.num_gpus else "cpu",
            ),
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=0 if c.num_gpus else 1,
            num_gpus=c.num_gpus,
        )
        done.context.op_resource_reservation_enabled = False  # one operator: see ingest
        for _ in done.iter_rows():
            pass
    sidecars = {s: _complete(folder, s) for s in shards}
    if any(info is None for info in sidecars.values()):
        raise RuntimeError(f"some cache files in {folder.root} did not complete; re-run `sfumato cache` to resume")
    summary = _write_meta(cfg, folder, sidecars, built=len(pending))
    log.info(summary.line())
    return summary


def _write_meta(cfg: Config, folder: CacheFolder, sidecars: dict, built: int) -> CacheSummary:
    per_res = {}
    for shard, info in sidecars.items():
        entry = per_res.setdefault(
            shard.resolution_px, {"files": 0, "samples": 0, "bytes": 0, "shapes": info["shapes"]}
        )
        entry["files"] += 1
        entry["samples"] += info["samples"]
        entry["bytes"] += info["bytes"]
    for entry in per_res.values():
        entry["bytes_per_sample"] = round(entry["bytes"] / max(1, entry["samples"]), 1)
    samples, size = sum(e["samples"] for e in per_res.values()), sum(e["bytes"] for e in per_res.values())
    atomic_write_json(
        folder.meta,
        {
            "key": folder.root.name,
            **cache_identity(cfg),
            "resolutions": {str(r): e for r, e in sorted(per_res.items())},
        },
    )
    return CacheSummary(
        str(folder.root),
        len(sidecars),
        built,
        len(sidecars) - built,
        samples,
        round(size / max(1, samples), 1),
        sorted(per_res),
    )


def _remove_stale(folder: CacheFolder, shards: list[ShardEntry]) -> None:
    """Files of shards no longer in the shard manifest, and temporaries of a killed build."""
    wanted = {folder.shard(s.resolution_px, s.index) for s in shards}
    wanted |= {CacheFolder.sidecar(p) for p in wanted}
    for res_folder in (p for p in folder.root.glob("*") if p.is_dir()):
        for path in res_folder.iterdir():
            if is_temporary(path) or path not in wanted:
                path.unlink()


# ------------------------------------------------------------------------------------ read
class LatentCache:
    """The cache of one resolution, as training reads it: a sample's tensors by its id."""

    def __init__(self, folder: CacheFolder, shards: list[ShardEntry], sidecars: list[dict], max_open: int = 2):
        self.folder = folder
        self.where: dict[str, tuple[ShardEntry, int]] = {}
        for shard, info in zip(shards, sidecars):
            for row, sample_id in enumerate(info["ids"]):
                if sample_id in self.where:
                    raise ValueError(
                        f"sample id {sample_id!r} is in two cache files at {shard.resolution_px}px "
                        f"({self.where[sample_id][0].path.name}, {shard.path.name}): re-run `sfumato shards`"
                    )
                self.where[sample_id] = (shard, row)
        # A rank reads its shards one after another: the last few files stay open.
        self._open: OrderedDict[ShardEntry, object] = OrderedDict()
        self.max_open = max_open

    @classmethod
    def open(cls, cfg: Config, resolution_px: int) -> LatentCache | None:
        """The cache of the run's VAE for these shards at `resolution_px`, if every one of them
        has a complete file; None (train on the fly) otherwise or when disabled."""
        if cache_enabled(cfg):
            return None
        folder = cache_folder(cfg)
        shards = [s for s in _shards(DataFolder(cfg.data.output_dir)) if s.resolution_px == resolution_px]
        sidecars = [_complete(folder, s) for s in shards]
        if not shards or any(info is None for info in sidecars):
            return None
        return cls(folder, shards, sidecars)

    def _file(self, shard: ShardEntry):
        from safetensors import safe_open

        if shard not in self._open:
            self._open[shard] = safe_open(str(self.folder.shard(shard.resolution_px, shard.index)), framework="np")
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        self._open.move_to_end(shard)
        return self._open[shard]

    def lookup(self, ids: list[str]) -> dict[str, np.ndarray]:
        """These samples' cached tensors by batch column (LATENT_MEAN, LATENT_STD [B, C, h, w];
        TEXT_STATES [B, L, D], TEXT_EMPTY [1, L, D]), in the stored dtype. Rows are read from
        the memory-mapped files one by one: a shard's text states can be gigabytes."""
        rows = []
        for sample_id in ids:
            if sample_id not in self.where:
                raise KeyError(
                    f"sample {sample_id!r} is not in the latent cache {self.folder.root}: re-run `sfumato cache`"
                )
            shard, row = self.where[sample_id]
            rows.append((self._file(shard), row))
        names = set(rows[0][0].keys())
        found = {
            column: np.concatenate([file.get_slice(name)[row : row + 1] for file, row in rows])
            for name, column in _COLUMNS.items()
            if name in names
        }
        if "text_empty" in names:
            found[TEXT_EMPTY] = rows[0][0].get_tensor("text_empty")
        return found

    def attach(self, batch: dict) -> dict:
        """The batch with its samples' cached tensors (what model_inputs and conditions read)."""
        return {**batch, **self.lookup([str(i) for i in batch["id"]])}

    def attach_all(self, batches: Iterator[tuple[dict, dict]]) -> Iterator[tuple[dict, dict]]:
        """The training loader's (batch, position) pairs, each batch with its latents."""
        for batch, position in batches:
            yield self.attach(batch), position
