#!/usr/bin/env bash
# A one-node SLURM cluster on localhost for the launch tests (recipe: ../shared/ops/slurm-local.md).
#   slurm_cluster.sh install        apt-get install slurmctld slurmd slurm-client munge (if missing)
#   slurm_cluster.sh start DIR      munged + slurmctld + slurmd under DIR, ports 16817/16818 (or the next
#                                   free pair); prints
#                                   SLURM_CONF=DIR/slurm.conf once the node is idle
#   slurm_cluster.sh stop DIR       scontrol shutdown, stop munged
# Needs root (daemons run as root, no systemd). Ports: PIKV_SLURM_PORT (default 16817) and +1.
set -euo pipefail
. "$(dirname "$(realpath "$0")")/slurm_lib.sh"
cmd="${1:?usage: slurm_cluster.sh install|start DIR|stop DIR}"

case "$cmd" in
install)
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
            && command -v munged >/dev/null; then
        exit 0
    fi
    [ "$(id -u)" = 0 ] || { echo "slurm_cluster.sh: installing SLURM needs root" >&2; exit 3; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    ;;
start)
    D="$(realpath -m "${2:?DIR}")"
    PORT="$(free_port_pair "${PIKV_SLURM_PORT:-16817}")"  # a cluster left running keeps its ports
    start_munge "$D"
    {
        echo "ClusterName=pikvtest"
        echo "SlurmctldHost=localhost"
        common_conf "$D" "$PORT"
        echo "NodeName=localhost NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 CPUs=$(nproc --all) RealMemory=16000 State=UNKNOWN"
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
    } > "$D/slurm.conf"
    export SLURM_CONF="$D/slurm.conf"
    slurmctld
    slurmd
    for _ in $(seq 100); do
        state="$(sinfo -h -o %t 2>/dev/null || true)"
        [ "$state" = idle ] && { echo "SLURM_CONF=$SLURM_CONF"; exit 0; }
        sleep 0.2
    done
    echo "slurm_cluster.sh: node not idle after 20 s (state '$state'); see $D/log" >&2
    exit 1
    ;;
stop)
    D="$(realpath -m "${2:?DIR}")"
    export SLURM_CONF="$D/slurm.conf"
    scontrol shutdown >/dev/null 2>&1 || true
    for f in "$D"/slurmd-*.pid "$D/slurmctld.pid" "$D/munge/munged.pid"; do
        if [ -f "$f" ]; then
            pid="$(cat "$f")"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; [ "$f" = "$D/munge/munged.pid" ] && kill "$pid" 2>/dev/null; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    ;;
*)
    echo "usage: slurm_cluster.sh install|start DIR|stop DIR" >&2
    exit 2
    ;;
esac
