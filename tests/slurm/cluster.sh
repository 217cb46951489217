#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine, for tests/test_slurm.py: slurmctld, munged and two slurmd (nodes
# n1 and n2, each with the machine's CPUs, on their own ports and spool directories) started as plain daemons (no
# systemd needed). Both nodes see one filesystem, as a cluster's nodes see a shared one.
#
#   tests/slurm/cluster.sh start    install slurm-wlm and munge if missing (apt-get), write the config, start the
#                                   daemons from empty state (job ids from 1), wait until the node is idle
#   tests/slurm/cluster.sh stop     kill every job's processes and the daemons, remove the state
#   tests/slurm/cluster.sh install  only install slurm-wlm and munge (.ci/run)
#
# Settings for tests, not production: a requeued job may start again 5 s later (AuthInfo cred_expire, Slurm's
# default 120 s), the scheduler looks every 2 s (default 60 s). SIGKILL follows SIGTERM after 120 s (default 30): on
# a loaded machine the agents' clean stop may take longer than 30 s, and the tests check that it happened.
# No accounting database: finished jobs are in a job-completion file, read with `sacct -c`.
set -euo pipefail

STATE=${SLURM_TEST_STATE:-/var/lib/dif-maml-slurm-test}
CONF=/etc/slurm/slurm.conf   # the compiled-in path: sbatch, squeue and sacct need no SLURM_CONF
NODE=$(hostname -s)

say() { echo "slurm cluster: $*" >&2; }

# This machine's pid 1 reaps exited daemons late: pgrep and kill -0 still see them as zombies for a while.
alive() { local st; st=$(ps -o stat= -p "$1" 2> /dev/null) && [[ $st != Z* ]]; }
pids_of() { local name p; for name in "$@"; do for p in $(pgrep -x "$name" || true); do alive "$p" && echo "$p"; done; done; return 0; }
tree() { local p c; for p in "$@"; do echo "$p"; for c in $(pgrep -P "$p" || true); do tree "$c"; done; done; }

install() {
    command -v slurmctld > /dev/null && command -v slurmd > /dev/null && command -v munged > /dev/null && return 0
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
    # policy-rc.d 101: the packages' scripts must not start daemons (there is no init system to start them).
    local added=0
    [[ -e /usr/sbin/policy-rc.d ]] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; added=1; }
    apt-get install -y -qq --no-install-recommends slurm-wlm munge > /dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge > /dev/null; }
    (( added )) && rm -f /usr/sbin/policy-rc.d
    return 0
}

write_config() {
    mkdir -p /etc/slurm "$STATE"/{ctld,d/n1,d/n2,log}
    # Addresses pinned to 127.0.0.1: nothing depends on name resolution (the node names n1, n2 resolve nowhere;
    # launch/slurm.sbatch meets at the first node's NodeAddr). slurmctld's host must be hostname -s.
    cat > "$CONF" <<CONFIG
ClusterName=difmamltest
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
MailProg=/bin/true
EnforcePartLimits=ALL
ReturnToService=2
MinJobAge=300
KillWait=120
InactiveLimit=0
NodeName=n1 NodeHostname=${NODE} NodeAddr=127.0.0.1 Port=17001 CPUs=$(nproc) State=UNKNOWN
NodeName=n2 NodeHostname=${NODE} NodeAddr=127.0.0.1 Port=17002 CPUs=$(nproc) State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONFIG
}

stop() {
    # Jobs first: killing only the daemons would leave the job scripts running, adopted by pid 1.
    local victims p
    victims=$(tree $(pids_of slurmstepd))
    [[ -n "$victims" ]] && kill -KILL $victims 2> /dev/null || true
    for p in $(pids_of slurmd slurmctld munged); do kill -TERM "$p" 2> /dev/null || true; done
    for _ in $(seq 50); do [[ -z "$(pids_of slurmd slurmctld slurmstepd munged)" ]] && break; sleep 0.1; done
    for p in $(pids_of slurmd slurmctld slurmstepd munged); do kill -KILL "$p" 2> /dev/null || true; done
    rm -rf "$STATE"
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        install -d -o munge -g munge -m 0700 /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 100); do munge -n 2> /dev/null | unmunge > /dev/null 2>&1 && return 0; sleep 0.1; done
    say "munged did not answer"; return 1
}

start() {
    install
    stop
    write_config
    start_munge
    slurmctld -i
    slurmd -N n1
    slurmd -N n2
    local state=""
    for _ in $(seq 300); do
        state=$(sinfo -h -o '%T' 2> /dev/null | sort -u | paste -sd, -)
        [[ "$state" == idle && "$(sinfo -h -o '%D')" == 2 ]] && { say "up: nodes n1, n2 ($(nproc) CPUs each), state in $STATE"; return 0; }
        sleep 0.2
    done
    say "nodes not idle after 60 s (states: ${state:-none}); see $STATE/log/"
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    install) install ;;
    *) echo "usage: $0 start|stop|install" >&2; exit 2 ;;
esac
