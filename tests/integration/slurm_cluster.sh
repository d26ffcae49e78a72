#!/usr/bin/env bash
# A one-node SLURM cluster on localhost for the launch tests (recipe: ../shared/ops/slurm-local.md).
#   slurm_cluster.sh install        apt-get install slurmctld slurmd slurm-client munge (if missing)
#   slurm_cluster.sh start DIR      munged + slurmctld + slurmd under DIR, ports 16817/16818 (or the next
#                                   free pair); prints
#                                   SLURM_CONF=DIR/slurm.conf once the node is idle
#   slurm_cluster.sh stop DIR       scontrol shutdown, stop munged
# Needs root (daemons run as root, no systemd). Ports: PIKV_SLURM_PORT (default 16817) and +1.
set -euo pipefail
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
    PORT="${PIKV_SLURM_PORT:-16817}"
    # A cluster left running by an interrupted run keeps its ports: move on to a free pair.
    in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
    while in_use "$PORT" || in_use "$((PORT + 1))"; do PORT=$((PORT + 2)); done
    mkdir -p "$D/munge" "$D/state" "$D/spool" "$D/log"
    chmod 711 "$D/munge"  # 700 makes munged refuse the socket directory
    [ -f "$D/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$D/munge/munge.key"; chmod 600 "$D/munge/munge.key"; }
    munged --socket="$D/munge/munge.socket.2" --pid-file="$D/munge/munged.pid" --log-file="$D/munge/munged.log" \
        --seed-file="$D/munge/munged.seed" --key-file="$D/munge/munge.key"
    cat > "$D/slurm.conf" <<CONF
ClusterName=pikvtest
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.socket.2
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=30
NodeName=localhost NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 CPUs=$(nproc --all) RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
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
    for f in "$D/slurmd.pid" "$D/slurmctld.pid" "$D/munge/munged.pid"; do
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
