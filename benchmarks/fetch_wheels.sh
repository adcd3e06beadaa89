#!/usr/bin/env bash
# (Run with sdsctl's environment active: the versions are those installed here.)
# Wheels the GPU machine lacks (it has torch, transformers, peft, typer, rich, pluggy, pyyaml; not
# diffusers, pydantic, nor the 3D checks' trimesh, embreex, rtree, imageio) into .whl/, for
# benchmarks/gpu.sh (scikit-image is left out: the checks extract no mesh). Run here, where PyPI is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
  "diffusers==$(python3 -c 'import diffusers; print(diffusers.__version__)')" \
  "pydantic==$(python3 -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic-core==$(python3 -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  "trimesh==$(python3 -c 'import trimesh; print(trimesh.__version__)')" \
  "imageio==$(python3 -c 'import imageio; print(imageio.__version__)')" embreex rtree \
  annotated-types typing-inspection importlib-metadata zipp "setuptools>=77"
ls -la .whl
