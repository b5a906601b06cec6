#!/usr/bin/env bash
# A real Slurm on this one Debian machine (as root), to try `snakemake --profile slurm` and
# for tests/test_real_slurm.py: munge, MariaDB + slurmdbd (the SLURM executor plugin asks
# sacct for job states, sacctmgr/sshare for the account), slurmctld, and N slurmd, each in
# its own UTS + mount namespace under the hostname nodeI with its own /etc/hosts, so jobs run
# on "other hosts" as on a cluster. GPUs are a count-only gres on empty placeholder files
# (Slurm 22.05 drops a gpu gres without File=). The cluster, account and partition are the
# profile's placeholders (my-account, gpu), so the profile runs here unchanged.
#
#   workflow/scripts/local-slurm.sh up       # install what is missing, start what is not running
#   workflow/scripts/local-slurm.sh status   # each daemon and sinfo; exit 1 unless all run
#   workflow/scripts/local-slurm.sh down     # cancel the jobs, stop what `up` started (pidfiles)
#
# Knobs (environment, read by `up`): CDM_SLURM_NODES (2), CDM_SLURM_GPUS (GPUs per node, 2),
# CDM_SLURM_MEM_MB (memory per node; 3/4 of this machine over the nodes). Every node declares
# all of this machine's cores: the nodes share them.
set -euo pipefail

STATE=/var/lib/cdm-slurm          # data, logs, pidfiles of what `up` started
RUN=$STATE/run
LOG=$STATE/log
CONF=/etc/slurm                   # where Slurm looks: srun inside a job has no SLURM_CONF
MARK="# written by cdm workflow/scripts/local-slurm.sh"
CLUSTER=cdm ACCOUNT=my-account PARTITION=gpu
DB_PORT=16033                     # MariaDB on 127.0.0.1 only, beside any system one
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

die() {
	echo "local-slurm: error: $*" >&2
	exit 1
}
say() { echo "local-slurm: $*"; }

# The pid in $RUN/<name>.pid if that process still runs as `comm` (a reused pid is not ours).
running() {
	local name=$1 comm=$2 pid
	pid=$(cat "$RUN/$name.pid" 2>/dev/null) || return 1
	[[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
	echo "$pid"
}

# Wait up to $1 seconds for the command after it to succeed.
wait_for() {
	local seconds=$1
	shift
	for ((i = 0; i < seconds * 2; i++)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.5
	done
	return 1
}

nodes() { seq -f "node%g" 1 "${CDM_SLURM_NODES:-2}"; }

install_packages() {
	local missing=()
	for p in "${PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	command -v apt-get >/dev/null || die "no apt-get to install ${missing[*]} (a Debian machine is needed)"
	say "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -q "${missing[@]}" >"$LOG/apt.log" 2>&1 ||
		{ apt-get update -q >>"$LOG/apt.log" 2>&1 && apt-get install -y -q "${missing[@]}" >>"$LOG/apt.log" 2>&1; } ||
		die "apt-get could not install ${missing[*]} (see $LOG/apt.log)"
}

write_configs() {
	local host cpus mem gpus n=0 port
	host=$(hostname -s)
	cpus=$(nproc)
	gpus=${CDM_SLURM_GPUS:-2}
	mem=${CDM_SLURM_MEM_MB:-$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 / ${CDM_SLURM_NODES:-2}))}
	if [[ -e $CONF/slurm.conf ]] && ! head -n 1 "$CONF/slurm.conf" | grep -qxF "$MARK"; then
		die "$CONF/slurm.conf was not written by this script; move it away to use the local cluster"
	fi
	mkdir -p "$CONF" "$STATE/gpu" "$STATE/node" "$STATE/ctld"
	for ((g = 0; g < gpus; g++)); do : >"$STATE/gpu/gpu$g"; done
	{
		echo "$MARK"
		cat <<-EOF
			ClusterName=$CLUSTER
			SlurmctldHost=$host(127.0.0.1)
			SlurmUser=root
			SlurmdUser=root
			AuthType=auth/munge
			# A requeued job waits cred_expire seconds (120 by default) before it starts again.
			AuthInfo=cred_expire=10
			CredType=cred/munge
			StateSaveLocation=$STATE/ctld
			SlurmctldPidFile=$RUN/slurmctld.pid
			SlurmctldLogFile=$LOG/slurmctld.log
			# $STATE/node is each slurmd's own folder, bind-mounted in its namespace.
			SlurmdSpoolDir=$STATE/node/spool
			SlurmdPidFile=$STATE/node/slurmd.pid
			SlurmdLogFile=$STATE/node/slurmd.log
			SlurmdParameters=config_overrides
			ProctrackType=proctrack/linuxproc
			TaskPlugin=task/none
			MpiDefault=none
			SwitchType=switch/none
			JobAcctGatherType=jobacct_gather/none
			JobCompType=jobcomp/none
			AccountingStorageType=accounting_storage/slurmdbd
			AccountingStorageHost=127.0.0.1
			AccountingStorageTRES=gres/gpu
			SelectType=select/cons_tres
			SelectTypeParameters=CR_CPU_Memory
			GresTypes=gpu
			ReturnToService=2
			# Short intervals: a test's job starts and is reported as soon as it can.
			SchedulerType=sched/backfill
			SchedulerParameters=sched_interval=2,bf_interval=2
			MinJobAge=60
			KillWait=5
			InactiveLimit=0
			MessageTimeout=20
			SlurmdTimeout=60
		EOF
		for node in $(nodes); do
			port=$((6821 + n++))
			echo "NodeName=$node NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$mem Gres=gpu:$gpus State=UNKNOWN"
		done
		echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
	} >"$CONF/slurm.conf"
	{
		echo "$MARK"
		echo "AutoDetect=off"
		echo "Name=gpu File=$STATE/gpu/gpu[0-$((gpus - 1))]"
	} >"$CONF/gres.conf"
	[[ -s $STATE/dbpass ]] || (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$STATE/dbpass")
	(
		umask 077
		cat >"$CONF/slurmdbd.conf" <<-EOF
			$MARK
			AuthType=auth/munge
			DbdHost=$host
			DbdAddr=127.0.0.1
			SlurmUser=root
			PidFile=$RUN/slurmdbd.pid
			LogFile=$LOG/slurmdbd.log
			StorageType=accounting_storage/mysql
			StorageHost=127.0.0.1
			StoragePort=$DB_PORT
			StorageUser=slurm
			StoragePass=$(cat "$STATE/dbpass")
			StorageLoc=slurm_acct_db
		EOF
	)
	# Every node's /etc/hosts: the nodes and this host on the loopback (one network).
	echo "127.0.0.1 localhost $host $(nodes | tr '\n' ' ')" >"$STATE/hosts"
}

start_munge() {
	if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
	[[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create >/dev/null
	install -d -o munge -g munge -m 0755 /run/munge
	runuser -u munge -- munged
	wait_for 20 sh -c 'munge -n | unmunge' || die "munged did not start (see /var/log/munge/munged.log)"
	cp /run/munge/munged.pid "$RUN/munged.pid"
}

db() { mariadb --no-defaults --socket="$STATE/mysqld/mysqld.sock" -uroot "$@"; }

start_mariadb() {
	if ! running mariadbd mariadbd >/dev/null; then
		install -d -o mysql -g mysql "$STATE/mysqld"
		if [[ ! -d $STATE/mysql/mysql ]]; then
			mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" \
				--auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.log" 2>&1 ||
				die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
		fi
		setsid mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" \
			--socket="$STATE/mysqld/mysqld.sock" --pid-file="$STATE/mysqld/mariadbd.pid" \
			--bind-address=127.0.0.1 --port=$DB_PORT --skip-name-resolve \
			--log-error="$LOG/mariadb.log" </dev/null >>"$LOG/mariadb.log" 2>&1 &
		echo $! >"$RUN/mariadbd.pid"
		wait_for 60 db -e "SELECT 1" || die "MariaDB did not start (see $LOG/mariadb.log)"
	fi
	db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$STATE/dbpass")';
		GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_slurmdbd() {
	running slurmdbd slurmdbd >/dev/null || slurmdbd
	wait_for 60 sacctmgr -n show cluster || die "slurmdbd did not start (see $LOG/slurmdbd.log)"
	# What the SLURM plugin checks: the cluster, the account and this user's association.
	sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" ||
		sacctmgr -i add cluster "$CLUSTER" >/dev/null
	sacctmgr -n -P show account format=account | grep -qx "$ACCOUNT" ||
		sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description=cdm Organization=cdm >/dev/null
	sacctmgr -n -P show assoc user=root account="$ACCOUNT" format=user | grep -qx root ||
		sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
	sacctmgr -i modify user root set DefaultAccount="$ACCOUNT" >/dev/null || true
}

start_slurmctld() {
	running slurmctld slurmctld >/dev/null || slurmctld
	wait_for 60 sh -c 'scontrol ping | grep -q UP' || die "slurmctld did not start (see $LOG/slurmctld.log)"
}

start_slurmd() {
	local node
	for node in $(nodes); do
		running "slurmd-$node" slurmd >/dev/null && continue
		mkdir -p "$STATE/nodes/$node/spool"
		# Own hostname and /etc/hosts; $STATE/node becomes this node's folder. Private
		# mounts (unshare's default): nothing here reaches the host's mount table.
		setsid unshare --uts --mount -- sh -c "hostname $node &&
			mount --bind $STATE/hosts /etc/hosts &&
			mount --bind $STATE/nodes/$node $STATE/node &&
			exec slurmd -D" </dev/null >>"$LOG/slurmd-$node.out" 2>&1 &
		echo $! >"$RUN/slurmd-$node.pid"
	done
	ready() {
		local n
		for n in $(nodes); do
			running "slurmd-$n" slurmd >/dev/null || return 1
			sinfo -h -n "$n" -o %T | grep -qE '^(idle|mixed|allocated)' || return 1
		done
	}
	if ! wait_for 20 ready; then
		# A node that slurmctld marked down while its slurmd was away: back into service.
		scontrol update NodeName="$(nodes | paste -sd,)" State=RESUME >/dev/null 2>&1 || true
		wait_for 40 ready || die "a slurmd did not come up (see $LOG/slurmd-*.out and $STATE/nodes/*/slurmd.log)"
	fi
}

up() {
	[[ $(id -u) == 0 ]] || die "needs root (it installs packages and starts daemons)"
	mkdir -p "$RUN" "$LOG"
	install_packages
	write_configs
	start_munge
	start_mariadb
	start_slurmdbd
	start_slurmctld
	start_slurmd
	say "up: $(sinfo -h -o '%P %D nodes %T' | paste -sd' ')"
}

# SIGTERM the process of $RUN/<name>.pid (if still `comm`), SIGKILL after 20 s.
stop() {
	local name=$1 comm=$2 pid
	if pid=$(running "$name" "$comm"); then
		kill "$pid" 2>/dev/null || true
		wait_for 20 sh -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
		say "stopped $name (pid $pid)"
	fi
	rm -f "$RUN/$name.pid"
}

down() {
	[[ $(id -u) == 0 ]] || die "needs root"
	local node
	if running slurmctld slurmctld >/dev/null; then
		# The jobs first: their steps would outlive the slurmd that started them.
		scancel --full --quiet $(squeue -h -o %i) 2>/dev/null || true
		wait_for 30 sh -c '[ -z "$(squeue -h -o %i)" ]' || say "jobs still listed after 30 s: $(squeue -h -o %i | paste -sd' ')"
	fi
	for node in $(ls "$RUN" 2>/dev/null | sed -n 's/^slurmd-\(.*\)\.pid$/\1/p'); do
		stop "slurmd-$node" slurmd
	done
	stop slurmctld slurmctld
	stop slurmdbd slurmdbd
	stop mariadbd mariadbd
	stop munged munged
}

status() {
	local ok=0 name comm pid f
	# munge may be the system's (up then uses it): what counts is that it answers.
	if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then echo "munge: answers"; else
		echo "munge: not answering"
		ok=1
	fi
	for f in mariadbd:mariadbd slurmdbd:slurmdbd slurmctld:slurmctld $(nodes | sed 's/.*/slurmd-&:slurmd/'); do
		name=${f%%:*} comm=${f##*:}
		if pid=$(running "$name" "$comm"); then
			echo "$name: running (pid $pid)"
		else
			echo "$name: not running"
			ok=1
		fi
	done
	if running slurmctld slurmctld >/dev/null; then sinfo -N -o '%N %P %T %c %m %G'; fi
	return $ok
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
*) die "usage: $0 up|down|status" ;;
esac
