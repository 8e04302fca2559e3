#!/usr/bin/env bash
# Install the SLURM daemons + client tools and MUNGE from Debian's packages so
# that tests/slurm_cluster.py can run a throw-away one-node cluster on loopback.
#
# Idempotent and non-interactive: exits at once when everything is already
# installed. Needs root (or sudo) and access to the Debian package mirror.
# No service is started and no global config is written: the test helper runs
# its own munged/slurmctld/slurmd with a private slurm.conf, key and sockets.
#
# Usage: bash launch/slurm/install-local-cluster.sh
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

PACKAGES=(slurmctld slurmd slurm-client munge)
BINARIES=(slurmctld slurmd sbatch srun scontrol sinfo squeue scancel munged mungekey)

have_all() {
    local b
    for b in "${BINARIES[@]}"; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
    done
    return 0
}

if have_all; then
    echo "install-local-cluster: slurm + munge already installed ($(dpkg-query -W -f='${Version}' slurmctld 2>/dev/null || echo "?"))"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo -n DEBIAN_FRONTEND=noninteractive)
    else
        echo "install-local-cluster: need root or sudo to apt-get install ${PACKAGES[*]}" >&2
        exit 1
    fi
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-local-cluster: apt-get not found; install ${PACKAGES[*]} by hand" >&2
    exit 1
fi

# Keep package maintainer scripts from starting the system munge/slurm
# services (we run private daemons). Docker images usually ship a policy-rc.d
# that does this already; only add (and later remove) ours if there is none.
POLICY=/usr/sbin/policy-rc.d
cleanup_policy() { :; }
if [ ! -e "$POLICY" ]; then
    "${SUDO[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $POLICY && chmod 755 $POLICY"
    cleanup_policy() { "${SUDO[@]}" rm -f "$POLICY"; }
fi
trap cleanup_policy EXIT

# apt lists may be missing or stale on a fresh image.
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${PACKAGES[@]}"

if ! have_all; then
    echo "install-local-cluster: install finished but some of ${BINARIES[*]} are missing" >&2
    exit 1
fi
echo "install-local-cluster: installed slurm $(dpkg-query -W -f='${Version}' slurmctld)"
