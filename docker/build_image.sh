#!/usr/bin/env bash
# Build the dif_maml_dist image, also on a machine that reaches no image registry.
#
#   docker/build_image.sh [TAG]            (default TAG: dif-maml-dist:cpu)
#
# Environment (all optional):
#   BASE_IMAGE       base image (default python:3.11-slim-bookworm). If it is neither local nor pullable, a Debian
#                    bookworm base with python3 is made with debootstrap and imported as dif-maml-base:bookworm.
#   TORCH_SPEC       the torch requirement (default: torch from TORCH_INDEX_URL, the CPU wheels)
#   TORCH_INDEX_URL  where pip finds torch (default https://download.pytorch.org/whl/cpu; cu128 etc. for nccl)
#   PIP_FIND_LINKS   pip's own setting, a folder of wheels: a CPU torch wheel found there is used (offline torch)
#   PIP_CERT         pip's own setting, a CA bundle (default: /etc/ssl/certs/ca-certificates.crt): pip in the build
#                    trusts the same CAs as pip here, e.g. a TLS proxy's
#   DEBIAN_MIRROR    for debootstrap (default: the first mirror in /etc/apt, else http://deb.debian.org/debian)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tag="${1:-dif-maml-dist:cpu}"
base="${BASE_IMAGE:-python:3.11-slim-bookworm}"

have_image() { docker image inspect "$1" > /dev/null 2>&1; }

if ! have_image "$base" && ! docker pull -q "$base" > /dev/null 2>&1; then
    echo "build_image: cannot pull $base; using a Debian bookworm base made with debootstrap" >&2
    base=dif-maml-base:bookworm
    if ! have_image "$base"; then
        command -v debootstrap > /dev/null || { echo "build_image: error: no registry and no debootstrap: apt-get install debootstrap, or set BASE_IMAGE to a local image" >&2; exit 2; }
        # The host's own Debian mirror: a deb822 "URIs:" line, else a classic "deb URL suite" line.
        mirror="${DEBIAN_MIRROR:-$( { sed -nE 's#^URIs: *(https?://[^ ]*/debian/?)$#\1#p' \
            /etc/apt/sources.list.d/*.sources; sed -nE 's#^deb +(\[[^]]*\] +)?(https?://[^ ]*/debian/?) .*#\2#p' \
            /etc/apt/sources.list; } 2> /dev/null | head -n1 || true)}"
        mirror="${mirror:-http://deb.debian.org/debian}"
        rootfs="$(mktemp -d)"
        trap 'rm -rf "$rootfs"' EXIT
        debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            bookworm "$rootfs" "$mirror" > "$rootfs.log" 2>&1 \
            || { tail -n 20 "$rootfs.log" >&2; echo "build_image: error: debootstrap failed (log above)" >&2; exit 1; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$base" > /dev/null
        rm -f "$rootfs.log"
    fi
fi

# pip's own settings on this machine (environment, else pip's config files), handed to the build (both folders
# are git-ignored).
pip_setting() { python3 -m pip config get "global.$1" 2> /dev/null | head -n1 || true; }
PIP_CERT="${PIP_CERT:-$(pip_setting cert)}"
PIP_CERT="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"  # the host's CA store (with any local CAs it trusts)
PIP_FIND_LINKS="${PIP_FIND_LINKS:-$(pip_setting find-links)}"
rm -f docker/wheels/*.whl docker/certs/ca-bundle.crt
if [[ -n "${PIP_CERT:-}" && -f "$PIP_CERT" ]]; then
    cp "$PIP_CERT" docker/certs/ca-bundle.crt
fi
torch_spec="${TORCH_SPEC:-}"
index="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
if [[ -z "$torch_spec" && -n "${PIP_FIND_LINKS:-}" ]]; then
    wheel="$(ls "$PIP_FIND_LINKS"/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -n1 || true)"
    if [[ -n "$wheel" ]]; then
        cp "$wheel" docker/wheels/
        version="$(basename "$wheel" | cut -d- -f2)"
        torch_spec="torch==$version"
        index=""  # the wheel is here: no index needed for torch
        echo "build_image: torch $version from $wheel" >&2
    fi
fi

docker build --network host -f docker/Dockerfile -t "$tag" \
    --build-arg BASE_IMAGE="$base" --build-arg TORCH_SPEC="${torch_spec:-torch}" \
    --build-arg TORCH_INDEX_URL="$index" .
rm -f docker/wheels/*.whl docker/certs/ca-bundle.crt
