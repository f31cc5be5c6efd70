"""The commands that are not stages: `sfumato config` (show or validate a config), `sfumato
serve` (the HTTP endpoint of an export), `sfumato abtest` (a blind A/B page) and `sfumato pairs`
(votes and preference tables -> one DPO pairs table)."""

from __future__ import annotations

import json
from pathlib import Path

from sfumato.cli.command import Command, add_config_arguments, refuse
from sfumato.config import ConfigError, dump_yaml, load_config


class ConfigCommand(Command):
    name = "config"
    help = "show or validate a config"

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["show", "validate"])
        add_config_arguments(parser)

    def run(self, args):
        try:
            cfg = load_config(args.config, args.overrides)
        except (ConfigError, FileNotFoundError) as err:
            return refuse(err)
        print(dump_yaml(cfg) if args.action == "show" else f"{args.config}: valid", end="\n")
        return 0


class Pairs(Command):
    name = "pairs"
    help = (
        "A/B test folders and preference tables (Pick-a-Pic layout) -> one DPO pairs table; ties and skips "
        "are dropped and counted"
    )

    def add_arguments(self, parser):
        parser.add_argument("sources", nargs="+", metavar="ABTEST_DIR_OR_PARQUET")
        parser.add_argument("--out", required=True, metavar="PAIRS_PARQUET")

    def run(self, args):
        from sfumato.data.pairs import run_pairs

        try:
            summary = run_pairs([Path(s) for s in args.sources], Path(args.out))
        except (ValueError, FileNotFoundError) as err:
            return refuse(err)
        print(json.dumps(summary, indent=2))
        return 0


class AbTest(Command):
    name = "abtest"
    help = "a blind A/B comparison page of two exports; votes -> votes.jsonl, results page"

    def add_arguments(self, parser):
        parser.add_argument(
            "--a", required=True, metavar="[NAME=]EXPORT_DIR[+LORA_DIR]", help="one model (an `sfumato export` folder)"
        )
        parser.add_argument(
            "--b",
            required=True,
            metavar="[NAME=]EXPORT_DIR[+LORA_DIR]",
            help="the other (the same export twice: a preference-collection round, the sides from different noise)",
        )
        parser.add_argument(
            "--out", required=True, metavar="DIR", help="the test's folder: votes.jsonl and images/ (resumed)"
        )
        parser.add_argument(
            "--conditions",
            default=None,
            metavar="FILE",
            help="the classes or prompts to compare on, one a line (default: the models' classes)",
        )
        parser.add_argument("--planned", type=int, default=400, help="the planned number of counted votes")
        parser.add_argument("--steps", type=int, default=25, help="denoising steps per image")
        parser.add_argument("--guidance-scale", type=float, default=3.0)
        parser.add_argument(
            "--guidance-interval",
            type=float,
            nargs=2,
            metavar=("LO", "HI"),
            default=None,
            help="guide only at noise levels in [LO, HI] (1: pure noise; default: every step)",
        )
        parser.add_argument(
            "--seed", type=int, default=None, help="the trials' conditions, seeds and sides (default: random)"
        )
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8300)
        parser.add_argument(
            "--token-env", default=None, metavar="VAR", help="an environment variable holding the access token"
        )

    def run(self, args):
        from sfumato.abtest.app import run_abtest

        run_abtest(
            [args.a, args.b],
            Path(args.out),
            Path(args.conditions) if args.conditions else None,
            args.planned,
            args.steps,
            args.guidance_scale,
            args.host,
            args.port,
            args.token_env,
            args.seed,
            None if args.guidance_interval is None else tuple(args.guidance_interval),
        )
        return 0


# The flags whose unset value leaves ServeSettings' default (sfumato.serve.app, written there once).
SERVE_SETTINGS = (
    "backend",
    "lora",
    "token_env",
    "max_batch_size",
    "request_timeout_s",
    "safety_model",
    "safety_threshold",
    "safety_action",
    "model_name",
)


class Serve(Command):
    name = "serve"
    help = "the Ray Serve HTTP endpoint for an export (POST /v1/generate)"

    def add_arguments(self, parser):
        parser.add_argument("--model", required=True, metavar="EXPORT_DIR", help="`sfumato export` output folder")
        parser.add_argument("--backend", choices=["torch", "onnx"], default=None, help="default: torch")
        parser.add_argument(
            "--lora",
            default=None,
            metavar="ADAPTER_DIR",
            help="a LoRA fine-tune's adapter (its export's lora/) onto --model, the base export",
        )
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--token-env",
            default=None,
            metavar="VAR",
            help="require the bearer token held in this environment variable",
        )
        parser.add_argument("--max-batch-size", type=int, default=None, help="requests per denoising loop (1: off)")
        parser.add_argument("--request-timeout-s", type=float, default=None)
        parser.add_argument("--model-name", default=None, help="--model's name in a request's `model` (default: base)")
        parser.add_argument(
            "--extra-model",
            action="append",
            default=[],
            metavar="NAME=EXPORT_DIR",
            help="another compatible export the endpoint holds (repeatable)",
        )
        parser.add_argument(
            "--adapter",
            action="append",
            default=[],
            metavar="NAME=ADAPTER_DIR",
            help="a LoRA adapter over --model, not fused, picked per request (repeatable)",
        )
        parser.add_argument(
            "--safety-model",
            default=None,
            metavar="CLIP",
            help="CLIP model (hub id or folder) of the output safety filter; unset: filter off",
        )
        parser.add_argument("--safety-threshold", type=float, default=None, help="flag at or above (default 0.5)")
        parser.add_argument(
            "--safety-action",
            choices=["withhold", "blur"],
            default=None,
            help="what a flagged image becomes (default: withhold)",
        )

    def run(self, args):
        from sfumato.serve.app import ServeSettings, run_server

        given = {key: getattr(args, key) for key in SERVE_SETTINGS}
        given["models"] = _named(args.extra_model, "--extra-model")
        given["adapters"] = _named(args.adapter, "--adapter")
        run_server(
            ServeSettings(model=args.model, **{k: v for k, v in given.items() if v is not None}), args.host, args.port
        )
        return 0


def _named(pairs: list[str], flag: str) -> dict[str, str]:
    """NAME=PATH flags as a dict; a malformed one is an error naming the flag."""
    named = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} {pair!r}: expected NAME=PATH")
        named[name] = path
    return named
