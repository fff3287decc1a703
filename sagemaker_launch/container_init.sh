#!/bin/bash
# The training container's PID 1: runs the SageMaker SDK's sm_train.sh and lets a stop reach training.
#
# Usage (the launcher's ContainerEntrypoint + ContainerArguments):
#     /bin/bash /opt/ml/input/data/code/sagemaker_launch/container_init.sh /opt/ml/input/data/sm_drivers/sm_train.sh
#
# SageMaker stops a job (StopTrainingJob, spot reclaim, MaxRuntime) with SIGTERM to the container's
# PID 1 only, then SIGKILL after 120 s. ModelTrainer's own PID 1 is `bash sm_train.sh`, which
# neither traps nor execs: PID 1 ignores every signal it has no handler for, so the SIGTERM was
# lost and training was killed without a checkpoint. This script, plain bash because it runs before
# anything is installed:
#
# - starts sm_train.sh in a process group of its own (job control, `set -m`);
# - on SIGTERM/SIGINT, sends the signal to the training processes: what the SDK's driver started
#   (sagemaker_launch/entry.py), or, when that is torchrun, torchrun's workers. Every rank then
#   stops after the same training step and writes last.ckpt there (bincount.callbacks.StopOnSigterm,
#   ModelCheckpoint(save_on_exception=True), conf/callbacks/default.yaml). Not to the whole
#   group: the SDK's shell and driver would die at once (neither handles SIGTERM), and with them the
#   pipe that carries the training output to the job's log; and DataLoader workers, in the group
#   too, would die under Lightning, which then fails on their death instead of stopping cleanly.
#   For that same reason not to torchrun either: it passes SIGTERM on with killpg to each worker's
#   process group (torchrun starts each worker in a session of its own, start_new_session), which
#   holds the worker's DataLoader workers. Before the driver has started anything (environment
#   set-up, pip), the whole group gets the signal: nothing to save yet;
# - waits until sm_train.sh has exited, every process of its group is gone, and no process is
#   left that was orphaned to this one (as PID 1 it adopts torchrun's workers if torchrun dies);
# - exits with sm_train.sh's status (a stopped run exits 143: bincount.train.fit); after a forwarded
#   signal, with 128 + its number if that status is 0, so a stopped job never passes for a finished
#   one (its model/ is empty).
set -u

if [ $# -lt 1 ]; then
    echo "usage: container_init.sh SM_TRAIN_SH [ARGS...]" >&2
    exit 2
fi

set -m  # job control: the job below gets its own process group, whose id is its pid
/bin/bash "$@" &
group=$!
set +m

# fills `members` with the pids of the group's live (non-zombie) processes, `parents` with their parents
group_members() {
    local stat line
    members=()
    parents=()
    for stat in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null < "$stat" || continue
        line=${line##*) }  # past the command name, which may hold spaces and parentheses
        set -- $line       # state, ppid, pgrp, ...
        if [ "$3" = "$group" ] && [ "$1" != Z ]; then
            members+=("${stat//[!0-9]/}")
            parents+=("$2")
        fi
    done
}

# the command line of a process, its arguments in `args`
read_args() {
    args=()
    mapfile -d '' args 2>/dev/null < "/proc/$1/cmdline"
}

# is a process one of the SDK's container drivers (sm_drivers/distributed_drivers/*.py)?
is_sdk_driver() {
    read_args "$1" && [[ "${args[*]}" == *"/sm_drivers/distributed_drivers/"* ]]
}

# is a process torchrun (the script, or python -m torch.distributed.run / .launch)?
is_torchrun() {
    local arg
    read_args "$1" || return 1
    for arg in "${args[@]}"; do
        case $arg in
            torchrun | */torchrun | torch.distributed.run | torch.distributed.launch) return 0 ;;
        esac
    done
    return 1
}

# fills `kids` with the live children of a process, whatever their group
children_of() {
    local of=$1 stat line
    kids=()
    for stat in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null < "$stat" || continue
        line=${line##*) }
        set -- $line
        if [ "$1" != Z ] && [ "$2" = "$of" ]; then
            kids+=("${stat//[!0-9]/}")
        fi
    done
}

# fills `targets` with the training processes: what the SDK's driver started, or, when that is
# torchrun, its workers (torchrun would kill each worker's whole process group, its DataLoader
# workers too, and training would fail on their death instead of stopping cleanly)
training_processes() {
    local i parent
    targets=()
    group_members
    for i in "${!members[@]}"; do
        is_sdk_driver "${parents[$i]}" || continue
        parent=${members[$i]}
        children_of "$parent"
        if is_torchrun "$parent" && [ ${#kids[@]} -gt 0 ]; then
            targets+=("${kids[@]}")
        else
            targets+=("$parent")
        fi
    done
}

forward() {
    local sig=$1
    signalled=1
    stop_status=$((128 + $2))
    training_processes
    if [ ${#targets[@]} -gt 0 ]; then
        echo "container_init: SIG$sig -> training process(es) ${targets[*]}"
        kill -s "$sig" "${targets[@]}" 2>/dev/null
    else
        echo "container_init: SIG$sig -> process group $group (training has not started)"
        kill -s "$sig" -- "-$group" 2>/dev/null
    fi
}
trap 'forward TERM 15' TERM
trap 'forward INT 2' INT

stop_status=0
while :; do
    signalled=0
    wait "$group"
    status=$?
    [ "$signalled" = 1 ] || break  # a trap, not the end of sm_train.sh, ended the wait
done

# anything still running: the group's processes, or orphans this PID 1 adopted
others_alive() {
    local stat line
    for stat in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null < "$stat" || continue
        line=${line##*) }
        set -- $line
        if [ "$1" != Z ] && { [ "$3" = "$group" ] || [ "$2" = "$$" ]; }; then
            return 0
        fi
    done
    return 1
}
while others_alive; do
    sleep 0.2 || true
done
if [ "$status" = 0 ]; then
    status=$stop_status
fi
exit "$status"
