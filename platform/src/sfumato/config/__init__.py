"""The typed config tree: load YAML, apply dotted overrides, validate, dump resolved.

Every component owns a small frozen model; unknown keys are errors that name their dotted path,
and values (ranges, enums, paths) are checked here, at load, never mid-run. Relative paths are
resolved against the current directory when the config is loaded, so the resolved config that a
run writes next to its outputs is unambiguous.

One module per section (data, diffusion, train, posttrain: finetune and align, evaluate, export,
tune), the root Config in root; base holds the frozen model every section derives from, tree the
operations on plain trees (dotted overrides, errors by dotted key, dumps, content_hash), loading
the entry points bound to the root (load_config, validate_config, validated, load_run_config).
Imports run one way, base -> sections -> tree -> tune -> root -> loading, so nothing here imports
torch or any stage. Import from `sfumato.config`: the names below are its public ones.
"""

from sfumato.config.base import ConfigError, Frozen
from sfumato.config.data import (
    SOURCE_KINDS,
    SOURCE_NAME,
    BucketsConfig,
    CacheConfig,
    CaptionConfig,
    ClipConfig,
    CurateConfig,
    DataConfig,
    DedupConfig,
    DemoSource,
    DownloadConfig,
    FolderSource,
    ImageFormat,
    IngestConfig,
    LoaderConfig,
    SafetyConfig,
    ShardsConfig,
    Source,
    TableSource,
    WebDatasetSource,
)
from sfumato.config.diffusion import (
    DiffusionConfig,
    FlowConfig,
    GuidanceInterval,
    Sampler,
    check_guidance_interval,
)
from sfumato.config.evaluate import CompositionalConfig, DomainConfig, EvaluateConfig, SegmenterConfig
from sfumato.config.export import ExportConfig
from sfumato.config.loading import load_config, load_run_config, parse_overrides, validate_config, validated
from sfumato.config.posttrain import (
    AlignConfig,
    DPOConfig,
    FinetuneConfig,
    LineageConfig,
    LoraSection,
    PostTrainingConfig,
    SelectConfig,
)
from sfumato.config.root import Config, PipelineConfig, RayConfig
from sfumato.config.train import (
    EMAConfig,
    OptimizerConfig,
    SampleConfig,
    SpikeGuardConfig,
    StageConfig,
    TextConfig,
    TrainConfig,
    VAEConfig,
    ValidationConfig,
)
from sfumato.config.tree import apply_override, content_hash, dump_yaml, to_dict, write_resolved
from sfumato.config.tune import (
    EMA_DECAY_KEY,
    EXCLUSIVE,
    LOSS_DEFINING,
    LR_KEY,
    Distribution,
    SchedulerConfig,
    SearchConfig,
    TuneConfig,
    apply,
    check_sweep,
    proxy_tree,
    run_tree,
)
