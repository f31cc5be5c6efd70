"""`sfumato bench train --gpu`'s parts that run without a GPU: the matrix's rows, the synthetic
cached batch every family trains on through the product's step, the FLOPs MFU divides by, and
the out-of-memory retry. A bench's own test; the GPU figures themselves are BENCHMARKS.md's."""

import json
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sfumato.bench import train_gpu as bench  # noqa: E402
from sfumato.models.names import TRANSFORMERS  # noqa: E402


def test_the_dit_matrix_has_every_dit_preset_from_s_up_at_256px_latent_compiled_under_zero2():
    rows = bench.MATRICES["dit"]
    assert {r.model for r in rows} == {m for m in TRANSFORMERS if not m.endswith(("-tiny", "-xs"))}
    assert len(rows) == len({r.model for r in rows}) == 12
    assert all(r.resolution_px == 256 and r.latent and r.compile and r.zero_stage == 2 for r in rows)
    assert [r.model for r in rows[:4]] == ["dit-xl", "dit-l", "dit-b", "dit-s"]  # the largest first


def test_models_select_rows_in_the_order_given_and_unknown_ones_are_refused():
    assert [r.model for r in bench.select("dit", "mmdit-xl,dit-b")] == ["mmdit-xl", "dit-b"]
    with pytest.raises(SystemExit, match="dit-xxl"):
        bench.select("dit", "dit-xxl")


@pytest.mark.parametrize("name", ["dit-tiny", "dit-text-tiny", "mmdit-tiny"])
def test_every_family_trains_on_the_cached_batch_without_running_the_vae_or_the_encoder(name):
    from sfumato.config import OptimizerConfig
    from sfumato.train.step import PlainEngine, train_step

    side, channels = bench.shape(name, 64, latent=True)
    assert (side, channels) == (8, 4)
    torch.manual_seed(0)
    model = bench.build_model(name, side, channels)
    if model.text_encoder is not None:
        model.text_encoder.register_forward_hook(lambda *_: pytest.fail("the cached states' encoder ran"))
        assert not any(p.requires_grad for p in model.text_encoder.parameters())
    state = bench.step_state(PlainEngine(model, OptimizerConfig()), name, torch.device("cpu"), torch.float32, True)
    batch = bench.synthetic_batch(name, 64, 4, latent=True)
    assert "image" not in batch  # nothing for a VAE to encode
    before = [p.detach().clone() for p in model.net.parameters()]
    losses = [float(train_step(state, batch)["loss"]) for _ in range(2)]
    assert np.isfinite(losses).all()
    assert any(not torch.equal(a, b) for a, b in zip(model.net.parameters(), before))


@pytest.mark.parametrize("name", ["dit-tiny", "mmdit-tiny"])
def test_mfu_divides_by_three_forwards_of_the_model_the_step_trains_attention_included(name):
    """The meta count equals a real forward of the step's own model counted with SDPA's math
    form (whose products the counter sees), times 3."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    side, channels = bench.shape(name, 64, latent=True)
    model = bench.build_model(name, side, channels)
    batch = bench.synthetic_batch(name, 64, 1, latent=True)
    cond = torch.from_numpy(batch["text_states"]).float() if "text_states" in batch else torch.tensor([3])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, channels, side, side), torch.tensor([500]), cond)
    assert bench.training_flops_per_sample(name, side, channels) == 3 * counter.get_total_flops()


def test_a_row_out_of_memory_is_retried_at_half_the_batch_and_other_failures_are_recorded(monkeypatch):
    batches = []

    def fake_run(cmd, capture_output, text):
        batch = int(cmd[cmd.index("--micro-batch") + 1])
        batches.append(batch)
        if cmd[cmd.index("--model") + 1] == "dit-b":
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback\nValueError: something else")
        if batch > 64:
            return subprocess.CompletedProcess(cmd, 1, "", "torch.OutOfMemoryError: CUDA out of memory. Tried ...")
        return subprocess.CompletedProcess(cmd, 0, json.dumps({"model": "dit-xl", "micro_batch": batch}) + "\n", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    row = bench.run_row(bench.GpuRow("dit-xl", 256, 256), steps=3)
    assert row["micro_batch"] == 64 and row["micro_batches_tried"] == [256, 128, 64]
    failed = bench.run_row(bench.GpuRow("dit-b", 256, 256), steps=3)
    assert failed["error"] == "ValueError: something else" and failed["micro_batches_tried"] == [256]
    assert batches == [256, 128, 64, 256]
