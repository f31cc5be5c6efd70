"""`sfumato <stage> --config FILE [key.sub=value ...]`: the entry points the jobs call too.

Each stage parses, loads the config (overrides applied, validated) and calls one library
function; knobs live in the config tree, not in flags. The one flag every stage takes,
`--verbose`, is about the console, not the run (sfumato.console).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sfumato.config import ConfigError, dump_yaml, load_config, load_run_config
from sfumato.console import configure_logging, set_verbose
from sfumato.layout import RunFolder

DATA_STAGES = ("ingest", "embed", "dedup", "safety", "caption", "shards", "cache", "dataloader")  # in sfumato.stages
VERBOSE_HELP = "also show Ray's and the libraries' INFO logs and the known-harmless warnings (quiet by default)"


def _with_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/pilot.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: data.shards.resolutions_px=[32,64]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfumato", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="stage", required=True)
    config = sub.add_parser("config", help="show or validate a config")
    config.add_argument("action", choices=["show", "validate"])
    _with_config(config)
    for name in DATA_STAGES:
        stage_parser = sub.add_parser(name, help=_help(name))
        _with_config(stage_parser)
        if name == "dedup":
            stage_parser.add_argument("--review", type=int, default=0, metavar="N",
                                      help="also write dedup_review.png: the N clusters nearest the threshold")
    _with_config(sub.add_parser("pipeline", help="the whole job: ingest, safety, dedup, caption, shards, tune, "
                                                 "train, evaluate, export (stages complete for the config are skipped)"))
    train = sub.add_parser("train", help=_help("train"))
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML config with a train section")
    source.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its config.yaml and last checkpoint")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.stages.0.steps=200")
    ft = sub.add_parser("finetune", help="post-training: fine-tune a trained run (or a diffusers export) on the "
                                         "finetune.select subset of the manifest, fully or with LoRA (finetune.lora)")
    _with_config(ft)
    ft.add_argument("--from", dest="parent", default=None, metavar="RUN_DIR",
                    help="the parent run folder (default: finetune.parent, else the config's train.output_dir)")
    ft.add_argument("--checkpoint", default=None, help="the parent's checkpoint, e.g. step-00000500 (default: newest)")
    ft.add_argument("--pretrained", default=None, metavar="FOLDER_OR_HUB_ID",
                    help="start from a diffusers export folder or hub id instead of a run")
    al = sub.add_parser("align", help="post-training: Diffusion-DPO of a trained run (or a diffusers export) on "
                                      "preference pairs (align.pairs, written by `sfumato pairs`)")
    _with_config(al)
    al.add_argument("--from", dest="parent", default=None, metavar="RUN_DIR",
                    help="the run to align (default: align.parent, else the config's train.output_dir)")
    al.add_argument("--checkpoint", default=None, help="its checkpoint, e.g. step-00000500 (default: newest)")
    al.add_argument("--pretrained", default=None, metavar="FOLDER_OR_HUB_ID",
                    help="start from a diffusers export folder or hub id instead of a run")
    al.add_argument("--pairs", default=None, metavar="PAIRS_PARQUET", help="default: align.pairs")
    ab = sub.add_parser("abtest", help="a blind A/B comparison page of two exports; votes -> votes.jsonl, results page")
    ab.add_argument("--a", required=True, metavar="[NAME=]EXPORT_DIR[+LORA_DIR]", help="one model (an `sfumato export` folder)")
    ab.add_argument("--b", required=True, metavar="[NAME=]EXPORT_DIR[+LORA_DIR]",
                    help="the other (the same export twice: a preference-collection round, the sides from different noise)")
    ab.add_argument("--out", required=True, metavar="DIR", help="the test's folder: votes.jsonl and images/ (resumed)")
    ab.add_argument("--conditions", default=None, metavar="FILE", help="the classes or prompts to compare on, one a "
                                                                         "line (default: the models' classes)")
    ab.add_argument("--planned", type=int, default=400, help="the planned number of counted votes")
    ab.add_argument("--steps", type=int, default=25, help="denoising steps per image")
    ab.add_argument("--guidance-scale", type=float, default=3.0)
    ab.add_argument("--seed", type=int, default=None, help="the trials' conditions, seeds and sides (default: random)")
    ab.add_argument("--host", default="127.0.0.1")
    ab.add_argument("--port", type=int, default=8300)
    ab.add_argument("--token-env", default=None, metavar="VAR", help="an environment variable holding the access token")
    pairs = sub.add_parser("pairs", help="A/B test folders and preference tables (Pick-a-Pic layout) -> one DPO pairs "
                                         "table; ties and skips are dropped and counted")
    pairs.add_argument("sources", nargs="+", metavar="ABTEST_DIR_OR_PARQUET")
    pairs.add_argument("--out", required=True, metavar="PAIRS_PARQUET")
    tune = sub.add_parser("tune", help=_help("tune"))
    _with_config(tune)
    tune.add_argument("--resume", action="store_true", help="continue the sweep in tune.output_dir (finished trials are kept)")
    run_helps = {
        "evaluate": "FID (or FD-CLIP) and CLIPScore of a checkpoint's EMA weights; writes report.md and the cards",
        "export": "a checkpoint's EMA weights as a diffusers folder, ONNX and INT8 under RUN_DIR/export",
        "report": "rewrite RUN_DIR/report.md, model_card.md and the data folder's dataset_card.md",
    }
    for stage, text in run_helps.items():
        run_parser = sub.add_parser(stage, help=text)
        run_parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run folder (train.output_dir)")
        if stage != "report":
            run_parser.add_argument("--checkpoint", default=None, help="e.g. step-00000500 (default: the newest)")
        run_parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. evaluate.num_samples=10000")
    serve_parser = sub.add_parser("serve", help="the Ray Serve HTTP endpoint for an export (POST /v1/generate)")
    serve_parser.add_argument("--model", required=True, metavar="EXPORT_DIR", help="`sfumato export` output folder")
    # Unset flags take ServeSettings' defaults (sfumato.serve.app), written there once.
    serve_parser.add_argument("--backend", choices=["torch", "onnx"], default=None, help="default: torch")
    serve_parser.add_argument("--lora", default=None, metavar="ADAPTER_DIR",
                              help="a LoRA fine-tune's adapter (its export's lora/) onto --model, the base export")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument("--token-env", default=None, metavar="VAR",
                              help="require the bearer token held in this environment variable")
    serve_parser.add_argument("--max-batch-size", type=int, default=None, help="requests per denoising loop (1: off)")
    serve_parser.add_argument("--request-timeout-s", type=float, default=None)
    serve_parser.add_argument("--model-name", default=None, help="--model's name in a request's `model` (default: base)")
    serve_parser.add_argument("--extra-model", action="append", default=[], metavar="NAME=EXPORT_DIR",
                              help="another compatible export the endpoint holds (repeatable)")
    serve_parser.add_argument("--adapter", action="append", default=[], metavar="NAME=ADAPTER_DIR",
                              help="a LoRA adapter over --model, not fused, picked per request (repeatable)")
    serve_parser.add_argument("--safety-model", default=None, metavar="CLIP",
                              help="CLIP model (hub id or folder) of the output safety filter; unset: filter off")
    serve_parser.add_argument("--safety-threshold", type=float, default=None, help="flag at or above (default 0.5)")
    serve_parser.add_argument("--safety-action", choices=["withhold", "blur"], default=None,
                              help="what a flagged image becomes (default: withhold)")
    bench = sub.add_parser("bench", help="measure a stage against a baseline in the same run")
    bench.add_argument("what", choices=["ingest", "train", "dedup", "export", "serve", "tune", "quality", "finetune",
                                          "align"])
    bench.add_argument("overrides", nargs="*", help="finetune: dotted overrides of --config, e.g. finetune.lora.rank=16")
    bench.add_argument("--config", default=None, help="finetune: a config with a finetune section")
    bench.add_argument("--from", dest="parent", default=None, metavar="RUN_DIR", help="finetune: the trained run")
    bench.add_argument("--workers", type=int, default=2, help="processes on the Ray side (and the Pool's); tune: trials at once")
    bench.add_argument("--out", default=None, help="write the figures as JSON here")
    bench.add_argument("--images", type=int, default=5000, help="ingest: images at 1x data size; dedup: images embedded; tune: CIFAR-10 images")
    bench.add_argument("--memory-scale", type=int, default=10, help="ingest: also run at this multiple (0: skip)")
    bench.add_argument("--datasets", default="../shared/datasets", help="ingest, tune, quality: folder holding flowers-val.tar, cifar10-train.tar.gz")
    bench.add_argument("--model", default="unet-s", help="train: a registered model")
    bench.add_argument("--resolution", type=int, default=32, help="train: image size")
    bench.add_argument("--steps", type=int, default=40, help="train: optimizer steps per side; tune: proxy steps per trial")
    bench.add_argument("--micro-batch", type=int, default=16, help="train: samples per worker per step at --workers "
                       "workers (the global batch every layout splits)")
    bench.add_argument("--layouts", default="2x1,1x2", help="train: Ray layouts of the CPUs, workers x threads each")
    bench.add_argument("--vectors", type=int, default=1_000_000, help="dedup: synthetic embeddings, approximate search")
    bench.add_argument("--exact-vectors", type=int, default=50_000, help="dedup: the subset searched exactly too")
    bench.add_argument("--gpu", action="store_true",
                       help="train: time the DeepSpeed step alone on one GPU (bf16, synthetic batch) with MFU")
    bench.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3], help="train: ZeRO stage")
    bench.add_argument("--compile", action="store_true", help="train --gpu: train.compile on (torch.compile)")
    bench.add_argument("--gpu-matrix", action="store_true",
                       help="train: every preset x ZeRO 0/2/3 (+ compiled rows) on one GPU, one process per row")
    bench.add_argument("--repeats", type=int, default=20, help="export: timed denoiser calls per setting")
    bench.add_argument("--duration", type=float, default=20.0, help="serve: seconds of load per cell")
    bench.add_argument("--serve-steps", type=int, default=10, help="serve: denoising steps per request")
    bench.add_argument("--trials", type=int, default=12, help="tune: trials per sweep")
    bench.add_argument("--reduction-factor", type=float, default=4.0, help="tune: ASHA's reduction factor")
    bench.add_argument("--cpu-seconds", type=float, default=600.0, help="quality: training CPU time per trainer")
    bench.add_argument("--score-every", type=float, default=100.0, help="quality: CPU seconds between scores")
    bench.add_argument("--samples", type=int, default=160, help="quality: generated images per score; finetune: images per measure")
    bench.add_argument("--trainers", default="plain,sfumato-ddpm,sfumato-flow", help="quality: which trainers race")
    bench.add_argument("--votes", type=int, default=400, help="align: judged trials of the base model (the DPO pairs)")
    bench.add_argument("--eval-votes", type=int, default=200, help="align: judged trials of aligned against base")
    bench.add_argument("--pairs", default=None, metavar="PAIRS_PARQUET",
                       help="align: reuse an earlier collection's pairs (its pairs.parquet) instead of judging --votes trials")
    bench.add_argument("--sides", default="lora,full", help="finetune: which fine-tunes run (lora, full or both)")
    bench.add_argument("--quality-datasets", default="shapes,cifar10", help="quality: shapes and/or cifar10")
    bench.add_argument("--shapes-images", type=int, default=2000, help="quality: demo shapes drawn (the pilot's count)")
    bench.add_argument("--cifar-per-class", type=int, default=500, help="quality: CIFAR-10 images per class")
    bench.add_argument("--threads", type=int, default=0, help="quality: torch threads (0: torch's default)")
    bench.add_argument("--seed", type=int, default=0, help="quality: data split, batches, weights and noise")
    bench.add_argument("--out-dir", default=None,
                       help="quality: plot, grids and quality.json (default runs/bench-quality); finetune: the two "
                            "fine-tune runs (default runs/bench-finetune)")
    for stage_parser in sub.choices.values():  # also after the stage: `sfumato pipeline --verbose ...`
        stage_parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def _help(name: str) -> str:
    from sfumato.stages import REGISTRY

    return REGISTRY[name].run.__doc__.strip().splitlines()[0]


def run_stage(name: str, cfg, **options) -> dict:
    """One registered stage (sfumato.stages), as the pipeline runs it; its result by name."""
    from sfumato.stages import REGISTRY

    _, result = REGISTRY[name].run(cfg, **options)
    return {name: result}


def _named(pairs: list[str], flag: str) -> dict[str, str]:
    """NAME=PATH flags as a dict; a malformed one is an error naming the flag."""
    named = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} {pair!r}: expected NAME=PATH")
        named[name] = path
    return named


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after --config; anything else unknown is an error.
    args, rest = parser.parse_known_args(argv)
    if args.verbose:
        set_verbose()
    configure_logging()
    stray = [item for item in rest if "=" not in item or item.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.stage == "bench":
        import importlib

        importlib.import_module(f"sfumato.bench.{args.what}").main(args)
        return 0
    if args.stage == "serve":
        from sfumato.serve.app import ServeSettings, run_server

        given = {k: getattr(args, k) for k in ("backend", "lora", "token_env", "max_batch_size", "request_timeout_s",
                                             "safety_model", "safety_threshold", "safety_action", "model_name")}
        given["models"], given["adapters"] = _named(args.extra_model, "--extra-model"), _named(args.adapter, "--adapter")
        run_server(ServeSettings(model=args.model, **{k: v for k, v in given.items() if v is not None}),
                   args.host, args.port)
        return 0
    if args.stage in ("evaluate", "export", "report"):
        return _run_folder_stage(args)
    if args.stage == "abtest":
        from sfumato.abtest.app import run_abtest

        run_abtest([args.a, args.b], Path(args.out), Path(args.conditions) if args.conditions else None, args.planned,
                   args.steps, args.guidance_scale, args.host, args.port, args.token_env, args.seed)
        return 0
    if args.stage == "pairs":
        from sfumato.data.pairs import run_pairs

        try:
            summary = run_pairs([Path(s) for s in args.sources], Path(args.out))
        except (ValueError, FileNotFoundError) as err:
            print(f"sfumato: {err}", file=sys.stderr)
            return 2
        print(json.dumps(summary, indent=2))
        return 0
    try:
        if args.stage == "train" and args.resume:
            cfg = load_config(RunFolder(args.resume).require().config, args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"sfumato: {err}", file=sys.stderr)
        return 2
    if args.stage == "config":
        print(dump_yaml(cfg) if args.action == "show" else f"{args.config}: valid", end="\n")
        return 0
    if args.stage == "tune":  # the sweep alone (the pipeline's tune stage also needs a best trial)
        from sfumato.tune.sweep import run_sweep

        try:
            result = run_sweep(cfg, resume=args.resume)
        except ConfigError as err:
            print(f"sfumato: {err}", file=sys.stderr)
            return 2
        print(json.dumps({k: v for k, v in result.items() if k != "trials_by_id"}, indent=2, default=str))
        return 0
    if args.stage in ("finetune", "align"):
        return _post_training(args, cfg)
    if args.stage == "pipeline":
        from sfumato.pipeline import run_pipeline

        try:
            run_pipeline(cfg)
        except ConfigError as err:
            print(f"sfumato: {err}", file=sys.stderr)
            return 2
        return 0
    if args.stage == "train" and cfg.train is None:
        print(f"sfumato: {args.config} has no `train` section", file=sys.stderr)
        return 2
    if args.stage == "cache":
        from sfumato.stages import REGISTRY

        if REGISTRY["cache"].enabled(cfg):
            print(f"sfumato: nothing to cache for {args.config}: {REGISTRY['cache'].enabled(cfg)}", file=sys.stderr)
            return 2
    options = {"review": args.review} if args.stage == "dedup" else {}
    result = run_stage(args.stage, cfg, **options)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _post_training(args, cfg) -> int:
    """A fine-tune's or an alignment's config resolved (lineage, selection or pairs: errors before
    any work), trained."""
    from sfumato.train.loop import run_training

    try:
        if args.stage == "align":
            from sfumato.train.align import run_config

            tuned = run_config(cfg, Path(args.parent) if args.parent else None, args.checkpoint, args.pretrained,
                               Path(args.pairs) if args.pairs else None)
        else:
            from sfumato.train.finetune import run_config

            tuned = run_config(cfg, Path(args.parent) if args.parent else None, args.checkpoint, args.pretrained)
    except (ValueError, FileNotFoundError) as err:
        print(f"sfumato: {err}", file=sys.stderr)
        return 2
    last = run_training(tuned)
    print(json.dumps({args.stage: {"run_dir": str(tuned.train.output_dir),
                                   "lineage": tuned.train.lineage.model_dump(mode="json", exclude_none=True),
                                   "last": last}}, indent=2, default=str))
    return 0


def _run_folder_stage(args) -> int:
    """evaluate / export / report: the run folder's own config.yaml, plus overrides."""
    run_dir = Path(args.run_dir)
    try:
        cfg = load_run_config(run_dir, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"sfumato: {err}", file=sys.stderr)
        return 2
    if args.stage == "evaluate":
        from sfumato.evaluate.evaluate import run_evaluate

        result = run_evaluate(run_dir, args.checkpoint, args.overrides)
    elif args.stage == "export":
        from sfumato.export.export_run import run_export

        result = run_export(run_dir, args.checkpoint, args.overrides)
    else:
        from sfumato.evaluate.cards import write_run_documents

        result = write_run_documents(run_dir, cfg.data.output_dir)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
