"""What a person sees on the console: sfumato's own lines, progress with a rate and an ETA, and
every real warning and error. The chatter of the libraries underneath is quiet unless
`sfumato --verbose ...` (which sets SFUMATO_VERBOSE=1; `init_ray` hands it to every Ray process).

Quiet by default, each for a named reason:
- Python logging: the root logger at WARNING, `sfumato.*` at INFO (third-party INFO lines such as
  onnxscript's rewriter, matplotlib's font cache or onnxruntime's quantizer hint stay out).
- Ray Data, in the driver: `DataContext.print_on_execution_start = False` (no "Starting execution
  of Dataset ..." and "Execution plan of Dataset ..." pair per dataset), and its console handler
  shows only warnings, errors and the progress lines Ray logs in place of bars when stdout is not
  a terminal. The session's `logs/ray-data/` files still get everything.
- Ray Train: `RunConfig(logging_config=LoggingConfig("WARNING"))` (`train_log_level`): no
  "Requesting resources", "Attempting to start training worker group", "Setting up process group"
  lines. Errors stay: a worker's traceback still prints, and the trainer says which attempt it is.
- HARMLESS_WARNINGS and HARMLESS_LOGS below: known, harmless, each with why.
- HARMLESS_WORKER_LINES: lines of Ray's worker processes that the driver would print (Ray
  forwards every worker's stdout and stderr to it), known and harmless, each with why; the
  session's `logs/worker-*.out|err` files still get them.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VERBOSE_ENV = "SFUMATO_VERBOSE"
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress.logging_progress"  # Ray's bars when stdout is no tty

# (category, message regex, why it is harmless here)
HARMLESS_WARNINGS = [
    (
        FutureWarning,
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        "DeepSpeed's ZeRO calls the old name; torch still runs it",
    ),
    (
        FutureWarning,
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "torch.export's own internals, raised while exporting to ONNX",
    ),
    (
        UserWarning,
        r"# The axis name: .* will not be used, since it shares the same shape constraints",
        "torch.onnx merges the export's dynamic axes that are one and the same",
    ),
]
# (logger name, message regex of the records it drops, why it is harmless here); "" is the root logger
HARMLESS_LOGS = [
    (
        "torch.onnx._internal.exporter._registration",
        r"torchvision is not installed",
        "the ONNX exporter's optional torchvision ops: sfumato never installs torchvision (ARCHITECTURE.md)",
    ),
    (
        "",
        r"Please consider to run pre-processing before quantization",
        "onnxruntime's hint; export quantises a copy without recorded shapes on purpose (onnx_export.quantize_int8)",
    ),
    (
        "",
        r"DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully",
        "DeepSpeed prints it per rank and start; under Ray Train's print patch it comes twice: this drops "
        "the logged copy (HARMLESS_WORKER_LINES the printed one)",
    ),
]
# (regex of a line a Ray worker writes, why it is harmless here): dropped where the driver prints
# the workers' output, by Ray's own log filter (its RAY_DEDUP_LOGS_SKIP_REGEX).
HARMLESS_WORKER_LINES = [
    (
        r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the "
        r"object store and max_restarts > 0",
        "Ray Train's controller starts a PreemptionWatcher actor per worker group with max_restarts=-1 and the "
        "workers' handles as constructor arguments, which Ray holds in its object store; Ray Core logs this at "
        "ERROR level for any such actor (ray-project/ray#53727). "
        "It is a notice about a restart that has not happened, not an error; the watcher is killed when the group "
        "stops. Turning the watcher off (RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0) would lose Ray Train's handling of "
        "node preemption on clusters, so the line is hidden instead",
    ),
    (
        r"DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully",
        "DeepSpeed's torch backend builds (or loads from its cache) its shared-memory collectives op on every rank "
        "at each start and prints this; a failed build raises, so the success line says nothing",
    ),
]


def set_verbose() -> None:
    """This process and (through init_ray's runtime_env) every Ray process it starts."""
    os.environ[VERBOSE_ENV] = "1"


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def ray_env_vars() -> dict[str, str]:
    """For ray.init's runtime_env: every task, actor and Train worker of the job sees the choice."""
    return {VERBOSE_ENV: os.environ[VERBOSE_ENV]} if VERBOSE_ENV in os.environ else {}


def configure_logging() -> None:
    """The CLI's logging: one format, sfumato's INFO lines; the rest at WARNING unless verbose."""
    verbose = is_verbose()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("sfumato").setLevel(logging.INFO)
    if not verbose:
        quiet_harmless()


def quiet_harmless() -> None:
    """Drop HARMLESS_WARNINGS and HARMLESS_LOGS in this process (the driver, or a training worker)."""
    for category, message, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, message, _why in HARMLESS_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == message for f in logger.filters):
            logger.addFilter(_DropMatching(message))


def quiet_ray_data() -> None:
    """Ray Data's driver console: no execution-start blocks; warnings, errors and progress only."""
    if is_verbose():
        return
    import ray.data

    ray.data.DataContext.get_current().print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        # The console handler (Ray's PlainRayHandler); the file handlers keep every record.
        if isinstance(handler, logging.StreamHandler) and not any(
            isinstance(f, _RayDataConsole) for f in handler.filters
        ):
            handler.addFilter(_RayDataConsole())


def quiet_ray_workers() -> None:
    """The driver's console: HARMLESS_WORKER_LINES of Ray's workers are not printed. Ray reads
    RAY_DEDUP_LOGS_SKIP_REGEX once, when it is imported, into the two log deduplicators that every
    forwarded line passes (stdout and stderr); this adds to their skip pattern (a user's own
    RAY_DEDUP_LOGS_SKIP_REGEX kept). With RAY_DEDUP_LOGS=0 Ray prints every line unfiltered."""
    if is_verbose():
        return
    from ray._private import ray_logging

    users = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    patterns = ([users] if users else []) + [pattern for pattern, _why in HARMLESS_WORKER_LINES]
    skip = re.compile("|".join(f"(?:{pattern})" for pattern in patterns))
    for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        if not hasattr(dedup, "skip_re"):  # a Ray other than the pinned 2.60 may lay it out differently
            logging.getLogger(__name__).warning(
                "Ray's log deduplicator has no skip_re: known-harmless worker "
                "lines will be printed (sfumato.console.HARMLESS_WORKER_LINES)"
            )
            return
        dedup.skip_re = skip


def train_log_level() -> str:
    """For ray.train.LoggingConfig: Ray Train's own INFO lines only when verbose."""
    return "INFO" if is_verbose() else "WARNING"


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class _RayDataConsole(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name == RAY_DATA_PROGRESS_LOGGER


# ------------------------------------------------------------------------------ progress text
def duration(seconds: float) -> str:
    """4:05, 1:02:03."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def bar(fraction: float, width: int = 20) -> str:
    """[#######.............]  35%: plain characters, one line (Ray forwards worker output by line)."""
    fraction = min(1.0, max(0.0, fraction))
    filled = int(fraction * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:3.0f}%"


def progress_text(done: int, total: int, seconds: float, unit: str) -> str:
    """`32/1000 images [#...]  3% | 10.1 images/s | 0:03 elapsed | ETA 1:35` for a loop whose items
    cost about the same (the ETA is the remaining items at the rate so far)."""
    rate = done / seconds if seconds > 0 else 0.0
    eta = f"ETA {duration((total - done) / rate)}" if rate > 0 else "ETA ?"
    return (
        f"{done}/{total} {unit} {bar(done / total if total else 1.0)} | {rate:.1f} {unit}/s | "
        f"{duration(seconds)} elapsed | {eta}"
    )
