#!/usr/bin/env bash
# What a lent GPU machine lacks for benchmarks/gpu_e2e.py, as wheels in .whl/ (ignored by git; ~6.4 MiB): TRL and
# the packages it needs that the GPU image does not hold, and DeepSpeed (PyPI has only its sdist: built here into a
# pure-Python wheel with DS_BUILD_OPS=0; it picks CUDA at run time and compiles no op the run uses) with its missing
# dependencies. The image's Python is 3.12 (README, "On a GPU"). Also records the commit the run measures.
# Run from the repository root with the project's virtualenv: bash benchmarks/gpu_wheels.sh
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 pydantic==2.13.4 \
  pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
tmp=$(mktemp -d)
"$py" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" deepspeed==0.19.8
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation --no-index -w .whl "$tmp"/deepspeed-0.19.8.tar.gz
rm -rf "$tmp"
echo "$(git rev-parse --short=12 HEAD)$(git status --porcelain --untracked-files=no | grep -q . && echo -dirty)" > .whl/GIT_SHA
ls -l .whl && du -sh .whl
