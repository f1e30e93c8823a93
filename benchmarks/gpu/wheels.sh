#!/usr/bin/env bash
# Download the wheels the GPU machine lacks, for its Python 3.12 on x86-64 Linux, into
# benchmarks/gpu/wheels/ (ignored by git). benchmarks/gpu/run.sh installs them there with no
# network; name the folder in the device tool's `carry` (it is ~6 MB).
#
#   bash benchmarks/gpu/wheels.sh [DEST]
#
# The machine has CUDA torch, triton, transformers, peft, accelerate, numpy, packaging, tqdm,
# psutil, PyYAML (see ENVIRONMENT.md's GPU section). It lacks, and so gets here:
#   pydantic + pydantic-core + annotated-types + typing-inspection (+ typing-extensions, in case
#     the image's is older than pydantic needs), webdataset + braceexpand, inf-cl (the peer),
#   deepspeed + hjson, einops, msgpack, ninja, py-cpuinfo (its requirements beyond the above),
#   setuptools + wheel (to build mmemb itself offline).
# Versions are the set known to work together here (ENVIRONMENT.md). DeepSpeed publishes no
# wheel of a current version (PyPI holds an sdist; its only wheel is 0.3.1.dev5 from 2020), so
# its sdist is built here into a pure-Python wheel (no precompiled ops: DS_BUILD_OPS=0; ZeRO-2
# with mmemb's torch AdamW needs none). Every other file is a binary wheel for cp312/manylinux.
# Finally every requirement of every wheel is checked against this folder plus the packages
# the machine already has, so a missing wheel shows up here, not on the GPU.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEST=${1:-$ROOT/benchmarks/gpu/wheels}
PY=${PYTHON:-python}
mkdir -p "$DEST"

# pip 23 does not widen manylinux_2_28 to the older manylinux tags a glibc-2.28 machine also
# runs, so they are listed (pydantic-core ships manylinux_2_17 wheels).
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --no-deps)
WHEELS=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  webdataset==1.0.2 braceexpand==0.1.7
  inf-cl==1.2.1
  hjson==3.1.0 einops==0.8.2 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0
  setuptools==84.2.1 wheel
)
DEEPSPEED=deepspeed==0.19.8

echo "wheels for Python 3.12 / manylinux_2_28_x86_64 -> $DEST"
"$PY" -m pip download --quiet --disable-pip-version-check "${TARGET[@]}" -d "$DEST" "${WHEELS[@]}"
if ! ls "$DEST"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  # Built here with this environment's setuptools and torch (only read at build time).
  DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation -w "$DEST" "$DEEPSPEED"
fi

# Every requirement (markers evaluated for CPython 3.12 on Linux x86-64) must be a wheel here or
# a package the GPU machine has.
"$PY" - "$DEST" <<'EOF'
import pathlib
import sys
import zipfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ON_DEVICE = {"torch", "triton", "numpy", "packaging", "tqdm", "psutil", "pyyaml",
             "transformers", "peft", "accelerate", "pillow", "safetensors", "tokenizers",
             "huggingface-hub", "click", "pluggy", "pytest", "filelock", "regex", "requests"}
env = default_environment() | {"python_version": "3.12", "python_full_version": "3.12.0",
                               "sys_platform": "linux", "platform_machine": "x86_64",
                               "implementation_name": "cpython", "extra": ""}
dest = pathlib.Path(sys.argv[1])
have = {}
for whl in sorted(dest.glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(whl.name)
    if not any(t.interpreter in ("py3", "cp312") and t.abi in ("none", "abi3", "cp312")
               and (t.platform == "any" or "x86_64" in t.platform) for t in tags):
        sys.exit(f"{whl.name}: not installable on CPython 3.12 x86-64")
    have[canonicalize_name(name)] = (version, whl)
missing = []
for name, (version, whl) in sorted(have.items()):
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        dep = canonicalize_name(req.name)
        if dep in ON_DEVICE:
            continue
        if dep not in have:
            missing.append(f"{name} {version} needs {req} (no wheel here, not on the machine)")
        elif not req.specifier.contains(have[dep][0], prereleases=True):
            missing.append(f"{name} {version} needs {req}, the wheel here is {have[dep][0]}")
for m in missing:
    print("MISSING:", m)
print(f"{len(have)} wheels: " + ", ".join(f"{n} {v}" for n, (v, _) in sorted(have.items())))
sys.exit(1 if missing else 0)
EOF
du -sh "$DEST" | awk '{print "total size: " $1}'
