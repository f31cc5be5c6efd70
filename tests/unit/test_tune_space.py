"""The sweep's configs, without Ray: proxies and search spaces are checked at load, naming the
key; the best trial goes back to the full run with only its tuned values, the learning rate moved
by the stated rule."""

import math
from pathlib import Path

import pytest

from sfumato.config import ConfigError, apply_override, load_config
from sfumato.tune.space import best_run_config, proxy_tree, trial_config, validated

DEBUG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"


def test_dotted_keys_inside_a_mapping_are_addressed_whole():
    tree = {"tune": {"search_space": {"train.optimizer.lr": {"low": 1, "high": 2}}}}
    apply_override(tree, "tune.search_space.train.optimizer.lr.high", 3)
    assert tree["tune"]["search_space"]["train.optimizer.lr"] == {"low": 1, "high": 3}


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "tune.search_space.train.optimizer.lr.high=2",
            r"tune\.search_space\.train\.optimizer\.lr = 2\.0.*\n.*train\.optimizer\.lr",
        ),
        ("tune.proxy.train.optimizer.lr=0.1", r"tune\.search_space\.train\.optimizer\.lr is also set by tune\.proxy"),
        ("tune.proxy.train.validation=null", r"the proxy has no train\.validation"),
        ("tune.scheduler.grace_period_steps=12", r"grace_period_steps=12 is not below the proxy's 12 steps"),
        ("tune.proxy.train.stages=[{resolution_px: 64, steps: 12, micro_batch_size: 8}]", r"64.*does not produce"),
        ("tune.search_space.train.grad_accum_steps.values=[1,0]", r"grad_accum_steps = 0"),
        ("tune.search_space.train.optimizer.lr.low=-1", r"log_uniform needs low > 0"),
    ],
)
def test_a_bad_sweep_fails_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEBUG, [override])


def test_a_trial_is_the_proxy_with_its_values_in_its_own_folder(tmp_path):
    cfg = load_config(DEBUG)
    params = {"train.optimizer.lr": 3e-4, "train.grad_accum_steps": 2, "train.ema.halflife_samples": 100.0}
    trial = trial_config(cfg, params, tmp_path / "t1", "debug-t1")
    assert trial.train.output_dir == tmp_path / "t1" and trial.name == "debug-t1"
    assert trial.train.num_workers == 1 and [s.resolution_px for s in trial.train.stages] == [16]
    assert trial.train.optimizer.lr == 3e-4 and trial.train.grad_accum_steps == 2
    assert trial.train.mean_effective_batch == 8 * 2 * 1
    assert trial.tune is None


@pytest.mark.parametrize("rule, factor", [("sqrt", math.sqrt), ("linear", lambda r: r), ("none", lambda r: 1.0)])
def test_best_config_is_the_full_run_with_the_lr_moved_to_its_batch(rule, factor, tmp_path):
    cfg = load_config(DEBUG, [f"tune.lr_scaling={rule}"])
    params = {"train.optimizer.lr": 1e-3, "train.grad_accum_steps": 2, "diffusion.min_snr_gamma": 1.0}
    trial = trial_config(cfg, params, tmp_path / "t", "t")
    full, how = best_run_config(cfg, params, trial)
    # Debug's full run: 6 steps of micro batch 8 then 4 of 4, 2 workers, accumulation 2 (tuned).
    batch_full = (6 * 8 + 4 * 4) / 10 * 2 * 2
    assert how["effective_batch_full"] == pytest.approx(batch_full) and how["effective_batch_proxy"] == 16
    assert full.train.optimizer.lr == pytest.approx(1e-3 * factor(batch_full / 16))
    assert full.train.grad_accum_steps == 2 and full.diffusion.min_snr_gamma == 1.0
    debug = load_config(DEBUG)
    assert full.train.stages == debug.train.stages and full.train.num_workers == debug.train.num_workers
    assert full.train.validation is None and full.train.data_fraction == 1.0 and full.tune is None


def test_a_tuned_ema_decay_keeps_its_half_life_in_images(tmp_path):
    cfg = load_config(DEBUG, ["tune.search_space={train.ema.decay: {distribution: uniform, low: 0.9, high: 0.999}}"])
    trial = trial_config(cfg, {"train.ema.decay": 0.99}, tmp_path / "t", "t")
    assert trial.train.ema.halflife_samples is None  # the alternative key was cleared
    full, how = best_run_config(cfg, {"train.ema.decay": 0.99}, trial)
    steps_per_image_proxy, steps_per_image_full = 1 / how["effective_batch_proxy"], 1 / how["effective_batch_full"]
    half_life_proxy = math.log(0.5) / math.log(0.99) / steps_per_image_proxy
    half_life_full = math.log(0.5) / math.log(full.train.ema.decay) / steps_per_image_full
    assert half_life_full == pytest.approx(half_life_proxy)


def test_proxy_keys_only_touch_the_proxy():
    cfg = load_config(DEBUG)
    proxy = validated(proxy_tree(cfg), "proxy")
    assert proxy.train.data_fraction == 0.5 and cfg.train.data_fraction == 1.0
    assert proxy.train.validation is not None and cfg.train.validation is None


def test_workers_validate_configs_whose_source_folder_is_only_on_the_driver(tmp_path):
    """Trials and training workers read shards, not sources: a source folder that exists only on
    the driver's machine is not an error on theirs, for the sweep's nested proxy checks too."""
    from sfumato.config import to_dict, validate_config

    photos = tmp_path / "photos"
    photos.mkdir()
    cfg = load_config(DEBUG, [f"data.sources=[{{kind: folder, name: photos, path: {photos}, license: CC0-1.0}}]"])
    photos.rmdir()
    with pytest.raises(ValueError, match="does not exist"):
        validate_config(to_dict(cfg))
    sweep = validate_config(to_dict(cfg), inputs=False)
    trial = trial_config(sweep, {"train.optimizer.lr": 1e-3}, tmp_path / "t", "t", inputs=False)
    assert trial.data.sources[0].path == photos
