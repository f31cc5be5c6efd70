"""Training on local Ray: 2 workers, DeepSpeed ZeRO-2 on gloo, tiny UNet, real CIFAR-10 images.

A run killed mid-way (a worker process dies; Ray restarts the group) ends with the same weights
as an uninterrupted run; a run that produces non-finite values stops with a clear error and is
not retried."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")


from helpers import WATCH  # noqa: E402
from helpers import run_config as _cfg  # noqa: E402
from sfumato import checkpoint as ckpt  # noqa: E402
from sfumato.layout import RunFolder, read_jsonl  # noqa: E402
from sfumato.train.faults import KillWorkerAt, PoisonWeightsAt  # noqa: E402
from sfumato.train.loop import run_training  # noqa: E402
from sfumato.train.step import NonFiniteError  # noqa: E402


def test_killed_worker_resumes_to_the_same_weights(cifar_shards, straight):
    killed = _cfg(cifar_shards, "killed", WATCH)
    run_training(killed, hooks=[KillWorkerAt(7)])  # after the step-5 checkpoint
    assert (killed.train.output_dir / ".injected").read_text() == "7", "the failure really happened"
    attempts = [json.loads(x) for x in (killed.train.output_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["resumed_from"] for a in attempts] == [None, "step-00000005"]
    a = ckpt.latest(straight.train.output_dir / "checkpoints")
    b = ckpt.latest(killed.train.output_dir / "checkpoints")
    assert a.name == b.name == "step-00000010"
    ema_a, ema_b = ckpt.load_ema(a), ckpt.load_ema(b)
    assert ema_a.keys() == ema_b.keys()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a), "EMA weights differ after resume"
    model_a = torch.load(a / "deepspeed" / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    model_b = torch.load(b / "deepspeed" / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a), "weights differ after resume"
    # The run did what a user expects: curriculum, samples, metrics, retention.
    metrics = [json.loads(line) for line in (straight.train.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["resolution_px"] for m in metrics][-1] == 32 and metrics[-1]["step"] == 10
    assert metrics[0]["effective_batch"] == 16 and metrics[-1]["effective_batch"] == 8
    # The EMA's beta follows each stage's batch, so its half-life in images (500) holds across them.
    assert metrics[0]["ema_beta"] < metrics[-1]["ema_beta"]
    assert [round(m["ema_halflife_images"], 6) for m in metrics] == [500.0] * len(metrics)
    # The logged loss average continues across the restart (its state is in the checkpoint).
    killed_metrics = read_jsonl(RunFolder(killed.train.output_dir).metrics)
    assert killed_metrics[-1]["step"] == 10 and killed_metrics[-1]["loss_ema"] == metrics[-1]["loss_ema"]
    # Steps 6 and 7, logged before the worker died and again after the resume, appear once.
    assert [m["step"] for m in killed_metrics] == [m["step"] for m in metrics]
    # The killed run also watched its quality (train.quality, every 2 steps) and `straight` did not:
    # the weights are bitwise equal above, so watching changes nothing in training. Each check,
    # step 6's too (logged before the kill and again after the resume), is written once.
    watched = [m for m in killed_metrics if "watch_fd_domain" in m]
    assert [m["step"] for m in watched] == [2, 4, 6, 8, 10] and not any("watch_fd_domain" in m for m in metrics)
    assert all(0 <= m["watch_class_accuracy"] <= 1 and m["watch_fd_domain"] > 0 for m in watched)
    assert all(m["watch_samples"] == 8 for m in watched)
    from sfumato.evaluate.cards import write_run_documents

    write_run_documents(killed.train.output_dir, killed.data.output_dir)
    report = (killed.train.output_dir / "report.md").read_text()
    assert "Class accuracy during training" in report and "FD-domain during training" in report
    assert metrics[-1]["eta_s"] == 0 and metrics[-1]["elapsed_s"] > 0
    assert (straight.train.output_dir / "samples" / "step-00000010.png").exists()
    assert len(ckpt.committed(straight.train.output_dir / "checkpoints")) == 2


def test_nan_on_one_rank_stops_every_rank_without_retry(cifar_shards):
    cfg = _cfg(cifar_shards, "nan")
    with pytest.raises(NonFiniteError, match="non-finite loss at step 3"):
        run_training(cfg, hooks=[PoisonWeightsAt(3)])
    stopped = json.loads((cfg.train.output_dir / "STOPPED.json").read_text())
    assert stopped["step"] == 3
    assert ckpt.latest(cfg.train.output_dir / "checkpoints") is None, "nothing after the NaN was saved"
    attempts = (cfg.train.output_dir / "attempts.jsonl").read_text().splitlines()
    assert len(attempts) == 1, "a NaN stop is not retried"


def test_text_conditional_run_trains_its_own_tokenizer_and_encoder(text_run):
    cfg = text_run
    run = cfg.train.output_dir
    # No WANDB_API_KEY here: wandb logs offline into the run folder, metrics included.
    (wandb_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"loss_ema" in wandb_file.read_bytes() and b"samples_per_s" in wandb_file.read_bytes()
    prompts = json.loads((run / "text" / "sample_prompts.json").read_text())
    assert len(prompts) == 4 and all(p.startswith("a photo of a ") for p in prompts), prompts
    from sfumato.models.text import load_run_tokenizer, tokenize

    tokenizer = load_run_tokenizer(run)
    ids = tokenize(tokenizer, ["a photo of a frog"], 12)[0].tolist()
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a frog"
    assert len(ids[1 : ids.index(tokenizer.eos_token_id)]) == 5, "the manifest's caption words became whole tokens"
    ema = ckpt.load_ema(ckpt.latest(run / "checkpoints"))
    assert any(k.startswith("text_encoder.") for k in ema), "the text encoder is part of the averaged model"
    assert (run / "samples" / "step-00000010.png").exists()
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 10 and all(m["loss"] == m["loss"] for m in metrics)


def test_latent_run_trains_through_a_local_pretrained_vae(cifar_shards, latent_run):
    bad = _cfg(cifar_shards, "latent-bad", f"train.vae.pretrained={cifar_shards / 'nowhere'}")
    with pytest.raises(ValueError, match="train.vae.pretrained=.*has no readable AutoencoderKL config"):
        run_training(bad)
    cfg = latent_run
    run = cfg.train.output_dir
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 10 and all(m["loss"] == m["loss"] for m in metrics)
    # The 32 px stage's grid: 16x16 latents sampled, decoded back to 32 px images (2x2 grid).
    from PIL import Image

    assert Image.open(run / "samples" / "step-00000010.png").size == (64, 64)
    ema = ckpt.load_ema(ckpt.latest(run / "checkpoints"))
    assert ema["net.conv_in.weight"].shape[1] == 4, "the denoiser sees the VAE's 4 latent channels"
    assert not any(k.startswith("vae") for k in ema), "the frozen VAE is not part of the trained state"


def test_latent_cache_is_built_once_per_vae_and_holds_its_posterior(cifar_shards, latent_run):
    """The latent run's cache (built before it trained): a second build encodes nothing, nor does
    one with another scaling factor (applied when training draws); a killed build redoes only the
    file it had not finished; another VAE gets its own cache, the first one kept; what is stored
    is the VAE's posterior of each shard image, found by the sample's id."""
    import csv

    from diffusers import AutoencoderKL

    from sfumato.config import VAEConfig
    from sfumato.data.loader import iter_batches, shard_paths
    from sfumato.layout import CacheFolder, DataFolder, temporary_sibling
    from sfumato.models.cache import LATENT_MEAN, LATENT_STD, LatentCache, cache_folder, run_cache
    from sfumato.models.vae import LatentCodec

    cfg = latent_run
    with DataFolder(cfg.data.output_dir).shard_folder.manifest.open() as fh:
        shards = list(csv.DictReader(fh))  # 16 and 32 px: both divide into the VAE's 2x2 cells
    again = run_cache(cfg)
    assert (again.built, again.reused, again.files) == (0, len(shards), len(shards))
    assert again.samples == sum(int(r["sample_count"]) for r in shards)
    meta = json.loads(cache_folder(cfg).meta.read_text())
    # float16 mean and std of 4x8x8 latents: 2 x 512 bytes, plus the file's header and ids.
    assert 1024 <= meta["resolutions"]["16"]["bytes_per_sample"] < 1150, meta
    assert (
        run_cache(
            _cfg(
                cifar_shards,
                "latent",
                f"train.vae.pretrained={cifar_shards / 'pretrained'}",
                "train.vae.subfolder=vae",
                "train.vae.scaling_factor=0.3",
            )
        ).built
        == 0
    )

    folder = cache_folder(cfg)
    CacheFolder.sidecar(folder.shard(32, 1)).unlink()  # killed before its completion marker
    temporary_sibling(folder.shard(16, 0)).write_bytes(b"half a file")
    resumed = run_cache(cfg)
    assert (resumed.built, resumed.reused) == (1, len(shards) - 1)
    assert not any(p.name.startswith(".") for p in folder.resolution(16).iterdir()), "temporaries removed"

    vae = AutoencoderKL.from_pretrained(cifar_shards / "pretrained", subfolder="vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.5)
    vae.save_pretrained(cifar_shards / "other" / "vae")
    other = _cfg(cifar_shards, "latent", f"train.vae.pretrained={cifar_shards / 'other'}", "train.vae.subfolder=vae")
    built = run_cache(other)
    assert built.built == len(shards) and cache_folder(other) != folder
    assert LatentCache.open(cfg, 16) is not None, "the first VAE's cache is still complete"

    codec = LatentCodec.load(VAEConfig(pretrained=str(cifar_shards / "other"), subfolder="vae"))
    batch = next(iter_batches(shard_paths(DataFolder(cfg.data.output_dir).shards, 32)[1:], 16, 32))
    mean, std = codec.posterior(torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    cached = LatentCache.open(other, 32).lookup(batch["id"])
    torch.testing.assert_close(torch.from_numpy(cached[LATENT_MEAN]).float(), mean, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(torch.from_numpy(cached[LATENT_STD]).float(), std, rtol=2e-3, atol=2e-3)

    from sfumato.evaluate.cards import write_dataset_card

    card = write_dataset_card(cfg.data.output_dir, out=cifar_shards / "card" / "dataset_card.md").read_text()
    caches = card.split("## Latent caches")[1]
    assert folder.root.name in caches and cache_folder(other).root.name in caches
    assert f"{meta['resolutions']['16']['bytes_per_sample']:,.0f} |" in caches, "bytes per sample on the card"


def test_zero3_partitions_the_ema_and_reaches_the_zero2_weights(cifar_shards, straight):
    """ZeRO-3 shards the weights and the EMA across the 2 workers; the gathered EMA in its
    checkpoint must be the one ZeRO-2 computes with whole tensors (same data, same seed), to
    float32 reduction-order tolerance, also after a worker died and the group resumed from
    partitions loaded back from the full-tensor checkpoint."""
    cfg = _cfg(cifar_shards, "zero3", "train.zero_stage=3")
    run_training(cfg, hooks=[KillWorkerAt(7)])
    attempts = [json.loads(x) for x in (cfg.train.output_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["resumed_from"] for a in attempts] == [None, "step-00000005"]
    ema3 = ckpt.load_ema(ckpt.latest(cfg.train.output_dir / "checkpoints"))
    ema2 = ckpt.load_ema(ckpt.latest(straight.train.output_dir / "checkpoints"))
    assert ema3.keys() == ema2.keys()
    for name in ema2:
        assert ema3[name].shape == ema2[name].shape, name
        # Reduction order differs (reduce-scatter vs all-reduce) and Adam magnifies it in
        # near-zero gradients: ~2e-4 after 10 steps. A misplaced partition is off by the weights' size.
        torch.testing.assert_close(ema3[name], ema2[name], rtol=1e-3, atol=1e-3, msg=name)
    assert (cfg.train.output_dir / "samples" / "step-00000010.png").exists()
