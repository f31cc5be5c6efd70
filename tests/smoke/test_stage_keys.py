"""Every stage reads only the config keys it declares in sfumato.stages: its pipeline fingerprint
hashes exactly those, so a key it read without declaring could change without the stage running
again (the drift issue 15 found: dedup read `seed`, shards `data.ingest`, neither declared).

The stages run for real on a tiny demo config, each inside a recorder of the keys the driver
reads (tests/keys.py); Ray tasks' and workers' reads happen in other processes and are not seen."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from helpers import REPO, save_tiny_vae  # noqa: E402
from keys import key_recorder, undeclared  # noqa: E402
from sfumato.config import VAEConfig, load_config  # noqa: E402
from sfumato.stages import LOCATION_KEYS, REGISTRY  # noqa: E402


def test_every_stage_reads_only_the_config_keys_it_declares(tmp_path, monkeypatch, ray_local):
    cfg = load_config(
        REPO / "configs" / "debug.yaml",
        [
            f"data.output_dir={tmp_path / 'data'}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.num_workers=1",
            "train.stages=[{resolution_px: 16, steps: 2, micro_batch_size: 8}]",
            "evaluate.num_samples=8",
            "evaluate.domain.epochs=2",
            "export.int8=false",
        ],
    )
    read = {}
    with key_recorder(monkeypatch) as recorder:
        for name in ("ingest", "shards", "dataloader", "train", "evaluate", "export"):
            with recorder.recording():
                REGISTRY[name].run(cfg)
            read[name] = set(recorder.keys)
        # The latent cache runs for latent runs only: the same shards through a tiny local VAE.
        save_tiny_vae(tmp_path / "pretrained")
        latent = cfg.model_copy(
            update={
                "train": cfg.train.model_copy(
                    update={"vae": VAEConfig(pretrained=str(tmp_path / "pretrained"), subfolder="vae")}
                )
            }
        )
        with recorder.recording():
            REGISTRY["cache"].run(latent)
        read["cache"] = set(recorder.keys)
    for name, keys in read.items():
        assert keys, f"the recorder saw no key read by {name}: it is not recording"
        # The stages after training read the trained run's resolved config (its train.* and
        # diffusion.* describe the model they evaluate or export): what those keys decide reaches
        # them through the training's output hash. Every other stage declares what it reads.
        after_training = "train" in REGISTRY[name].reads(cfg)
        allowed = REGISTRY[name].keys + (upstream_keys(name, cfg) if after_training else ()) + LOCATION_KEYS
        extra = undeclared(keys, allowed)
        assert not extra, f"stage {name} reads {extra} but declares only {REGISTRY[name].keys} (sfumato/stages.py)"
    # The check can fail: the shards stage's declaration before this test existed missed a key.
    assert undeclared(read["shards"], ("seed", "data.shards") + LOCATION_KEYS)


def upstream_keys(name: str, cfg) -> tuple[str, ...]:
    """The keys of every stage `name` reads from, transitively."""
    keys, todo, seen = (), list(REGISTRY[name].reads(cfg)), set()
    while todo:
        stage = todo.pop()
        if stage not in seen:
            seen.add(stage)
            keys += REGISTRY[stage].keys
            todo += REGISTRY[stage].reads(cfg)
    return keys
