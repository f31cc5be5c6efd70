"""The config tree: unknown keys and bad values fail at load, naming the dotted key."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from sfumato.config import ConfigError, apply_override, dump_yaml, load_config

REPO = Path(__file__).resolve().parents[2]
PILOT = REPO / "configs" / "pilot.yaml"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    # scale.yaml reads its sources from a cluster's shared storage, which this machine lacks.
    assert load_config(path, inputs=path.name != "scale.yaml").name


def test_unknown_key_is_named_by_dotted_path():
    with pytest.raises(ConfigError, match=r"data\.ingest\.min_sid_px: unknown key"):
        load_config(PILOT, ["data.ingest.min_sid_px=3"])


def test_unknown_key_inside_a_source_is_named_without_the_union_tag():
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.colour: unknown key"):
        load_config(PILOT, ["data.sources.0.colour=red"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.ingest.min_side_px=0", "data.ingest.min_side_px"),
        ("data.ingest.max_aspect_ratio=0.5", "data.ingest.max_aspect_ratio"),
        ("data.shards.resize_mode=stretch", "data.shards.resize_mode"),
        ("data.shards.resolutions_px=[32,32]", "data.shards.resolutions_px"),
        ("data.ingest.allowed_formats=[JPEG,XCF]", "data.ingest.allowed_formats.1"),
        ("data.ingest.download.timeout_s=0", "data.ingest.download.timeout_s"),
        ("data.loader.resolution_px=48", "data"),
        ("name=has space", "name"),
    ],
)
def test_bad_values_fail_at_load_with_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(PILOT, [override])
    assert f"  {key}" in str(err.value)


def test_missing_source_folder_is_reported_with_its_key(tmp_path):
    sources = f"[{{kind: folder, name: photos, path: {tmp_path / 'nope'}, license: CC0-1.0}}]"
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.path: .*does not exist"):
        load_config(PILOT, [f"data.sources={sources}"])


def test_a_run_folder_config_loads_for_its_outputs_after_its_sources_are_gone(tmp_path):
    """evaluate / report / export read a run folder, not the data sources: a run copied off the
    cluster whose source folders are not here still loads, and the next check is strict again."""
    gone = tmp_path / "photos"
    gone.mkdir()
    sources = f"[{{kind: folder, name: photos, path: {gone}, license: CC0-1.0}}]"
    from sfumato.config import write_resolved

    write_resolved(load_config(PILOT, [f"data.sources={sources}"]), tmp_path / "config.yaml")
    gone.rmdir()
    cfg = load_config(tmp_path / "config.yaml", inputs=False)
    assert cfg.data.sources[0].path == gone
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "config.yaml")


def test_source_names_must_be_unique(tmp_path):
    sources = "[{kind: demo, name: a}, {kind: demo, name: a}]"
    with pytest.raises(ConfigError, match="source names must be unique"):
        load_config(PILOT, [f"data.sources={sources}"])


def test_overrides_parse_yaml_values_and_address_list_items():
    cfg = load_config(PILOT, ["data.shards.resolutions_px=[128,32,16]", "data.sources.0.num_images=7", "seed=3"])
    assert cfg.data.shards.resolutions_px == [16, 32, 128]
    assert cfg.data.sources[0].num_images == 7
    assert cfg.seed == 3


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override({"name": "x"}, "name.sub", 1)
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(PILOT, ["seed"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(PILOT, ["seed=5"])
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_yaml(cfg))
    assert load_config(resolved) == cfg
    assert cfg.data.output_dir.is_absolute()


def test_config_is_frozen():
    cfg = load_config(PILOT)
    with pytest.raises(ValidationError):
        cfg.seed = 1


def test_source_weights_are_set_on_every_source_or_none_and_normalised():
    two = "[{kind: demo, name: photos, weight: %s}, {kind: demo, name: synthetic%s}]"
    with pytest.raises(ConfigError, match=r"data: sources\.1\.weight unset"):
        load_config(PILOT, [f"data.sources={two % (9, '')}"])
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.weight: .*greater than or equal to 0"):
        load_config(PILOT, [f"data.sources={two % (-1, ', weight: 1')}"])
    assert load_config(PILOT, [f"data.sources={two % (9, ', weight: 1')}"]).data.source_weights == {
        "photos": pytest.approx(0.9),
        "synthetic": pytest.approx(0.1),
    }
    assert load_config(PILOT).data.source_weights is None


@pytest.mark.parametrize("key", ["train.sample.guidance_interval", "evaluate.guidance_interval"])
def test_a_guidance_interval_is_two_noise_levels_in_order_and_a_bad_one_names_its_key(key, tmp_path):
    section = (lambda cfg: cfg.train.sample) if key.startswith("train.") else (lambda cfg: cfg.evaluate)
    assert section(load_config(PILOT)).guidance_interval is None, "by default guidance at every step"
    cfg = load_config(PILOT, [f"{key}=[0.2, 0.8]"])
    assert section(cfg).guidance_interval == (0.2, 0.8)
    (tmp_path / "resolved.yaml").write_text(dump_yaml(cfg))
    assert load_config(tmp_path / "resolved.yaml") == cfg, "the resolved config a run writes reads back"
    for value, says in [
        ("[0.8, 0.2]", "must be [lo, hi] with 0 <= lo <= hi <= 1, got [0.8, 0.2]"),
        ("[-0.1, 0.5]", "0 <= lo <= hi <= 1"),
        ("[0.5, 1.5]", "0 <= lo <= hi <= 1"),
        ("[.nan, 0.5]", "0 <= lo <= hi <= 1"),
        ("[0.5]", "2 numbers, not 1"),
        ("[0.1, 0.5, 0.9]", "2 numbers, not 3"),
        ("[true, 1]", "valid number"),
        ('["0.2", 0.8]', "valid number"),
        ("0.5", "valid tuple"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(PILOT, [f"{key}={value}"])
        assert f"  {key}" in str(err.value) and says in str(err.value), (value, str(err.value))
