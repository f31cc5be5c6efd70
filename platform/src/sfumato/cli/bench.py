"""`sfumato bench <what> [its flags]`: a benchmark of one stage against a baseline, in one run.

Each bench owns its flags: sfumato/bench/<what>.py has `add_arguments(parser)` and `run(args)`.
The flags after WHAT are parsed by that module's parser alone (`sfumato bench train --help` lists
them), so a flag means one thing per bench, and a bench module (some need torch) is imported only
when its bench is asked for.
"""

from __future__ import annotations

import argparse
import importlib

from sfumato.cli.command import VERBOSE_HELP, Command

# What each bench measures (its module's docstring says how).
BENCHES = {
    "ingest": "Ray Data ingest and shards vs multiprocessing.Pool, at 1x and --memory-scale x the data",
    "train": "Ray Train + DeepSpeed vs a plain PyTorch loop; --gpu: the DeepSpeed step alone on one GPU, MFU",
    "dedup": "FAISS near-duplicate search at scale; the embedding stage vs a plain loop",
    "export": "the denoiser step: torch eager vs ONNX fp32 vs ONNX INT8",
    "serve": "HTTP load at concurrency 1/8/32, batching on and off, the safety filter's price",
    "tune": "a sweep with ASHA and with every trial to the end",
    "quality": "time to quality at equal CPU time: a tutorial trainer vs sfumato's recipes",
    "finetune": "LoRA vs full fine-tuning of a trained run: effect, time, memory",
    "align": "A/B votes by a scripted judge -> Diffusion-DPO -> win rate, FD",
    "compositional": "the GenEval-style judge: rendered scenes, wrong prompts, noise; same seed, same numbers",
    "models": "every preset's parameters and FLOPs at 256 px latent; the CPU training step of the pilots' sizes",
    "cache": "the latent cache: a step on cached latents vs the VAE in the step; bytes per image, build rate",
}


def bench_parser(what: str) -> argparse.ArgumentParser:
    """The parser of `sfumato bench <what>`: the bench module's own flags."""
    module = importlib.import_module(f"sfumato.bench.{what}")
    parser = argparse.ArgumentParser(
        prog=f"sfumato bench {what}",
        description=module.__doc__ or BENCHES[what],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


class Bench(Command):
    name = "bench"
    help = "measure a stage against a baseline in the same run"

    def add_arguments(self, parser):
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.description = "\n".join(
            [
                f"{self.help}:",
                "",
                *(f"  {name:9} {text}" for name, text in BENCHES.items()),
                "",
                "Each bench's flags: sfumato bench WHAT --help",
            ]
        )
        parser.add_argument("what", choices=list(BENCHES), metavar="WHAT", help=", ".join(BENCHES))
        parser.add_argument(
            "arguments",
            nargs=argparse.REMAINDER,
            metavar="...",
            help="the bench's own flags and (finetune, align) dotted overrides",
        )

    def finish_parsing(self, args, parser):
        # Options and dotted overrides may interleave (`--sides lora finetune.lora.rank=4 --samples 256`).
        bench_args = bench_parser(args.what).parse_intermixed_args(args.arguments)
        bench_args.command, bench_args.what = args.command, args.what
        bench_args.verbose = args.verbose or getattr(bench_args, "verbose", False)
        return bench_args

    def run(self, args):
        importlib.import_module(f"sfumato.bench.{args.what}").run(args)
        return 0
