"""The `evaluate` section: `sfumato evaluate`'s samples and feature networks, the offline
yardstick (a classifier trained on the run's own data) behind FD-domain and class accuracy, and
the compositional yardstick (a segmenter of the demo's scenes) behind GenEval-style accuracies."""

from __future__ import annotations

from pydantic import Field

from sfumato.config.base import Frozen
from sfumato.config.diffusion import GuidanceInterval, Sampler


class DomainConfig(Frozen):
    """The offline yardstick (sfumato.evaluate.domain): a small CNN trained on the training shards'
    classes at the run's last resolution, once per shard set and these settings, cached under
    data.output_dir/domain_classifier/. Its penultimate features give FD-domain, its predictions the
    class accuracy of generated images. Needs no downloaded weights; its numbers compare runs on the
    same data and yardstick fingerprint only, never published FIDs."""

    enabled: bool = True
    """Off: no domain numbers. Needs classes in the data (the innermost tag, shards' classes.json)."""
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the shard images (by id hash) the classifier never trains on: its held-out accuracy
    (the ceiling of class accuracy) and the reference statistics of FD-domain come from them."""
    max_images: int | None = Field(10_000, ge=10)
    """Shard images read (training and held-out alike, chosen by id hash, so every class keeps its
    share). None: all of the last stage's shards."""
    epochs: int = Field(20, ge=1, le=1000)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(3e-3, gt=0, le=1)
    """AdamW peak learning rate of a one-cycle schedule (warm-up, then cosine decay to ~0)."""
    weight_decay: float = Field(0.05, ge=0)
    width: int = Field(16, ge=4, le=512)
    """Channels of the first of four conv blocks, doubled by each next one: 8 x width features
(16: 128 features, 0.4 M parameters; 5,000 CIFAR-10 images train in about a minute on 2 CPU cores)."""
    hflip: bool = True
    """Mirror training images at random: off for data whose classes change under mirroring (digits, text)."""
    noise_images: int = Field(500, ge=2)
    """Gaussian noise images (clamped to [-1, 1], fixed seed) classified for the floor of class accuracy."""
    seed: int = 0
    """Weights' initialisation, data order, augmentation and the noise images."""


class SegmenterConfig(Frozen):
    """The compositional yardstick's judge (sfumato.evaluate.compositional): a small fully
    convolutional segmenter trained on freshly rendered scenes of every shape and colour (held-out
    combinations too: it is the judge, not the model) at the run's last resolution, with
    augmentation that makes it read generated images. Trained once per resolution and these
    settings, cached under data.output_dir/segmenter/<fingerprint>/."""

    scenes: int = Field(1500, ge=16, le=1_000_000)
    """Scenes rendered for training, each with 1-4 objects of any shape and colour (and a few noise
    images with no object); every epoch sees them under fresh augmentation."""
    epochs: int = Field(5, ge=1, le=1000)
    batch_size: int = Field(16, ge=2)
    """Small batches: what learning shapes needs is optimizer steps (470 at these defaults)."""
    lr: float = Field(3e-3, gt=0, le=1)
    """AdamW peak learning rate of a one-cycle schedule."""
    weight_decay: float = Field(1e-4, ge=0)
    foreground_weight: float = Field(3.0, ge=1, le=100)
    """Loss weight of an object's pixels against the ground's (about 3 to 1 in area): shapes are
    learnt in fewer steps."""
    width: int = Field(16, ge=4, le=256)
    """Channels at full resolution, doubled at 1/2 and 1/4 (16: 0.2 M parameters)."""
    noise_fraction: float = Field(0.05, ge=0, lt=1)
    """Share of the training images that are noise with no object: the judge sees nothing in noise."""
    seed: int = 0
    """Initialisation, the scenes drawn, batch order and augmentation."""


class CompositionalConfig(Frozen):
    """GenEval-style accuracies of a text model on the demo's compositional scenes
    (sfumato.evaluate.compositional; docs/evaluation.md "Compositional yardstick"). Runs when the
    model is text-conditional and data.sources has a demo source with mode: scenes: every
    evaluation prompt of both splits (seen, held_out: the source's held-out combinations) is drawn
    images_per_prompt times and judged by a segmenter, per task and overall."""

    enabled: bool = True
    prompts_per_task: int = Field(8, ge=1, le=1000)
    """Distinct prompts per task and split (sfumato.data.scenes.evaluation_prompts)."""
    images_per_prompt: int = Field(4, ge=1, le=1000)
    """Images generated per prompt, image i from noise seed + i."""
    seed: int = 0
    """The prompt sets and the generation noise."""
    min_object_fraction: float = Field(0.006, gt=0, lt=1)
    """A connected foreground region smaller than this share of the image is not an object
    (at 32 px: 6 pixels; the smallest drawn object covers about 30)."""
    segmenter: SegmenterConfig = SegmenterConfig()


class MemorisationConfig(Frozen):
    """Floors, coverage and memorisation beside the domain yardstick (sfumato.evaluate.memorisation;
    docs/evaluation.md "Floors, coverage and memorisation"): the training and held-out images are
    read again and their features kept for the evaluation."""

    enabled: bool = True
    quantile: float = Field(0.05, gt=0, lt=0.5)
    """A sample is closer to a training image than real images are when its nearest-training
    distance is below this quantile of the held-out images' (a model that draws new images gets
    about this share)."""
    candidates: int = Field(8, ge=1, le=256)
    """A sample's nearest training images in features, among which the closest in pixels is found."""
    pairs_shown: int = Field(8, ge=0, le=256)
    """The closest sample-training pairs drawn side by side for the report."""


class EvaluateConfig(Frozen):
    """`sfumato evaluate RUN_DIR`: generated images against the training shards."""

    num_samples: int = Field(1000, ge=2, le=1_000_000)
    """Images generated per evaluation: 1,000 for a quick number, 10,000 for a robust one
    (FID is biased upwards at small counts; compare runs at equal counts only)."""
    batch_size: int = Field(50, ge=1)
    sampler: Sampler = "dpm-solver++"
    steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float = Field(1.0, ge=0, le=50)
    guidance_interval: GuidanceInterval | None = None
    """[lo, hi]: guide only at noise levels t / num_train_timesteps in [lo, hi] (1: pure noise),
    elsewhere one conditional call (Kynkäänniemi et al. 2024). None: at every step."""
    seed: int = 0
    """Image i starts from noise seeded seed + i, for every checkpoint evaluated."""
    inception_weights: str | None = None
    """Hub id, folder or .safetensors file of pytorch-fid's Inception-v3 weights
    (pt_inception-2015-12-05): the standard FID. None: FD on CLIP image features (FD-CLIP),
    whose numbers are not comparable with FID's."""
    clip_model: str | None = None
    """transformers CLIPModel (hub id or folder) for FD-CLIP and CLIPScore; None:
    data.curate.clip.model. Without any CLIP model CLIPScore is skipped."""
    reference_max_images: int | None = Field(10_000, ge=2)
    """Training images in the reference statistics (None: all of the last stage's shards)."""
    captions: list[str] | None = Field(None, min_length=1)
    """Text-conditional runs: prompts for the generated images and CLIPScore, cycled; give
    captions held out from training here. None: the manifest's distinct captions, which the model
    trained on (the report says which were used)."""
    device: str = "cpu"
    domain: DomainConfig = DomainConfig()
    """The offline yardstick: FD-domain and class accuracy, computed whenever the data has classes."""
    compositional: CompositionalConfig = CompositionalConfig()
    """GenEval-style task accuracies of text models trained on the demo's scenes."""
    memorisation: MemorisationConfig = MemorisationConfig()
    """FD-domain's real floor, coverage and each sample's nearest training image (needs the domain
    yardstick)."""
    unguided: bool = True
    """A guided evaluation (guidance_scale != 1) of a conditional model also scores the same
    samples drawn at guidance 1: class accuracy and FD-domain (the domain yardstick), and the
    compositional scores, so what guidance adds is visible."""
