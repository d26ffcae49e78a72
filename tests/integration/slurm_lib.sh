# Shared by slurm_cluster.sh (one node) and multinode_cluster.sh (two namespaced nodes): munge and the
# part of slurm.conf that does not depend on the node layout. Source it; needs root.

start_munge() {  # start_munge DIR: a munged with its own key and socket under DIR/munge
    local d="$1"
    mkdir -p "$d/munge" "$d/state" "$d/log"
    chmod 711 "$d/munge"  # 700 makes munged refuse the socket directory
    [ -f "$d/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$d/munge/munge.key"; chmod 600 "$d/munge/munge.key"; }
    munged --socket="$d/munge/munge.socket.2" --pid-file="$d/munge/munged.pid" --log-file="$d/munge/munged.log" \
        --seed-file="$d/munge/munged.seed" --key-file="$d/munge/munge.key"
}

common_conf() {  # common_conf DIR PORT: slurm.conf lines every test cluster shares (%n = the node's name)
    local d="$1" port="$2"
    cat <<CONF
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
AuthInfo=socket=$d/munge/munge.socket.2
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool-%n
SlurmctldPidFile=$d/slurmctld.pid
SlurmdPidFile=$d/slurmd-%n.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd-%n.log
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
CONF
}

free_port_pair() {  # free_port_pair PORT: PORT or the next even offset whose PORT and PORT+1 are free
    local port="$1"
    in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
    while in_use "$port" || in_use "$((port + 1))"; do port=$((port + 2)); done
    echo "$port"
}
