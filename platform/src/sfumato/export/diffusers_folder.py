"""The EMA weights of a checkpoint as a diffusers folder that loads without sfumato:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(class_labels=[0, 1], num_inference_steps=30).images   # or prompt=[...]

The folder holds the denoiser (unet/), the scheduler, and for text models the text encoder and
tokenizer, for latent models the VAE, all weights as safetensors; the pipeline's code is
sfumato.diffusion.pipeline, copied in as sfumato_pipeline.py (it imports only torch and
diffusers), and model_index.json names it. A DiT's network is sfumato's own class
(sfumato.models.dit, also torch and diffusers only): its file goes into unet/ as sfumato_dit.py
and model_index.json's "unet" entry names it, diffusers' custom-component layout
(`<component>/<module>.py`). `trust_remote_code` is diffusers' switch for loading code shipped
inside the folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import sfumato.diffusion.pipeline as pipeline_module
import sfumato.models.dit as dit_module
from sfumato.layout import EXPORT_META

PIPELINE_FILE = "sfumato_pipeline"
# sfumato's network modules that an export ships as code: module -> its file's name in the
# component's folder. Any other sfumato class in model_index.json would not load without sfumato.
SHIPPED_MODULES = {dit_module.__name__: ("sfumato_dit", dit_module.__file__)}


def write_diffusers(pipe, out_dir: Path, meta: dict) -> Path:
    """Save the pipeline to out_dir (replaced whole: written beside it, then renamed)."""
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    pipe.save_pretrained(work, safe_serialization=True)
    shutil.copyfile(pipeline_module.__file__, work / f"{PIPELINE_FILE}.py")
    index_path = work / "model_index.json"  # diffusers' own file
    index = json.loads(index_path.read_text())
    index["_class_name"] = [PIPELINE_FILE, "SfumatoPipeline"]
    for component, entry in index.items():
        library = entry[0] if isinstance(entry, list) and entry and isinstance(entry[0], str) else ""
        if component == "_class_name" or not library.startswith("sfumato"):
            continue
        if library not in SHIPPED_MODULES:
            raise RuntimeError(
                f"the export's {component} is {library}.{entry[1]}, a sfumato class whose code the export does "
                f"not ship (it ships {sorted(SHIPPED_MODULES)}): the folder would not load without sfumato"
            )
        name, source = SHIPPED_MODULES[library]
        shutil.copyfile(source, work / component / f"{name}.py")
        index[component] = [name, entry[1]]
    index_path.write_text(json.dumps(index, indent=2))
    (work / EXPORT_META).write_text(json.dumps(meta, indent=1))
    pickles = [p for p in work.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    if pickles:
        raise RuntimeError(f"the export wrote pickled weights {pickles}: it must hold safetensors only")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    return out_dir
