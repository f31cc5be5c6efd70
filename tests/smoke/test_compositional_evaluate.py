"""The evaluate stage of a text run on the demo's scenes: the compositional yardstick's figures reach
the evaluation record, the report (table, judged grid, prompts), the model card and the stage's
summary line. The model is the smoke tier's tiny text run (its data is CIFAR-10: its images are
judged, wrongly, and the plumbing is what is tested); the segmenter is trained with tiny settings."""

import shutil

import pytest

pytest.importorskip("torch")

SCENES = "[{kind: demo, name: scenes, mode: scenes, held_out: [purple star, three squares]}]"


def test_a_text_run_on_scenes_records_and_reports_its_compositional_accuracies(text_run, tmp_path):
    from PIL import Image

    from sfumato.config import load_run_config, write_resolved
    from sfumato.data.scenes import TASKS
    from sfumato.layout import RunFolder, read_jsonl
    from sfumato.records import QualityRecord
    from sfumato.stages import REGISTRY

    run = shutil.copytree(
        text_run.train.output_dir, tmp_path / "run", ignore=lambda folder, names: [n for n in names if n == "export"]
    )
    settings = [
        f"train.output_dir={run}",
        f"data.sources={SCENES}",
        "evaluate.domain.enabled=false",
        "evaluate.num_samples=2",
        "evaluate.steps=2",
        "evaluate.guidance_scale=3",
        "evaluate.batch_size=8",
        "evaluate.captions=[a red circle]",
        "evaluate.compositional.prompts_per_task=2",
        "evaluate.compositional.images_per_prompt=2",
        "evaluate.compositional.segmenter.scenes=32",
        "evaluate.compositional.segmenter.epochs=1",
    ]
    write_resolved(load_run_config(run, settings), RunFolder(run).config)
    stage = REGISTRY["evaluate"].run(load_run_config(run))

    record = QualityRecord.from_json(read_jsonl(RunFolder(run).evaluations)[-1])
    judged = record.compositional
    assert judged is not None and set(judged.splits) == {"seen", "held_out"}
    for split, figures in judged.splits.items():
        # Up to 2 prompts per task ("a purple star" is the only held-out single object), 2 images each.
        assert set(figures["tasks"]) == set(TASKS) and figures["images"] == 2 * len(judged.per_prompt[split]), split
        assert 0 <= figures["overall"] <= 1 and set(judged.real[split]["tasks"]) == set(TASKS)
        # Beside the ceiling and the noise, the chance a model that ignores its prompt reaches (its
        # size against the ceiling is the unit test's: this segmenter is trained too little to judge).
        assert set(judged.chance[split]["tasks"]) == set(TASKS), split
        assert all(p["images"] == 2 and 0 <= p["correct"] <= 2 for p in judged.per_prompt[split])
    assert judged.held_out == ["purple star", "three squares"] and judged.segmenter["fingerprint"]
    # A guided evaluation judges the same prompts and noise at guidance 1 too (evaluate.unguided).
    assert {split: f["images"] for split, f in judged.unguided.items()} == {
        split: f["images"] for split, f in judged.splits.items()
    }
    grid = Image.open(RunFolder(run).evaluation / judged.grid)
    assert grid.height == 3 * grid.width, "a row of (up to) 2 x 2 images per task and split"
    # The record reads back as it was written, and the documents and the summary line show it.
    assert QualityRecord.from_json(record.to_json()) == record
    report = (run / "report.md").read_text()
    assert "Compositional yardstick" in report and judged.grid in report and "at guidance 1" in report
    assert judged.per_prompt["held_out"][0]["text"] in report
    assert "Compositional yardstick" in (run / "model_card.md").read_text()
    assert "GenEval-style seen" in stage.line and "held-out" in stage.line, stage.line
    assert "prompt ignored" in stage.line and "(chance)" in report, stage.line
    # The segmenter is cached in the data folder, where the next evaluation finds it.
    from sfumato.layout import DataFolder

    cached = DataFolder(load_run_config(run).data.output_dir).segmenter / judged.segmenter["fingerprint"]
    assert (cached / "segmenter.safetensors").is_file()
