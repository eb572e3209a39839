#!/usr/bin/env bash
# build_images.sh - build punchgate's container images offline, without an image registry.
#
#   scripts/build_images.sh [--tag IMAGE] [--systemd-tag IMAGE] [--base-only] [--timings FILE]
#
# 1. Configures Podman once (see configure_podman below) when root.
# 2. Base images, debootstrapped from Debian's packages and imported with `podman import`;
#    skipped when the image already exists (remove it to rebuild):
#      localhost/punchgate-base:bookworm     python3 + venv, iproute2, iptables (nodes, NAT
#                                            gateways, echo service and probe of the compose test)
#      localhost/punchgate-systemd:bookworm  the same plus systemd, dbus, a user manager
#                                            (the service-mode test)
# 3. Wheels, built on the host into build/wheels/: punchgate (pip wheel --no-deps) and
#    every dependency, so that the image build installs with --no-index.
# 4. The punchgate image, from the root Containerfile with --build-arg BASE=<base image>,
#    tagged IMAGE (default localhost/punchgate:local), and the same on the systemd base,
#    tagged --systemd-tag (default localhost/punchgate-systemd:local; the service-mode test
#    runs its /sbin/init). The tests pass tags of their own and remove them. Podman's
#    layer cache makes an unchanged rebuild take seconds.
# --base-only stops after step 2. --timings FILE appends "step seconds" lines.
# Environment: DEBOOTSTRAP_MIRROR (default: the host's Debian source, else debootstrap's
# own default), PYTHON (the Python that builds the wheels; default .venv/bin/python or python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

BASE_IMAGE=localhost/punchgate-base:bookworm
SYSTEMD_IMAGE=localhost/punchgate-systemd:bookworm
SUITE=bookworm
TAG=localhost/punchgate:local
SYSTEMD_TAG=localhost/punchgate-systemd:local
BASE_ONLY=0
TIMINGS=
BASE_PACKAGES=python3,python3-venv,iproute2,iptables
SYSTEMD_PACKAGES=python3,python3-venv,iproute2,systemd,systemd-sysv,dbus,dbus-user-session,procps
CACHE_DIR=/var/cache/punchgate-debootstrap  # downloaded .debs, shared by both base images

die() { echo "build_images: error: $*" >&2; exit 1; }
log() { echo "build_images: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --tag) [ $# -ge 2 ] || die "--tag needs a value (example: --tag localhost/punchgate:local)"; TAG=$2; shift 2 ;;
        --systemd-tag) [ $# -ge 2 ] || die "--systemd-tag needs a value"; SYSTEMD_TAG=$2; shift 2 ;;
        --base-only) BASE_ONLY=1; shift ;;
        --timings) [ $# -ge 2 ] || die "--timings needs a file"; TIMINGS=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

command -v podman >/dev/null || die "podman is missing (apt-get install -y podman runc)"

timed() { # timed NAME CMD...: run CMD, record its duration
    local name=$1 start end
    shift
    start=$(date +%s.%N)
    "$@"
    end=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    log "$name: ${secs} s"
    if [ -n "$TIMINGS" ]; then echo "$name $secs" >>"$TIMINGS"; fi
}

# Podman on this kind of host needs runc with cgroupfs (crun refuses hybrid cgroups) and
# explicit ulimits (a container may not raise its limits). Written only when absent or
# missing one of these settings; an existing file is kept as containers.conf.orig.
configure_podman() {
    local conf=/etc/containers/containers.conf
    [ "$(id -u)" = 0 ] || return 0
    if [ -f "$conf" ] && grep -q '^runtime *= *"runc"' "$conf" && grep -q '^cgroup_manager *= *"cgroupfs"' "$conf" &&
        grep -q '^default_ulimits' "$conf"; then
        return 0
    fi
    mkdir -p /etc/containers
    [ -f "$conf" ] && cp -n "$conf" "$conf.orig"
    # nproc above ~32k is refused here (runc: "error setting rlimit type 6") even below the
    # host's hard limit: 4096 is plenty for a container.
    local nofile nproc
    nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
    [ "$nofile" = unlimited ] && nofile=1048576
    [ "$nproc" = unlimited ] && nproc=1048576
    nofile=$((nofile < 65536 ? nofile : 65536)); nproc=$((nproc < 4096 ? nproc : 4096))
    cat >"$conf" <<EOF
# Written by punchgate's scripts/build_images.sh (the previous file, if any: containers.conf.orig).
# runc + cgroupfs: crun does not support this host's hybrid cgroups. Explicit ulimits
# (no higher than the host's): containers here may not raise their own limits.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
EOF
    log "wrote $conf (runc, cgroupfs, ulimits nofile=$nofile nproc=$nproc)"
}

debian_mirror() {
    if [ -n "${DEBOOTSTRAP_MIRROR:-}" ]; then echo "$DEBOOTSTRAP_MIRROR"; return; fi
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v -- '-security' | sed -n 1p || true)
    [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v -- '-security' | sed -n 1p || true)
    echo "$uri"  # empty: debootstrap's default mirror
}

debootstrap_image() { # debootstrap_image IMAGE PACKAGES
    local image=$1 packages=$2 rootfs
    if podman image exists "$image"; then
        log "$image exists (podman rmi $image to rebuild)"
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "building $image needs root (debootstrap)"
    command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install -y debootstrap)"
    rootfs=$(mktemp -d /var/tmp/punchgate-rootfs.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$rootfs'" RETURN
    mkdir -p "$CACHE_DIR"
    log "debootstrap $SUITE for $image ($packages)"
    local mirror
    mirror=$(debian_mirror)
    if ! debootstrap --variant=minbase --cache-dir="$CACHE_DIR" --include="$packages" \
        "$SUITE" "$rootfs" ${mirror:+"$mirror"} >"$rootfs.log" 2>&1; then
        tail -n 20 "$rootfs.log" >&2
        rm -f "$rootfs.log"
        die "debootstrap failed for $image"
    fi
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --quiet - "$image" >/dev/null
    log "imported $image"
}

build_wheels() {
    local python=${PYTHON:-} key
    if [ -z "$python" ]; then
        if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
    fi
    # Dependency wheels are rebuilt only when pyproject.toml changes; punchgate's own every time.
    key=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ "$(cat build/wheels/.deps-key 2>/dev/null)" != "$key" ]; then
        rm -rf build/wheels
    fi
    mkdir -p build/wheels
    rm -f build/wheels/punchgate-*.whl
    # (pip's notes about this machine's extra package indexes are dropped; errors stay)
    # A fixed timestamp makes an unchanged punchgate give the same wheel, so podman reuses its layers.
    SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir build/wheels . \
        2> >(grep -v 'is ignored: it is neither' >&2) >/dev/null
    if [ ! -f build/wheels/.deps-key ]; then
        "$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir build/wheels \
            build/wheels/punchgate-*.whl 2> >(grep -v 'is ignored: it is neither' >&2) >/dev/null
        echo "$key" >build/wheels/.deps-key
    fi
}

build_punchgate_image() { # build_punchgate_image BASE TAG
    local old new
    old=$(podman image inspect --format '{{.Id}}' "$2" 2>/dev/null || true)
    podman build --quiet --build-arg BASE="$1" --tag "$2" --file Containerfile "$ROOT" >/dev/null
    new=$(podman image inspect --format '{{.Id}}' "$2")
    # The image this tag named before, now untagged, is ours to remove (unless still in use).
    if [ -n "$old" ] && [ "$old" != "$new" ] && [ "$(podman image inspect --format '{{len .RepoTags}}' "$old" 2>/dev/null)" = 0 ]; then
        podman rmi "$old" >/dev/null 2>&1 || true
    fi
    log "built $2"
}

configure_podman
timed "base image" debootstrap_image "$BASE_IMAGE" "$BASE_PACKAGES"
timed "systemd image" debootstrap_image "$SYSTEMD_IMAGE" "$SYSTEMD_PACKAGES"
[ "$BASE_ONLY" = 1 ] && exit 0
timed "wheels" build_wheels
timed "punchgate image" build_punchgate_image "$BASE_IMAGE" "$TAG"
timed "punchgate systemd image" build_punchgate_image "$SYSTEMD_IMAGE" "$SYSTEMD_TAG"
