"""Quality watched during training (train.quality): the EMA weights' samples scored by the domain
yardstick every few hundred steps, so that a run which stopped improving, or collapsed, shows it
on the progress line and in its curves rather than at evaluate.

Rank 0 alone draws and scores (sfumato.train.worker.evaluate_ema calls `measure` with the EMA
copy). The yardstick is the evaluation's (evaluate.domain, cached by fingerprint under the data
folder): `prepare` trains it on the driver before any worker starts, so every check and the
final evaluation load one classifier. Each check draws from the same noise and conditions, so two
points of a run differ only by the weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch.nn.functional as F

from sfumato.records import QualityWatchRecord


def prepare(cfg) -> None:
    """On the driver, before training: the yardstick exists (trained and cached on first use), or
    a clear error says why train.quality cannot run."""
    from sfumato.evaluate.evaluate import domain_yardstick, has_domain_yardstick

    if cfg.train.quality is None:
        return
    if not has_domain_yardstick(cfg):
        raise ValueError(
            "train.quality scores samples with the domain yardstick, which needs evaluate.domain.enabled "
            f"and data with at least 2 classes (the innermost tag; {cfg.data.output_dir}'s shards have fewer): "
            "set train.quality to null"
        )
    domain_yardstick(cfg)


@dataclass
class QualityWatch:
    yardstick: object  # sfumato.evaluate.domain.Yardstick
    conditions: list | None  # the model's classes or prompts, cycled
    asked: list[int] | None  # the yardstick's class index per image (class-conditional runs)

    @classmethod
    def build(cls, cfg, run_model, prompts: list[str] | None) -> QualityWatch:
        """The yardstick (cached by `prepare`) and each image's condition: classes in index order,
        or the run's grid prompts (`prompts`), cycled."""
        from sfumato.evaluate.evaluate import domain_yardstick, yardstick_classes

        yardstick, n = domain_yardstick(cfg), cfg.train.quality.num_samples
        if run_model.tokenizer is not None:
            return cls(yardstick, [prompts[i % len(prompts)] for i in range(n)], None)
        if run_model.class_names:
            labels = [i % len(run_model.class_names) for i in range(n)]
            return cls(yardstick, labels, yardstick_classes(yardstick, run_model.class_names, labels))
        return cls(yardstick, None, None)

    def measure(self, cfg, run_model, ema_model, resolution_px: int) -> QualityWatchRecord:
        """Draw the samples from `ema_model` at this stage's resolution, resize them to the
        yardstick's, and score them."""
        from sfumato.diffusion.sample import sample
        from sfumato.evaluate.domain import DomainScorer
        from sfumato.models.run import pipeline

        q, started = cfg.train.quality, time.perf_counter()
        pipe = pipeline(cfg, replace(run_model, denoiser=ema_model), q.sampler)
        scorer, side = DomainScorer(self.yardstick, real=False), self.yardstick.classifier.resolution_px
        for first in range(0, q.num_samples, q.batch_size):
            count = min(q.batch_size, q.num_samples - first)
            images = sample(
                pipe,
                count,
                q.seed,
                q.steps,
                q.guidance_scale,
                None if self.conditions is None else self.conditions[first : first + count],
                first_index=first,
                height=resolution_px,
                width=resolution_px,
                guidance_interval=q.guidance_interval,
            )
            if images.shape[-1] != side:
                images = F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True)
            scorer.add(
                images.clamp(0, 1).cpu() * 2 - 1, None if self.asked is None else self.asked[first : first + count]
            )
        result = scorer.result()
        return QualityWatchRecord(
            watch_class_accuracy=result["class_accuracy"],
            watch_fd_domain=float(result["fd_domain"]),
            watch_samples=int(result["num_samples"]),
            watch_s=round(time.perf_counter() - started, 2),
        )
