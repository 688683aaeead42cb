#!/usr/bin/env bash
# The wheels a GPU image lacks for benchmarks/gpu_check.py: fetched here, installed there offline.
#
#   bash benchmarks/gpu_wheels.sh download [DIR]       # here, online (default DIR: dist/gpu_wheels)
#   bash benchmarks/gpu_wheels.sh install DIR TARGET   # there, offline: only what does not import already
#   PYTHONPATH=TARGET python benchmarks/gpu_check.py --out "$OUT/gpu_check"
#
# Why: the lent machine runs its own torch / transformers / Lightning (Python 3.12, CUDA 13) and reaches no
# registry, so what it lacks travels with the working tree (64 MiB in all; dist/ is git-ignored: carry
# dist/gpu_wheels). faiss-gpu does not fit: faiss-gpu-cu12 is 48 MB alone and needs the CUDA 12 runtime and
# cuBLAS wheels, which a CUDA 13 image has not. faiss-cpu (19 MB) lets reco_lightning import its faiss
# backends as usual and gives gpu_check its faiss CPU rows; gpu_check also runs without it. psutil is
# imported by reco_lightning.memory (autofaiss backend) and by transformers 5.x; Pillow by CLIP's image
# processor when torchvision is absent. Nothing here replaces a package the image has (never two faiss).
#
# Environment: PYTHON (the interpreter whose pip runs), PY_VERSION (3.12), PLATFORMS (manylinux x86_64 tags).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
default_python=python3
[[ -x "$here/.venv/bin/python" ]] && default_python="$here/.venv/bin/python"
python="${PYTHON:-$default_python}"
# pinned to what this project's tests ran with
wheels_wanted=(faiss-cpu==1.15.1 psutil==7.2.2 pillow==13.0.0)
limit=$((64 * 1024 * 1024))

download() {
    local dir="${1:-$here/dist/gpu_wheels}"
    local platforms=()
    for tag in ${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
        manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64}; do
        platforms+=(--platform "$tag")
    done
    mkdir -p "$dir"
    rm -f "$dir"/faiss_cpu-*.whl "$dir"/psutil-*.whl "$dir"/pillow-*.whl "$dir"/reco_lightning-*.whl
    "$python" -m pip download --disable-pip-version-check -q --only-binary=:all: \
        --python-version "${PY_VERSION:-3.12}" "${platforms[@]}" --no-deps -d "$dir" "${wheels_wanted[@]}"
    # the package, built from a clean copy so no stale build/ output leaks into the wheel
    local copy
    copy="$(mktemp -d)"
    trap 'rm -rf "$copy"' RETURN
    cp -r "$here/pyproject.toml" "$here/README.md" "$here/src" "$here/configs" "$copy/"
    "$python" -m pip wheel --disable-pip-version-check -q --no-deps --no-build-isolation -w "$dir" "$copy"
    local total=0 size
    for wheel in "$dir"/*.whl; do
        size=$(stat -c %s "$wheel")
        total=$((total + size))
        printf '%12d  %s\n' "$size" "$(basename "$wheel")"
    done
    printf '%12d  total (%.1f MiB of the 64 MiB a device call carries)\n' "$total" \
        "$(awk -v t="$total" 'BEGIN { print t / 1048576 }')"
    if ((total > limit)); then
        echo "error: the wheels exceed 64 MiB" >&2
        return 1
    fi
}

install() {
    local dir="${1:?usage: gpu_wheels.sh install DIR TARGET}" target="${2:?usage: gpu_wheels.sh install DIR TARGET}"
    local wheels=() module pattern
    for pair in faiss:faiss_cpu psutil:psutil PIL:pillow; do
        module="${pair%%:*}" pattern="${pair##*:}"
        if "$python" -c "import $module" 2>/dev/null; then
            echo "$module: the image's own"
        else
            wheels+=("$dir"/"$pattern"-*.whl)
        fi
    done
    wheels+=("$dir"/reco_lightning-*.whl)
    mkdir -p "$target"
    if "$python" -m pip --version >/dev/null 2>&1; then
        "$python" -m pip install --disable-pip-version-check -q --no-index --no-deps --target "$target" "${wheels[@]}"
    else  # no pip on the image: a wheel is a zip laid out for site-packages
        for wheel in "${wheels[@]}"; do "$python" -m zipfile -e "$wheel" "$target"; done
    fi
    printf 'installed into %s: %s\n' "$target" "$(for w in "${wheels[@]}"; do basename "$w"; done | tr '\n' ' ')"
    echo "run with: PYTHONPATH=$target $python benchmarks/gpu_check.py --out DIR"
}

case "${1:-}" in
    download) download "${2:-}" ;;
    install) install "${2:-}" "${3:-}" ;;
    *)
        sed -n '2,6p' "$0"
        exit 2
        ;;
esac
