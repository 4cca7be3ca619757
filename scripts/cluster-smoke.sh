#!/usr/bin/env bash
# Run every cluster command of docs/cluster.md, as written, on a real `ray up` cluster, and check that
# every specialist lands in the run directory the earlier stages wrote (issue 14).
#
#   make cluster-test                                 # this machine: head at 127.0.0.1 over SSH
#   bash scripts/cluster-smoke.sh --head-ip 10.0.0.1 --worker-ips 10.0.0.2 \
#        --ssh-user ubuntu --ssh-key ~/.ssh/id_ed25519     # machines you have (configs/cluster-onprem.yaml)
#   bash scripts/cluster-smoke.sh --bench             # also time the quickstart's specialists on the
#                                                     # cluster against the embedded Ray (BENCHMARKS.md)
#
# The commands, in order: ray up; ray exec (stages 1-2); ray submit train_specialists.py; ray
# rsync-down; ray job submit (Jobs API, run directory on the head's storage: the earlier stages, then
# the specialists after three were deleted, as a driver lost mid-run leaves them); ray down. The cluster
# config is configs/cluster-onprem.yaml with only the provider and auth fields replaced.
#
# This machine (the default) needs root, unshare, sshd and rsync (apt-get install openssh-server
# rsync). Everything runs inside private PID, mount and network namespaces: the head's `ray stop`
# sees only this test's processes, its ports (22, 6379, 8265) are its own, /tmp (Ray's session and
# the launcher's state) is private, and root's home is a temporary folder (nothing touches ~/.bashrc
# or ~/.ssh). So it is safe beside other Ray tests. sshd listens on 127.0.0.1:22 of that network
# namespace, with a host key and a client key made here. Nodes are set up offline there
# (SPECDISTILL_NODE_SETUP=offline: a --system-site-packages venv reusing this Python's torch and
# Ray, the project installed --no-deps); on real machines scripts/node-setup.sh installs from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export RAY_USAGE_STATS_ENABLED=0

HEAD_IP=""; WORKER_IPS=""; SSH_USER=""; SSH_KEY=""; BENCH=0; INSIDE=0; STEP_TIMEOUT=${SMOKE_STEP_TIMEOUT:-900}
usage() { sed -n '2,12p' "$0"; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --head-ip) HEAD_IP=$2; shift 2;;
    --worker-ips) WORKER_IPS=$2; shift 2;;
    --ssh-user) SSH_USER=$2; shift 2;;
    --ssh-key) SSH_KEY=$2; shift 2;;
    --bench) BENCH=1; shift;;
    --inside) INSIDE=1; shift;;
    -h|--help) usage;;
    *) echo "error: unknown option $1" >&2; usage;;
  esac
done
LOCAL=1; [ -n "$HEAD_IP" ] && LOCAL=0
PYTHON=$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')
PYBIN=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")

# ---- this machine: re-run inside private namespaces
if [ $LOCAL = 1 ] && [ $INSIDE = 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "error: the local cluster test needs root (namespaces, sshd); or pass --head-ip" >&2; exit 2; }
  for tool in unshare /usr/sbin/sshd rsync ssh ssh-keygen ip; do
    command -v "$tool" >/dev/null || { echo "error: $tool is missing; apt-get install openssh-server rsync iproute2" >&2; exit 2; }
  done
  args=(--inside); [ $BENCH = 1 ] && args+=(--bench)
  exec unshare --pid --fork --mount-proc --net --mount --propagation private bash "$0" "${args[@]}"
fi

log() { printf '\n=== %s\n' "$*"; }
step() { echo "+ $*"; timeout --kill-after=30 "$STEP_TIMEOUT" "$@"; }
now() { date +%s.%N; }

if [ $LOCAL = 1 ]; then
  log "private namespaces: $(ps -e --no-headers | wc -l) processes visible (this test's only)"
  ip link set lo up
  mount -t tmpfs -o mode=1777 tmpfs /tmp                # Ray's /tmp/ray and the launcher's state, private
  WORK=$(mktemp -d /tmp/cluster-smoke.XXXXXX)
  HOME_DIR=$WORK/home; mkdir -p -m 700 "$HOME_DIR/.ssh"
  ssh-keygen -q -t ed25519 -N '' -f "$WORK/host_key"
  ssh-keygen -q -t ed25519 -N '' -f "$WORK/client_key"
  cp "$WORK/client_key.pub" "$HOME_DIR/.ssh/authorized_keys"
  # root's home is $HOME_DIR inside the namespace: sshd sessions (the "nodes") and the launcher use it
  sed "s#^root:\([^:]*\):0:0:\([^:]*\):[^:]*:#root:\1:0:0:\2:$HOME_DIR:#" /etc/passwd > "$WORK/passwd"
  mount --bind "$WORK/passwd" /etc/passwd
  export HOME=$HOME_DIR PATH="$PYBIN:$PATH"
  # the node's environment, as a machine's own ~/.bashrc would set it (Ray sources it for every command)
  cat > "$HOME_DIR/.bashrc" <<EOF
export PATH="$PYBIN:\$PATH" RAY_USAGE_STATS_ENABLED=0 OMP_WAIT_POLICY=PASSIVE
export SPECDISTILL_NODE_SETUP=offline SPECDISTILL_PYTHON="$PYTHON"
EOF
  mkdir -p /run/sshd
  cat > "$WORK/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port 22
HostKey $WORK/host_key
PidFile $WORK/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 50
MaxSessions 50
Subsystem sftp internal-sftp
EOF
  /usr/sbin/sshd -f "$WORK/sshd_config" -E "$WORK/sshd.log"
  HEAD_IP=127.0.0.1; SSH_USER=root; SSH_KEY=$WORK/client_key
  ssh -i "$SSH_KEY" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes \
      root@127.0.0.1 true || { echo "error: sshd on 127.0.0.1 refused the test key"; cat "$WORK/sshd.log"; exit 1; }
else
  WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
  SSH_USER=${SSH_USER:-$USER}; SSH_KEY=${SSH_KEY:-$HOME/.ssh/id_ed25519}
fi

# ---- the cluster config: configs/cluster-onprem.yaml, provider and auth replaced
CLUSTER=$WORK/cluster.yaml
python3 - "$REPO/configs/cluster-onprem.yaml" "$CLUSTER" "$HEAD_IP" "$WORKER_IPS" "$SSH_USER" "$SSH_KEY" <<'EOF'
import sys, yaml
src, dst, head, workers, user, key = sys.argv[1:]
cfg = yaml.safe_load(open(src))
ips = [w for w in workers.split(",") if w]
cfg["cluster_name"] = "specdistill-smoke"
cfg["provider"].update(head_ip=head, worker_ips=ips)
cfg["auth"] = {"ssh_user": user, "ssh_private_key": key}
cfg["min_workers"] = cfg["max_workers"] = len(ips)
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
EOF

NAME=quickstart
CONFIG=configs/quickstart.yaml
# tiny overrides keep the smoke run short; --bench trains the quickstart's specialists as they are
SET=(--set generalist.train.epochs=1 --set generalist.train.max_steps_per_epoch=20)
[ $BENCH = 1 ] || SET+=(--set specialists.train.max_steps_per_epoch=4)
REMOTE_RUN="~/specdistill/runs/$NAME"
SECONDS=0

log "ray up"
step ray up -y "$CLUSTER"

log "ray exec: stages 1-2 into $REMOTE_RUN"
step ray exec "$CLUSTER" "cd ~/specdistill && specdistill run $CONFIG --until clustering ${SET[*]}"

log "ray submit: the specialists (the script runs from the head's home directory)"
began=$(now)
step ray submit "$CLUSTER" train_specialists.py -- --config "$CONFIG" "${SET[@]}"
cluster_s=$(python3 -c "print(f'{$(now) - $began:.1f}')")

log "ray rsync-down: the run directory back to this machine"
RESULTS=$WORK/results
mkdir -p "$RESULTS"
step ray rsync-down "$CLUSTER" "$REMOTE_RUN/" "$RESULTS/$NAME/"
check_run() {   # every group of clusters.json has its specialist, and the stage finished
python3 - "$1" <<'EOF'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
groups = [g["id"] for g in json.loads((run / "clustering" / "clusters.json").read_text())["groups"]]
missing = [m for m in groups if not (run / "specialists" / f"{m:04d}.safetensors").exists()
           or not (run / "specialists" / f"{m:04d}.json").exists()]
assert (run / "generalist" / "model.safetensors").exists(), "no generalist in the run directory"
assert (run / "specialists" / "done.json").exists(), "specialists/done.json missing"
assert not missing, f"specialists missing: {missing}"
print(f"ok: all {len(groups)} specialists beside the generalist and groups the earlier stages wrote, in {run}")
EOF
}
check_run "$RESULTS/$NAME"

log "ray job submit: the Jobs API, run directory on the head's storage"
if [ $LOCAL = 1 ]; then
  DASHBOARD=http://127.0.0.1:8265
else   # the dashboard listens on the head only: forward its port over SSH
  ray dashboard "$CLUSTER" --port 8265 >/dev/null 2>&1 & FORWARD=$!
  sleep 5; DASHBOARD=http://127.0.0.1:8265
fi
step ray job submit --address "$DASHBOARD" --working-dir . -- \
    python -m specdistill.cli run --config "$CONFIG" --until clustering --run-dir "$REMOTE_RUN" "${SET[@]}"
# a driver lost mid-run leaves some specialists unwritten: drop three, the job must train exactly those
step ray exec "$CLUSTER" "rm $REMOTE_RUN/specialists/000[0-2].*"
step ray job submit --address "$DASHBOARD" --working-dir . -- \
    python train_specialists.py --config "$CONFIG" --run-dir "$REMOTE_RUN" "${SET[@]}" | tee "$WORK/job.log"
GROUPS_N=$(python3 -c "import json, sys; print(len(json.load(open(sys.argv[1]))['groups']))" \
           "$RESULTS/$NAME/clustering/clusters.json")
grep -q "specialists: 3 trained, $((GROUPS_N - 3)) reused" "$WORK/job.log" \
  || { echo "error: the job did not train exactly the 3 missing specialists"; exit 1; }
rm -rf "$RESULTS/$NAME"
step ray rsync-down "$CLUSTER" "$REMOTE_RUN/" "$RESULTS/$NAME/"
check_run "$RESULTS/$NAME"
step ray exec "$CLUSTER" "! ls -d /tmp/ray/session_latest/runtime_resources/working_dir_files/*/runs 2>/dev/null"
echo "ok: the job wrote $REMOTE_RUN, nothing in its temporary working directory"
[ -n "${FORWARD:-}" ] && kill "$FORWARD" 2>/dev/null || true

log "ray down"
step ray down -y "$CLUSTER"
total_s=$SECONDS

if [ $BENCH = 1 ]; then
  if [ $LOCAL = 1 ]; then
    log "the same specialists on the embedded Ray, same machine, same run directory"
    began=$(now)
    (cd "$HOME_DIR" && step "$HOME_DIR/specdistill-venv/bin/python" "$HOME_DIR/specdistill/train_specialists.py" \
        --address local --config "$CONFIG" --force "${SET[@]}")
    embedded_s=$(python3 -c "print(f'{$(now) - $began:.1f}')")
    python3 - "$cluster_s" "$embedded_s" <<'EOF'
import sys
cluster, embedded = map(float, sys.argv[1:])
print(f"bench: ray submit on the ray-up cluster {cluster:.1f} s, embedded Ray {embedded:.1f} s, "
      f"ratio {cluster / embedded:.2f}x")
EOF
  else
    echo "bench: ray submit on the cluster ${cluster_s} s (run train_specialists.py --address local on one machine to compare)"
  fi
fi
log "cluster smoke test passed in ${total_s} s (ray submit ${cluster_s} s)"
