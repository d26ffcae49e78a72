#!/usr/bin/env bash
# A two-node SLURM cluster on this machine, for the multi-node launch tests.
# Each node is a network namespace (pikv-n1, pikv-n2) with its own address on a private bridge
# (pikvbr0, 10.213.77.0/24) and its own host name (a UTS namespace: `hostname` says n1 / n2, and
# DIR/hosts, bind-mounted on /etc/hosts in a mount namespace, resolves n1, n2 and the controller). slurmctld and munged run
# in the host's namespace at 10.213.77.1 and are shared; a slurmd runs in each node. The nodes share
# the filesystem (namespaces separate only the network), like nodes on a shared file system.
#
#   multinode_cluster.sh install          SLURM + munge (slurm_cluster.sh install), iproute2, util-linux
#   multinode_cluster.sh start DIR        network + daemons under DIR; prints SLURM_CONF=DIR/slurm.conf
#                                         once both nodes are idle. Tears down a cluster left by an
#                                         interrupted run first (its DIR is kept in $STATE).
#   multinode_cluster.sh stop [DIR]       daemons, every process in the namespaces, namespaces, bridge
#   multinode_cluster.sh kill-node N      SIGKILL every process of node N's namespace (slurmd included):
#                                         the machine is gone as far as the cluster can tell
#   multinode_cluster.sh start-node N   a fresh slurmd on node N (the node rebooted / was replaced)
#   multinode_cluster.sh exec N CMD...    run CMD on node N (its network, host name and /etc/hosts)
# Needs root. Ports: PIKV_SLURM_PORT (default 16917) and +1, or the next free pair.
set -euo pipefail
cmd="${1:?usage: multinode_cluster.sh install|start DIR|stop [DIR]|kill-node N|start-node N|exec N CMD}"
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/slurm_lib.sh"
NODES=(n1 n2)
BRIDGE=pikvbr0
NET=10.213.77
CTL_ADDR="$NET.1"
STATE=/run/pikv-multinode-cluster  # the DIR of the running cluster, for `stop` after an interruption

addr_of() { echo "$NET.$((10 + ${1#n}))"; }

node_exec() {  # node_exec N CMD...: CMD in N's network namespace, with N's host name and hosts file
    # nsenter, not `ip netns exec`: that remounts /sys without /sys/fs/cgroup, which slurmd needs.
    local node="$1" hosts; shift
    hosts="$(cat "$STATE")/hosts"
    nsenter --net="/run/netns/pikv-$node" unshare --mount --uts -- \
        sh -c 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"' "$node" "$hosts" "$@"
}

kill_namespace() {  # SIGKILL every process in a namespace until none is left
    local ns="$1" pids
    for _ in $(seq 50); do
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        [ -n "$pids" ] || return 0
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null || true
        sleep 0.1
    done
    echo "multinode_cluster.sh: processes left in $ns: $(ip netns pids "$ns")" >&2
}

start_slurmd() {  # start_slurmd DIR N
    SLURM_CONF="$1/slurm.conf" node_exec "$2" slurmd -N "$2" -f "$1/slurm.conf"
}

teardown_network() {
    for node in "${NODES[@]}"; do
        if ip netns list | grep -qw "pikv-$node"; then
            kill_namespace "pikv-$node"
            ip netns delete "pikv-$node"
        fi
    done
    ip link delete "$BRIDGE" 2>/dev/null || true
}

stop_daemons() {  # stop_daemons DIR: slurmctld and munged of the cluster under DIR
    local d="$1" pid
    [ -f "$d/slurm.conf" ] && SLURM_CONF="$d/slurm.conf" timeout 10 scontrol shutdown >/dev/null 2>&1 || true
    for f in "$d"/slurmd-*.pid "$d/slurmctld.pid" "$d/munge/munged.pid"; do
        [ -f "$f" ] || continue
        pid="$(cat "$f")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$f"
    done
}

setup_network() {
    ip link add "$BRIDGE" type bridge
    ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for node in "${NODES[@]}"; do
        ip netns add "pikv-$node"
        ip link add "veth-$node" type veth peer name eth0 netns "pikv-$node"
        ip link set "veth-$node" master "$BRIDGE" up
        ip -n "pikv-$node" addr add "$(addr_of "$node")/24" dev eth0
        ip -n "pikv-$node" link set eth0 up
        ip -n "pikv-$node" link set lo up
    done
    {  # the nodes' /etc/hosts (bind-mounted by node_exec): names resolve as on a cluster's DNS
        echo "127.0.0.1 localhost"
        echo "$CTL_ADDR $(hostname -s)"
        for node in "${NODES[@]}"; do echo "$(addr_of "$node") $node"; done
    } > "$1/hosts"
}

write_conf() {  # write_conf DIR PORT
    local d="$1" port="$2"
    {
        echo "ClusterName=pikvmulti"
        echo "SlurmctldHost=$(hostname -s)($CTL_ADDR)"
        common_conf "$d" "$port"
        echo "# A node that stops answering is declared down after this many seconds (the node-loss test)."
        echo "SlurmdTimeout=10"
    } > "$d/slurm.conf"
    for node in "${NODES[@]}"; do
        echo "NodeName=$node NodeHostname=$node NodeAddr=$(addr_of "$node") CPUs=$(nproc --all) RealMemory=16000 State=UNKNOWN"
    done >> "$d/slurm.conf"
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4" >> "$d/slurm.conf"
}

wait_idle() {  # wait_idle DIR SECONDS: every node idle
    local states=""
    for _ in $(seq "$(($2 * 5))"); do
        states="$(SLURM_CONF="$1/slurm.conf" sinfo -h -N -o %t 2>/dev/null | sort -u | tr '\n' ' ' || true)"
        [ "$states" = "idle " ] && return 0
        sleep 0.2
    done
    echo "multinode_cluster.sh: nodes not idle after $2 s (states '$states'); see $1/log" >&2
    return 1
}

case "$cmd" in
install)
    "$HERE/slurm_cluster.sh" install
    if ! command -v ip >/dev/null || ! command -v unshare >/dev/null || ! command -v nsenter >/dev/null; then
        [ "$(id -u)" = 0 ] || { echo "multinode_cluster.sh: installing iproute2 needs root" >&2; exit 3; }
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends iproute2 util-linux >/dev/null
    fi
    ;;
start)
    D="$(realpath -m "${2:?DIR}")"
    [ -f "$STATE" ] && "$0" stop "$(cat "$STATE")"
    teardown_network  # namespaces or a bridge left without a state file
    PORT="$(free_port_pair "${PIKV_SLURM_PORT:-16917}")"
    echo "$D" > "$STATE"
    mkdir -p "$D"
    setup_network "$D"
    start_munge "$D"
    write_conf "$D" "$PORT"
    SLURM_CONF="$D/slurm.conf" slurmctld
    for node in "${NODES[@]}"; do mkdir -p "$D/spool-$node"; start_slurmd "$D" "$node"; done
    wait_idle "$D" 30
    echo "SLURM_CONF=$D/slurm.conf"
    ;;
stop)
    D="${2:-$(cat "$STATE" 2>/dev/null || true)}"
    [ -n "$D" ] && stop_daemons "$(realpath -m "$D")"
    teardown_network
    rm -f "$STATE"
    ;;
kill-node)
    kill_namespace "pikv-${2:?node}"
    ;;
start-node)
    # A replaced node: empty local spool, so the new slurmd finds no step sockets of the killed one.
    rm -rf "$(cat "$STATE")/spool-${2:?node}" && mkdir -p "$(cat "$STATE")/spool-$2"
    start_slurmd "$(cat "$STATE")" "$2"
    ;;
exec)
    node="${2:?node}"; shift 2
    node_exec "$node" "$@"
    ;;
*)
    echo "usage: multinode_cluster.sh install|start DIR|stop [DIR]|kill-node N|start-node N|exec N CMD" >&2
    exit 2
    ;;
esac
