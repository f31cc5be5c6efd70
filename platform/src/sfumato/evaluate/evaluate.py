"""`sfumato evaluate RUN_DIR`: the offline domain yardstick, the compositional yardstick of text
runs on the demo's scenes, and FID (or FD-CLIP) and CLIPScore where their weights are configured,
of a checkpoint's EMA weights.

The domain yardstick (sfumato.evaluate.domain) needs no download: a small classifier trained on
the run's own training shards gives FD-domain and, for class-conditional runs, the share of
generated images classified as the class they were asked for. The compositional yardstick
(sfumato.evaluate.compositional) needs none either: for a text model trained on the demo's
scenes, every evaluation prompt of GenEval's six tasks, seen and held-out, is drawn a few times
and judged by a segmenter trained on rendered scenes.

`evaluate.num_samples` images are generated on fixed noise (image i from seed + i) with fixed
conditions, a batch at a time, and only their features are kept, so memory does not grow with
the count. Class models cycle through their classes, text models through the evaluation
captions. The reference statistics are the training shards' at the curriculum's last resolution,
computed once and cached under the data folder by content hash. Each call appends one line to
RUN_DIR/evaluation/metrics.jsonl and rewrites report.md and the cards.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sfumato.layout import DataFolder, RunFolder, append_jsonl
from sfumato.records import CompositionalRecord, QualityRecord

log = logging.getLogger(__name__)


def class_captions(manifest: Path, class_names: list[str]) -> list[str | None]:
    """Per class, the manifest's most frequent caption among that class's rows (a class-
    conditional model is asked for a class; CLIPScore needs words for it)."""
    table = pq.read_table(manifest, columns=["tags", "caption", "status"]).to_pylist()
    counts: dict[str, Counter] = {name: Counter() for name in class_names}
    for row in table:
        if row["tags"] and row["caption"] and row["tags"][-1] in counts:
            counts[row["tags"][-1]][row["caption"]] += 1
    return [min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] if c else None for c in counts.values()]


def manifest_prompts(manifest: Path) -> list[str]:
    """The manifest's accepted captions, distinct, most frequent first."""
    from sfumato.models.text import manifest_captions

    counts = Counter(manifest_captions(manifest))
    return [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _plan(cfg, run) -> tuple[list | None, list[str] | None, str]:
    """(conditions per image, CLIPScore caption per image, where the captions came from)."""
    n, manifest = cfg.evaluate.num_samples, DataFolder(cfg.data.output_dir).manifest
    if run.tokenizer is not None:
        prompts, origin = cfg.evaluate.captions, "evaluate.captions"
        if prompts is None:
            prompts, origin = manifest_prompts(manifest), "training manifest (seen in training)"
        if not prompts:
            raise ValueError(f"no captions to evaluate a text model with: set evaluate.captions ({manifest} has none)")
        chosen = [prompts[i % len(prompts)] for i in range(n)]
        return chosen, chosen, origin
    if run.class_names:
        labels = [i % len(run.class_names) for i in range(n)]
        captions = class_captions(manifest, run.class_names) if manifest.exists() else [None] * len(run.class_names)
        if any(c is None for c in captions):
            return labels, None, "none: some classes have no caption in the manifest"
        return labels, [captions[i] for i in labels], "the manifest's most frequent caption per class"
    return None, None, "none: unconditional model"


def has_domain_yardstick(cfg) -> bool:
    """evaluate.domain is on and the training shards have at least 2 classes to learn."""
    from sfumato.evaluate.domain import data_classes

    return cfg.evaluate.domain.enabled and len(data_classes(DataFolder(cfg.data.output_dir).shards)) >= 2


def domain_yardstick(cfg, real: bool = False):
    """The run's domain yardstick (trained on first use, then cached by fingerprint under
    DataFolder.domain_classifier), or None when it is off or the data has fewer than 2 classes.
    `real` and evaluate.memorisation on: with its real images (floors, coverage, memorisation)."""
    from sfumato.evaluate.domain import load_or_train_yardstick

    if not has_domain_yardstick(cfg):
        return None
    data, m = DataFolder(cfg.data.output_dir), cfg.evaluate.memorisation if real else None
    return load_or_train_yardstick(
        data.shards,
        cfg.train.stages[-1].resolution_px,
        data.domain_classifier,
        cfg.evaluate.domain,
        cfg.evaluate.device,
        real={"quantile": m.quantile, "candidates": m.candidates} if m is not None and m.enabled else None,
    )


def yardstick_classes(yardstick, model_classes: list[str], labels: list[int]) -> list[int]:
    """The model's class indices `labels` as the yardstick's (both name the data's classes, in
    their own order); a model class the data lacks is an error that names it."""
    index = {name: i for i, name in enumerate(yardstick.class_names)}
    missing = [name for name in model_classes if name not in index]
    if missing:
        raise ValueError(f"the model's classes {missing} are not in the data's {yardstick.class_names}")
    return [index[model_classes[c]] for c in labels]


def unguided(cfg, conditional: bool) -> bool:
    """Also score at guidance 1: evaluate.unguided, a conditional model, a guided evaluation."""
    return cfg.evaluate.unguided and conditional and cfg.evaluate.guidance_scale != 1


def scenes_source(cfg):
    """The data's demo source in scenes mode (sfumato.data.scenes), or None."""
    return next((src for src in cfg.data.sources if src.kind == "demo" and src.mode == "scenes"), None)


def has_compositional_yardstick(cfg) -> bool:
    """evaluate.compositional is on, the model is text-conditional and the data has a demo
    source with mode: scenes (the world whose prompts the yardstick judges)."""
    return cfg.evaluate.compositional.enabled and cfg.train.conditioning == "text" and scenes_source(cfg) is not None


def compositional_evaluation(cfg, pipe, out: Path, checkpoint_name: str) -> CompositionalRecord:
    """Every evaluation prompt of both splits drawn images_per_prompt times (image i of the whole
    set from noise evaluate.compositional.seed + i), judged by the segmenter; the judged images
    as a grid under `out` (a row per task and split, the prompts in order, green right, red wrong).
    With evaluate.unguided, the same prompts and noise at guidance 1 too (`unguided`)."""
    import torch

    from sfumato.data.scenes import TASKS, HeldOut, evaluation_prompts
    from sfumato.diffusion.sample import sample
    from sfumato.evaluate.compositional import judgement_grid, load_or_train_segmenter, repeat, validate

    e, c = cfg.evaluate, cfg.evaluate.compositional
    started, resolution_px = time.perf_counter(), cfg.train.stages[-1].resolution_px
    held_out = list(scenes_source(cfg).held_out)
    yardstick = load_or_train_segmenter(
        resolution_px, DataFolder(cfg.data.output_dir).segmenter, c.segmenter, e.device, c.min_object_fraction
    )
    prompts = {
        split: chosen
        for split, chosen in evaluation_prompts(HeldOut(held_out), c.prompts_per_task, c.seed).items()
        if chosen
    }
    k, first = c.images_per_prompt, 0
    splits, per_prompt, rows, at_one = {}, {}, [], {}

    def draw(asked, first: int, guidance: float, interval) -> torch.Tensor:
        batches = []
        for start in range(0, len(asked), e.batch_size):
            texts = [p.text for p in asked[start : start + e.batch_size]]
            batches.append(
                sample(
                    pipe,
                    len(texts),
                    c.seed,
                    e.steps,
                    guidance,
                    texts,
                    first_index=first + start,
                    height=resolution_px,
                    width=resolution_px,
                    guidance_interval=interval,
                )
            )
        return torch.cat(batches).cpu()

    for split, chosen in prompts.items():
        asked = repeat(chosen, k)
        images = draw(asked, first, e.guidance_scale, e.guidance_interval)
        if unguided(cfg, True):
            at_one[split] = yardstick.score(draw(asked, first, 1.0, None) * 2 - 1, asked).to_json()
        first += len(asked)
        score = yardstick.score(images * 2 - 1, asked)
        splits[split], correct = score.to_json(), score.correct
        per_prompt[split] = [
            {"task": p.task, "text": p.text, "correct": int(correct[i * k : (i + 1) * k].sum()), "images": k}
            for i, p in enumerate(chosen)
        ]
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for task in TASKS:
            where = np.array([p.task == task for p in asked])
            if where.any():
                rows.append((pixels[where], correct[where]))
        log.info("compositional %s: %s", split, splits[split])
    grid = f"compositional-{checkpoint_name}.png"
    judgement_grid(rows).save(out / grid)
    floor_and_ceiling = validate(yardstick, prompts, k, c.seed, HeldOut(held_out))
    return CompositionalRecord(
        splits=splits,
        real={split: v["real"] for split, v in floor_and_ceiling.items()},
        noise={split: v["noise"] for split, v in floor_and_ceiling.items()},
        chance={split: v["chance"] for split, v in floor_and_ceiling.items()},
        per_prompt=per_prompt,
        prompts_per_task=c.prompts_per_task,
        images_per_prompt=k,
        seed=c.seed,
        held_out=held_out,
        resolution_px=resolution_px,
        grid=grid,
        segmenter={key: yardstick.meta.get(key) for key in ("fingerprint", "version", "settings", "train_seconds")},
        seconds=round(time.perf_counter() - started, 2),
        unguided=at_one or None,
    )


def run_evaluate(run_dir: Path, checkpoint: str | None = None, overrides: list[str] | None = None) -> dict:
    from sfumato import checkpoint as ckpt
    from sfumato.config import load_run_config
    from sfumato.console import progress_text
    from sfumato.diffusion.sample import sample, to_grid
    from sfumato.evaluate.cards import write_run_documents
    from sfumato.evaluate.clipscore import clip_scores
    from sfumato.evaluate.domain import DomainScorer
    from sfumato.evaluate.features import Clip, ClipFeatures, load_extractor
    from sfumato.evaluate.fid import RunningStatistics, frechet_distance, reference_statistics
    from sfumato.models.run import load_trained, pipeline

    run_dir = Path(run_dir)
    device = load_run_config(run_dir, overrides).evaluate.device
    cfg, run, folder = load_trained(run_dir, checkpoint, overrides, device)
    data = DataFolder(cfg.data.output_dir)
    e = cfg.evaluate
    clip_source = e.clip_model or cfg.data.curate.clip.model
    resolution_px = cfg.train.stages[-1].resolution_px
    shards = data.shards
    yardstick = domain_yardstick(cfg, real=True)
    compositional = has_compositional_yardstick(cfg) and run.tokenizer is not None
    if yardstick is None and not (e.inception_weights or clip_source) and not compositional:
        raise ValueError(
            f"nothing to measure {run_dir} with: its data has no classes for the domain yardstick "
            "(or evaluate.domain.enabled is false), no feature network is set "
            "(evaluate.inception_weights, evaluate.clip_model or data.curate.clip.model) and it is not a "
            "text model on the demo's scenes (the compositional yardstick)"
        )
    extractor = reference = None
    if e.inception_weights or clip_source:
        extractor = load_extractor(e.inception_weights, clip_source, e.device, e.batch_size)
        reference = reference_statistics(
            shards, resolution_px, extractor, e.reference_max_images, data.fid_cache, e.batch_size
        )
    pipe = pipeline(cfg, run, e.sampler)
    conditions, captions, caption_origin = _plan(cfg, run)
    scorer, asked = None, None
    if yardstick is not None:
        scorer = DomainScorer(yardstick, e.memorisation.pairs_shown)
        if run.class_names and run.tokenizer is None:  # the model's class index -> the yardstick's
            asked = yardstick_classes(yardstick, run.class_names, conditions)
    clip = None  # one CLIP model for FD-CLIP and CLIPScore when they are the same
    if captions is not None and clip_source is not None:
        same = isinstance(extractor, ClipFeatures) and extractor.clip.source == clip_source
        clip = extractor.clip if same else Clip(clip_source, e.device)
    started = time.perf_counter()
    generated = RunningStatistics(extractor.name) if extractor is not None else None
    scores, grid = [], None
    at_one = (
        DomainScorer(yardstick, real=False) if scorer is not None and unguided(cfg, conditions is not None) else None
    )

    def draw(first: int, count: int, guidance: float, interval):
        batch_conditions = None if conditions is None else conditions[first : first + count]
        return sample(
            pipe,
            count,
            e.seed,
            e.steps,
            guidance,
            batch_conditions,
            first_index=first,
            height=resolution_px,
            width=resolution_px,
            guidance_interval=interval,
        )

    for first in range(0, e.num_samples, e.batch_size):
        count = min(e.batch_size, e.num_samples - first)
        images = draw(first, count, e.guidance_scale, e.guidance_interval)
        if at_one is not None:  # the same noise and conditions at guidance 1
            at_one.add(draw(first, count, 1.0, None) * 2 - 1, None if asked is None else asked[first : first + count])
        if grid is None:
            grid = images[:16]
        if extractor is not None:
            generated.add(extractor(images * 2 - 1))
        if scorer is not None:
            scorer.add(images * 2 - 1, None if asked is None else asked[first : first + count])
        if clip is not None:
            scores.append(clip_scores(images * 2 - 1, captions[first : first + count], clip, e.device, e.batch_size))
        log.info("evaluate: %s", progress_text(first + count, e.num_samples, time.perf_counter() - started, "images"))
    seconds = time.perf_counter() - started
    step = ckpt.load_meta(folder)["step"]
    out = RunFolder(run_dir).evaluation
    out.mkdir(exist_ok=True)
    to_grid(grid).save(out / f"samples-{folder.name}.png")
    domain = None if scorer is None else scorer.result()
    pairs = None if scorer is None or scorer.memorisation is None else scorer.memorisation.pairs_image()
    if pairs is not None:
        domain["memorisation"]["pairs_grid"] = f"memorisation-{folder.name}.png"
        pairs.save(out / domain["memorisation"]["pairs_grid"])
    judged = compositional_evaluation(cfg, pipe, out, folder.name) if compositional else None
    record = QualityRecord(
        time=time.time(),
        checkpoint=folder.name,
        step=step,
        features=None if extractor is None else extractor.name,
        metric=None if extractor is None else extractor.metric,
        fd=None if extractor is None else frechet_distance(generated.result(), reference),
        domain=domain,
        domain_unguided=None if at_one is None else at_one.result(),
        clip_score=float(np.concatenate(scores).mean()) if scores else None,
        clip_score_model=clip_source if scores else None,
        captions=caption_origin,
        num_samples=e.num_samples,
        sampler=e.sampler,
        steps=e.steps,
        guidance_scale=e.guidance_scale,
        guidance_interval=None if e.guidance_interval is None else list(e.guidance_interval),
        seed=e.seed,
        resolution_px=resolution_px,
        generation_s=round(seconds, 2),
        reference=None
        if reference is None
        else {"count": reference.count, "resolution_px": resolution_px, "shards": str(shards)},
        compositional=judged,
    )
    append_jsonl(RunFolder(run_dir).evaluations, record.to_json())
    write_run_documents(run_dir, cfg.data.output_dir)
    return record.to_json()
