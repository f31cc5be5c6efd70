#!/usr/bin/env bash
# Run HERE (the machine with sfumato installed), before a session's one call to a lent GPU.
#
# The device image has torch, transformers, safetensors, numpy, pyyaml, pyarrow, psutil, einops,
# msgpack, ninja and py-cpuinfo (.library/device/KINDS.md) but not the rest of what
# `sfumato bench train --gpu` imports (no Ray, wandb or boto3 on that path). This puts into
# .gpu-site/ (ignored by git, carried by the call) the missing packages for the device's
# Python 3.12 on x86-64, at the versions installed here: wheels from the package index, and
# DeepSpeed, which the index has no wheel of, as a tarball of its installed copy (pure Python;
# its ops are built when first used, and this step uses none of them).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.gpu-site/' .git/info/exclude || echo '/.gpu-site/' >> .git/info/exclude
rm -rf .gpu-site && mkdir -p .gpu-site
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
wheels=()
for name in diffusers pydantic pydantic-core annotated-types typing-inspection hjson; do
    wheels+=("$name==$(version "$name")")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu-site "${wheels[@]}"
site=$(python3 -c "import deepspeed, os; print(os.path.dirname(os.path.dirname(deepspeed.__file__)))" 2>/dev/null | tail -1)
tar -czf .gpu-site/deepspeed.tar.gz -C "$site" --exclude=__pycache__ deepspeed "deepspeed-$(version deepspeed).dist-info"
ls -la .gpu-site && du -sh .gpu-site
