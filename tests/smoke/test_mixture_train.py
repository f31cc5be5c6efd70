"""Source mixture weights end to end on local Ray: a run draws its two sources in the configured
shares whatever their sizes, logs the realised shares, and the cards show them."""

import json
import shutil

import pytest

pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from helpers import debug_config  # noqa: E402
from sfumato.layout import read_jsonl  # noqa: E402

pytestmark = pytest.mark.slow


def test_a_run_draws_its_sources_in_their_weights_and_the_cards_say_so(tmp_path, flowers_dir, ray_local):
    from sfumato.data.ingest import run_ingest
    from sfumato.data.shards import run_shards
    from sfumato.evaluate.cards import write_run_documents
    from sfumato.train.loop import run_training

    # 48 photos of four classes ("real") and 12 of a fifth ("synthetic"), drawn 1:3.
    for cls in sorted(p.name for p in flowers_dir.iterdir()):
        shutil.copytree(flowers_dir / cls, tmp_path / ("synthetic" if cls == "tulips" else "real") / cls)
    sources = [
        {"kind": "folder", "name": "real", "path": str(tmp_path / "real"), "license": "CC-BY-2.0", "weight": 1},
        {
            "kind": "folder",
            "name": "synthetic",
            "path": str(tmp_path / "synthetic"),
            "license": "CC-BY-2.0",
            "weight": 3,
        },
    ]
    cfg = debug_config(
        tmp_path,
        sources,
        f"train.output_dir={tmp_path / 'run'}",
        "data.shards.samples_per_shard=12",
        "train.stages=[{resolution_px: 16, steps: 10, micro_batch_size: 8}]",
    )
    run_ingest(cfg)
    run_shards(cfg)
    run_training(cfg)
    logged = [m["source_shares"] for m in read_jsonl(cfg.train.output_dir / "metrics.jsonl")]
    assert len(logged) == 5 and set(logged[-1]) == {"real", "synthetic"}
    # 80 draws by rank 0: a 0.75 share has a binomial standard deviation of 0.05.
    assert abs(logged[-1]["synthetic"] - 0.75) < 4 * 0.05, logged[-1]
    documents = write_run_documents(cfg.train.output_dir, cfg.data.output_dir)
    card = json.loads(documents["dataset_card"].with_suffix(".json").read_text())
    assert card["mixture"]["weights"] == {"real": 0.25, "synthetic": 0.75}
    assert card["mixture"]["realised"] == logged[-1]
