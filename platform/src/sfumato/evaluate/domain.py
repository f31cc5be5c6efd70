"""An offline quality yardstick: FD-domain and class accuracy under a classifier trained on the
run's own data.

FID and CLIPScore need pretrained networks that cannot always be downloaded. What any labelled
dataset can give instead is a small CNN trained on its own classes (the innermost tag), at the
run's last resolution, once per shard set and settings (the fingerprint), cached under
data.output_dir/domain_classifier/<fingerprint>/. With it:

- FD-domain: the Fréchet distance (fid.py, the same code as FID) between generated images and the
  classifier's held-out real images in its penultimate features.
- class accuracy: the share of a class-conditional model's images classified as the class asked
  for, the "GAN-test" of Shmelkov et al. 2018 (How good is my GAN?), shown between its ceiling
  (real held-out images' accuracy) and its floor (Gaussian noise's, about 1/classes or the share
  of the class noise falls into).
- with the real images at hand (`Yardstick.real`): FD-domain's floor (real training images of the
  sample's size against the reference), coverage (a recall figure) and memorisation (each
  sample's nearest training image), in sfumato.evaluate.memorisation.

The numbers say how far a run is from its data in a space that knows only this data: they rank
runs on the same data and fingerprint (and sample count: FD is biased upwards at small counts),
nothing else, and are never comparable with published FIDs.

Every array enters as uint8 NHWC (shards, datasets) or float NCHW in [-1, 1] (the sampler's range).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfumato.config import DomainConfig, content_hash
from sfumato.evaluate.fid import RunningStatistics, Statistics, frechet_distance
from sfumato.evaluate.memorisation import MemorisationCheck, RealSets, coverage, to_uint8
from sfumato.layout import ShardFolder, atomic_write_json, commit_file, temporary_sibling

log = logging.getLogger(__name__)

VERSION = 1  # of the network and its training: part of the fingerprint, so a change retrains
WEIGHTS, META, REFERENCE, YARDSTICK = "classifier.safetensors", "meta.json", "reference.safetensors", "yardstick.json"
BATCH = 256  # images per forward pass when scoring


class ClassifierNet(nn.Module):
    """Four blocks of 3x3 conv + BatchNorm + SiLU (the last three halve the size, channels double
    from `width`), global average pool -> 8 x width features -> linear head."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        layers, previous = [], 3
        for block, channels in enumerate((width, 2 * width, 4 * width, 8 * width)):
            layers += [
                nn.Conv2d(previous, channels, 3, stride=1 if block == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.SiLU(),
            ]
            previous = channels
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


def to_pixels(images_uint8_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
    images = np.asarray(images_uint8_nhwc)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


class DomainClassifier:
    """The trained network with its class names and resolution; evaluation mode throughout."""

    def __init__(self, net: ClassifierNet, class_names: list[str], resolution_px: int, meta: dict, device: str = "cpu"):
        self.net, self.class_names, self.resolution_px = net.eval().to(device), list(class_names), resolution_px
        self.meta, self.device = meta, device

    @property
    def heldout_accuracy(self) -> float | None:
        return self.meta.get("heldout_accuracy")

    def classify(self, images) -> tuple[np.ndarray, np.ndarray]:
        """float NCHW in [-1, 1] -> (features float64 [N, 8 x width], predicted class int64 [N])."""
        images = torch.as_tensor(images)
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.resolution_px,) * 2:
            raise ValueError(
                f"the domain classifier takes float images [N, 3, {self.resolution_px}, "
                f"{self.resolution_px}] in [-1, 1] (its training resolution), got {tuple(images.shape)}"
            )
        features, predicted = [], []
        with torch.no_grad():
            for start in range(0, len(images), BATCH):
                chunk = images[start : start + BATCH].to(self.device, torch.float32)
                f, logits = self.net(chunk)
                features.append(f.double().cpu().numpy())
                predicted.append(logits.argmax(1).cpu().numpy())
        if not features:
            return np.zeros((0, self.net.head.in_features)), np.zeros(0, np.int64)
        return np.concatenate(features), np.concatenate(predicted).astype(np.int64)

    def features(self, images) -> np.ndarray:
        return self.classify(images)[0]

    def predict(self, images) -> np.ndarray:
        return self.classify(images)[1]

    def save(self, folder: Path) -> None:
        """folder/classifier.safetensors (weights) and folder/meta.json, each replaced atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        tmp = temporary_sibling(folder / WEIGHTS)
        save_file(state, str(tmp))
        commit_file(tmp, folder / WEIGHTS)
        meta = {**self.meta, "class_names": self.class_names, "resolution_px": self.resolution_px}
        atomic_write_json(folder / META, meta)

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> DomainClassifier:
        from safetensors.torch import load_file

        meta = json.loads((Path(folder) / META).read_text())
        net = ClassifierNet(len(meta["class_names"]), meta["settings"]["width"])
        net.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
        return cls(net, meta.pop("class_names"), meta.pop("resolution_px"), meta, device)


def _augment(x: torch.Tensor, generator: torch.Generator, hflip: bool) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 1/8 of the side (reflection padding)."""
    n, _, height, width = x.shape
    if hflip:
        x = torch.where((torch.rand(n, generator=generator) < 0.5)[:, None, None, None], x.flip(3), x)
    pad = max(1, height // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + height, dx[i] : dx[i] + width] for i in range(n)])


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    settings: DomainConfig | None = None,
    heldout: tuple[np.ndarray, np.ndarray] | None = None,
    device: str = "cpu",
) -> DomainClassifier:
    """Train on uint8 NHWC images with class indices into `class_names`; with `heldout`
    (images, labels), its accuracy is `heldout_accuracy`. Deterministic for the same inputs and
    settings.seed (initialisation, batch order and augmentation are seeded; the caller's torch
    RNG is left as it was)."""
    s = settings or DomainConfig()
    x, y = to_pixels(images), torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"{len(x)} images and {len(y)} labels: need as many labels as images, at least 2")
    if len(class_names) < 2 or int(y.min()) < 0 or int(y.max()) >= len(class_names):
        raise ValueError(
            f"labels must index {len(class_names)} class names (at least 2), got {int(y.min())}..{int(y.max())}"
        )
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net = ClassifierNet(len(class_names), s.width).to(device)
    generator = torch.Generator().manual_seed(s.seed)
    steps_per_epoch = math.ceil(len(x) / s.batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.lr, total_steps=s.epochs * steps_per_epoch)
    net.train()
    for _ in range(s.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), s.batch_size):
            batch = order[start : start + s.batch_size]
            _, logits = net(_augment(x[batch], generator, s.hflip).to(device))
            loss = F.cross_entropy(logits, y[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    meta = {
        "version": VERSION,
        "settings": s.model_dump(mode="json"),
        "train_images": len(x),
        "train_seconds": round(time.perf_counter() - started, 2),
        "final_loss": round(loss.item(), 4),
    }
    classifier = DomainClassifier(net, class_names, x.shape[-1], meta, device)
    if heldout is not None:
        predicted = classifier.predict(to_pixels(heldout[0]))
        meta.update(heldout_images=len(predicted), heldout_accuracy=float(np.mean(predicted == np.asarray(heldout[1]))))
    log.info(
        "domain classifier: %d images, %d classes, %d epochs in %.1f s",
        len(x),
        len(class_names),
        s.epochs,
        meta["train_seconds"],
    )
    return classifier


@dataclass
class Yardstick:
    """A trained classifier with what every score is set against: the held-out real images'
    feature statistics (the FD-domain reference) and Gaussian noise's accuracy and FD-domain."""

    classifier: DomainClassifier
    reference: Statistics
    noise_accuracy: float
    noise_fd_domain: float
    meta: dict  # fingerprint, where the images came from, counts
    real: RealSets | None = None  # the real images and their features, in memory only (never saved)

    @property
    def class_names(self) -> list[str]:
        return self.classifier.class_names

    @property
    def real_accuracy(self) -> float:
        return self.classifier.heldout_accuracy

    def with_real(self, train_images: np.ndarray, heldout_images: np.ndarray, **settings) -> Yardstick:
        """Attach the real images this yardstick was built from (uint8 NHWC) and their features:
        the floor, coverage and memorisation figures then come with every score."""
        self.real = RealSets(
            train_images,
            self.classifier.features(to_pixels(train_images)),
            heldout_images,
            self.classifier.features(to_pixels(heldout_images)),
            **settings,
        )
        return self

    def save(self, folder: Path) -> None:
        self.classifier.save(folder)
        self.reference.save(Path(folder) / REFERENCE)
        atomic_write_json(
            Path(folder) / YARDSTICK,
            {**self.meta, "noise_accuracy": self.noise_accuracy, "noise_fd_domain": self.noise_fd_domain},
        )

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> Yardstick:
        meta = json.loads((Path(folder) / YARDSTICK).read_text())
        return cls(
            DomainClassifier.load(folder, device),
            Statistics.load(Path(folder) / REFERENCE),
            meta.pop("noise_accuracy"),
            meta.pop("noise_fd_domain"),
            meta,
        )


def build_yardstick(
    classifier: DomainClassifier,
    heldout_images: np.ndarray,
    heldout_labels: np.ndarray,
    fingerprint: str,
    settings: DomainConfig | None = None,
    train_images: np.ndarray | None = None,
    **meta,
) -> Yardstick:
    """The classifier's held-out accuracy and reference statistics from real held-out images
    (uint8 NHWC), and its floor from `settings.noise_images` seeded noise images. With the
    classifier's `train_images`, the real sets too (Yardstick.with_real)."""
    s = settings or DomainConfig()
    name = f"domain-classifier:{fingerprint}"
    features, predicted = classifier.classify(to_pixels(heldout_images))
    classifier.meta.update(
        heldout_images=len(predicted), heldout_accuracy=float(np.mean(predicted == np.asarray(heldout_labels)))
    )
    reference = RunningStatistics(name)
    reference.add(features)
    reference = reference.result()
    side, generator = classifier.resolution_px, torch.Generator().manual_seed(s.seed)
    noise = torch.randn(s.noise_images, 3, side, side, generator=generator).clamp(-1, 1)
    yardstick = Yardstick(classifier, reference, 0.0, 0.0, {"fingerprint": fingerprint, "features": name, **meta})
    floor = score(yardstick, noise, np.arange(s.noise_images) % len(classifier.class_names))
    yardstick.noise_accuracy, yardstick.noise_fd_domain = floor["class_accuracy"], floor["fd_domain"]
    return yardstick if train_images is None else yardstick.with_real(train_images, heldout_images, seed=s.seed)


def yardstick_from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    settings: DomainConfig | None = None,
    device: str = "cpu",
) -> Yardstick:
    """Split uint8 NHWC images (a seeded permutation, settings.holdout_fraction held out), train,
    and build the yardstick: one call for data without shards (a benchmark's)."""
    s = settings or DomainConfig()
    images, labels = np.asarray(images), np.asarray(labels)
    order = np.random.default_rng(s.seed).permutation(len(images))
    heldout, train = (
        order[: max(2, round(len(images) * s.holdout_fraction))],
        order[max(2, round(len(images) * s.holdout_fraction)) :],
    )
    digest = hashlib.sha256(images.tobytes() + labels.astype(np.int64).tobytes()).hexdigest()
    fingerprint = content_hash(
        VERSION, digest, images.shape, class_names, s.model_dump(mode="json", exclude={"enabled"})
    )
    classifier = train_classifier(images[train], labels[train], class_names, s, device=device)
    return build_yardstick(
        classifier, images[heldout], labels[heldout], fingerprint, s, train_images=images[train], source="arrays"
    )


# ------------------------------------------------------------------------- from the shards
def data_classes(shards_dir: Path) -> list[str]:
    """The shards' class names by index (classes.json); [] when the data has no classes."""
    path = ShardFolder(shards_dir).classes
    classes = json.loads(path.read_text()) if path.is_file() else {}
    return [name for name, _ in sorted(classes.items(), key=lambda kv: kv[1])]


def yardstick_fingerprint(shards_dir: Path, resolution_px: int, settings: DomainConfig) -> str:
    """Hash of the shards at `resolution_px` (names, sizes, sha256 from shard_manifest.csv), the
    class names, the settings (all but `enabled`) and VERSION."""
    import csv

    with ShardFolder(shards_dir).manifest.open() as fh:
        shards = [row for row in csv.DictReader(fh) if int(row["resolution_px"]) == resolution_px]
    return content_hash(
        VERSION, shards, resolution_px, data_classes(shards_dir), settings.model_dump(mode="json", exclude={"enabled"})
    )


def _read_shards(shards_dir: Path, resolution_px: int, s: DomainConfig) -> tuple[dict, dict]:
    """(train, held-out) as {"image": uint8 NHWC, "class": int64}. A sample's split position
    (loader.split_position, a hash of its id) below holdout x keep is held out, in
    [holdout, holdout + (1 - holdout) x keep) it trains, where keep scales both to max_images."""
    import csv

    from sfumato.data.loader import iter_batches_from, iter_samples, shard_paths, split_position

    paths = shard_paths(Path(shards_dir), resolution_px)
    with ShardFolder(shards_dir).manifest.open() as fh:
        total = sum(int(r["sample_count"]) for r in csv.DictReader(fh) if int(r["resolution_px"]) == resolution_px)
    keep = 1.0 if s.max_images is None else min(1.0, s.max_images / max(total, 1))
    h = s.holdout_fraction
    splits = {"train": (h, h + (1 - h) * keep), "heldout": (0.0, h * keep)}
    out = {}
    for split, (low, high) in splits.items():
        chosen = (
            x for x in iter_samples(paths) if "cls" in x and low <= split_position(json.loads(x["json"])["id"]) < high
        )
        batches = list(iter_batches_from(chosen, 512, resolution_px, drop_last=False))
        if not batches:
            raise ValueError(
                f"no labelled {split} image among the shards at {resolution_px}px in {shards_dir}: "
                "the data needs classes (tags) and more images, or raise evaluate.domain.holdout_fraction"
            )
        out[split] = {k: np.concatenate([b[k] for b in batches]) for k in ("image", "class")}
    return out["train"], out["heldout"]


def load_or_train_yardstick(
    shards_dir: Path,
    resolution_px: int,
    cache_dir: Path,
    settings: DomainConfig | None = None,
    device: str = "cpu",
    real: dict | None = None,
) -> Yardstick:
    """The yardstick of these shards at `resolution_px`: loaded from cache_dir/<fingerprint>/ when
    that folder is complete, else trained and written there (a temp folder renamed into place,
    so a half-written one is never read). With `real` (RealSets settings: quantile, candidates),
    its real images are attached (read from the shards again when the yardstick was cached)."""
    s = settings or DomainConfig()
    class_names = data_classes(shards_dir)
    if len(class_names) < 2:
        raise ValueError(
            f"{shards_dir} has {len(class_names)} classes: the domain yardstick needs at least 2 "
            "(the innermost tag of each sample); set evaluate.domain.enabled=false"
        )
    fingerprint = yardstick_fingerprint(shards_dir, resolution_px, s)
    folder = Path(cache_dir) / fingerprint
    if (folder / YARDSTICK).is_file():
        log.info("domain yardstick: cached %s", folder)
        cached = Yardstick.load(folder, device)
        if real is None:
            return cached
        train, heldout = _read_shards(shards_dir, resolution_px, s)
        return cached.with_real(train["image"], heldout["image"], seed=s.seed, **real)
    train, heldout = _read_shards(shards_dir, resolution_px, s)
    classifier = train_classifier(train["image"], train["class"], class_names, s, device=device)
    yardstick = build_yardstick(
        classifier,
        heldout["image"],
        heldout["class"],
        fingerprint,
        s,
        source=str(shards_dir),
        resolution_px=resolution_px,
    )
    tmp = folder.with_name(f".{fingerprint}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    yardstick.save(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another evaluation finished the same fingerprint first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "domain yardstick: held-out accuracy %.3f on %d images -> %s",
        yardstick.real_accuracy,
        len(heldout["class"]),
        folder,
    )
    return yardstick if real is None else yardstick.with_real(train["image"], heldout["image"], seed=s.seed, **real)


# ---------------------------------------------------------------------------------- scoring
class DomainScorer:
    """Generated images a batch at a time (features, not images, are kept; with the yardstick's
    real sets, the few samples closest to a training image too)."""

    def __init__(self, yardstick: Yardstick, shown_pairs: int = 8, real: bool = True):
        """`real` false: no floor, coverage or memorisation figures even when the yardstick has its
        real sets (a second scoring of the same evaluation)."""
        self.yardstick, self.running = yardstick, RunningStatistics(yardstick.reference.features)
        classes = len(yardstick.class_names)
        self.confusion, self.conditional = np.zeros((classes, classes), np.int64), None
        self.generated: list[np.ndarray] = []
        check = real and yardstick.real is not None
        self.memorisation = MemorisationCheck(yardstick.real, shown_pairs) if check else None

    def add(self, images, asked_labels=None) -> None:
        """float NCHW in [-1, 1]; `asked_labels`: the yardstick's class index each image was
        generated for (None for every batch of an unconditional model)."""
        if self.conditional is not None and self.conditional != (asked_labels is not None):
            raise ValueError("give asked labels for every batch or for none")
        self.conditional = asked_labels is not None
        features, predicted = self.yardstick.classifier.classify(images)
        self.running.add(features)
        if asked_labels is not None:
            np.add.at(self.confusion, (np.asarray(asked_labels, np.int64), predicted), 1)
        if self.memorisation is not None:
            self.generated.append(features)
            self.memorisation.add(to_uint8(images), features)

    def real_figures(self, count: int) -> dict:
        """FD-domain's floor, coverage beside a real sample's, and memorisation: see
        sfumato.evaluate.memorisation. Empty without the yardstick's real sets."""
        real, y = self.yardstick.real, self.yardstick
        if self.memorisation is None or count < 2:
            return {}
        a, b = real.subsets(count)
        floor = RunningStatistics(y.reference.features)
        floor.add(real.train_features[b])
        generated = np.concatenate(self.generated)
        return {
            "fd_domain_floor": frechet_distance(floor.result(), y.reference),
            "floor_count": len(b),
            "coverage": coverage(real.heldout_features, generated[: len(a)], real.train_features[a]),
            "coverage_real": coverage(real.heldout_features, real.train_features[b], real.train_features[a]),
            "memorisation": self.memorisation.result(),
        }

    def result(self) -> dict:
        y = self.yardstick
        stats = self.running.result()
        accuracy = float(np.trace(self.confusion) / self.confusion.sum()) if self.conditional else None
        return {
            **self.real_figures(stats.count),
            "fd_domain": frechet_distance(stats, y.reference),
            "class_accuracy": accuracy,
            "real_accuracy": y.real_accuracy,
            "noise_accuracy": y.noise_accuracy,
            "noise_fd_domain": y.noise_fd_domain,
            "num_samples": stats.count,
            "class_names": y.class_names,
            "confusion": self.confusion.tolist() if self.conditional else None,
            "yardstick": {
                **y.meta,
                **{
                    k: y.classifier.meta.get(k) for k in ("train_images", "heldout_images", "train_seconds", "settings")
                },
                "feature_dim": int(y.reference.mu.shape[0]),
            },
        }


def score(yardstick: Yardstick, images, asked_labels=None) -> dict:
    """All of `images` (float NCHW in [-1, 1]) at once: see DomainScorer.result for the keys."""
    scorer = DomainScorer(yardstick)
    scorer.add(images, asked_labels)
    return scorer.result()


def summary(domain: dict) -> str:
    """One line: 'class accuracy 0.93 (real 0.99, noise 0.25), FD-domain 12.3 (real 1.2, noise 310)'."""
    real = f"real {domain['fd_domain_floor']:.3g}, " if domain.get("fd_domain_floor") is not None else ""
    fd = f"FD-domain {domain['fd_domain']:.3g} ({real}noise {domain['noise_fd_domain']:.3g})"
    if domain["class_accuracy"] is None:
        return fd
    return (
        f"class accuracy {domain['class_accuracy']:.2f} (real {domain['real_accuracy']:.2f}, "
        f"noise {domain['noise_accuracy']:.2f}), {fd}"
    )
