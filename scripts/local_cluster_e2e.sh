#!/usr/bin/env bash
# End to end on this machine, the way a user runs a Ray cluster:
#   sshd on 127.0.0.1:22 -> ray up ray_cluster_local.yaml -> ray submit pipeline/run.py (demo)
#   -> MLflow (the head's tracking server) has runs of every stage kind
#   -> ray submit ... --stage fuse --force -> only fusion ran -> ray down.
#
# Isolation: the whole check runs in its own PID, mount and network namespaces (unshare).
# `ray down` and the cluster's start commands run `ray stop`, which stops every Ray
# process it can see; in the namespace it sees only this cluster's. The network namespace
# has its own 127.0.0.1, so sshd on port 22, Ray on 6379 and MLflow on 5000 cannot clash
# with servers on the host, and /tmp/ray is private. When the script ends, the kernel ends
# every process it started (they are all in its PID namespace).
#
# Usage: scripts/local_cluster_e2e.sh [--dir DIR] [-- EXTRA --set OVERRIDES for run.py]
# Needs root (sshd, namespaces), openssh-server and rsync (installed with apt-get when
# missing), and a Python environment with the project installed (the one running this
# script: $VIRTUAL_ENV, else the `python3` on PATH).
# Exit status: 0 passed, 1 failed, 77 cannot run here (the reason is the last line).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$ROOT/scripts/$(basename "${BASH_SOURCE[0]}")"

say() { printf '[e2e %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
skip() { say "cannot run here: $*"; echo "SKIP: $*"; exit 77; }
fail() { say "FAILED: $*"; exit 1; }

DIR=""
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR="$2"; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,20p' "$SCRIPT"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

if [ -z "${VGG_E2E_INSIDE:-}" ]; then
    # ---- outside the namespaces: requirements, then re-run this script inside them ----
    [ "$(id -u)" = 0 ] || skip "needs root (to run sshd and create namespaces)"
    if ! command -v /usr/sbin/sshd > /dev/null || ! command -v rsync > /dev/null; then
        command -v apt-get > /dev/null || skip "openssh-server and rsync are missing and there is no apt-get"
        say "installing openssh-server and rsync (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server rsync > /dev/null 2>&1 ||
            { apt-get update -q > /dev/null 2>&1 &&
              DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server rsync > /dev/null 2>&1; } ||
            skip "apt-get could not install openssh-server and rsync"
    fi
    command -v unshare > /dev/null || skip "unshare (util-linux) is missing"
    command -v ip > /dev/null || skip "ip (iproute2) is missing: it brings up the namespace's loopback"
    unshare --net --pid --fork --mount-proc true 2> /dev/null ||
        skip "cannot create PID/mount/network namespaces here (unshare failed)"
    PY="${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}"
    PY="${PY:-$(command -v python3)}"
    "$PY" -c "import pipeline, ray, mlflow" 2> /dev/null ||
        skip "$PY cannot import the project (install it: pip install -e .)"
    VGG_VENV="$("$PY" -c 'import sys; print(sys.prefix)')"
    [ -x "$VGG_VENV/bin/ray" ] || skip "no ray command in $VGG_VENV/bin"
    [ -n "$DIR" ] || DIR="$(mktemp -d /tmp/vgg-e2e.XXXXXX)"
    mkdir -p "$DIR"
    export VGG_E2E_INSIDE=1 VGG_VENV
    say "entering private PID/mount/network namespaces (work dir $DIR)"
    exec unshare --net --pid --fork --mount-proc --kill-child \
        bash "$SCRIPT" --dir "$DIR" -- "${EXTRA[@]}"
fi

# ---- inside: PID 1 of a fresh PID namespace, alone on a fresh loopback ----
# (PID 1 ignores signals it has no handler for; on exit the kernel ends the namespace)
trap 'say "interrupted"; exit 130' INT TERM HUP
DIR="$(cd "$DIR" && pwd)"
export PATH="$VGG_VENV/bin:$PATH"
export HOME="$DIR/home"            # ~ of both the launching side and the "remote" head
NAME="vgg-e2e-$$-$RANDOM"         # cluster name: its own launcher state files in /tmp
mkdir -p "$HOME/.ssh" "$DIR/ray-tmp" /tmp/ray /run/sshd
ip link set lo up
mount --bind "$DIR/ray-tmp" /tmp/ray   # Ray's sessions and address file stay private
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS MLFLOW_TRACKING_URI

say "sshd on 127.0.0.1:22 (keys and config in $DIR)"
ssh-keygen -q -t ed25519 -N "" -f "$HOME/.ssh/vgg_local_cluster"
ssh-keygen -q -t ed25519 -N "" -f "$DIR/ssh_host_ed25519_key"
cp "$HOME/.ssh/vgg_local_cluster.pub" "$DIR/authorized_keys"
cat > "$DIR/sshd_config" << EOF
ListenAddress 127.0.0.1
Port 22
HostKey $DIR/ssh_host_ed25519_key
PidFile $DIR/sshd.pid
AuthorizedKeysFile $DIR/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
# The node's environment: the project's virtual environment and a private home.
SetEnv HOME=$HOME VGG_VENV=$VGG_VENV${PYTHONPATH:+ PYTHONPATH=$PYTHONPATH}
Subsystem sftp internal-sftp
EOF
/usr/sbin/sshd -f "$DIR/sshd_config" -E "$DIR/sshd.log" || fail "sshd did not start (see $DIR/sshd.log)"
for i in $(seq 20); do   # sshd daemonizes before it listens
    ssh -q -i "$HOME/.ssh/vgg_local_cluster" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o BatchMode=yes root@127.0.0.1 true 2> /dev/null && break
    [ "$i" = 20 ] && fail "ssh root@127.0.0.1 does not work (see $DIR/sshd.log)"
    sleep 0.5
done

cd "$ROOT"   # file_mounts' "." is the project
# The committed cluster file, with the key's absolute path: ssh expands "~" to the
# account's home (/root), not to $HOME.
CLUSTER_YAML="$DIR/ray_cluster_local.yaml"
sed "s|~/.ssh/vgg_local_cluster|$HOME/.ssh/vgg_local_cluster|" "$ROOT/ray_cluster_local.yaml" > "$CLUSTER_YAML"
ray get-auth-token --generate > /dev/null   # the cluster's token, file-mounted to every node

say "ray up"
ray up -y --no-config-cache -n "$NAME" "$CLUSTER_YAML" > "$DIR/ray_up.log" 2>&1 ||
    { tail -40 "$DIR/ray_up.log"; fail "ray up (log: $DIR/ray_up.log)"; }

WORK="$DIR/work"
RUN=(--config configs/demo.yaml --set "work_dir=$WORK" "${EXTRA[@]}")
say "ray submit: the demo pipeline"
ray submit --no-config-cache -n "$NAME" "$CLUSTER_YAML" pipeline/run.py -- "${RUN[@]}" 2>&1 |
    tee "$DIR/submit_all.log" || fail "ray submit (whole pipeline)"

say "ray submit: fusion alone (--stage fuse --force)"
ray submit --no-config-cache -n "$NAME" "$CLUSTER_YAML" pipeline/run.py -- "${RUN[@]}" --stage fuse --force 2>&1 |
    tee "$DIR/submit_fuse.log" || fail "ray submit (fuse)"

say "checking the head's MLflow server"
python "$ROOT/scripts/check_cluster_runs.py" --tracking-uri http://127.0.0.1:5000 \
    --experiment vgg-demo --out "$DIR/summary.json" || fail "MLflow does not show the expected runs"

say "ray down"
ray down -y -n "$NAME" "$CLUSTER_YAML" > "$DIR/ray_down.log" 2>&1 ||
    { tail -20 "$DIR/ray_down.log"; fail "ray down"; }
if pgrep -f "raylet|gcs_server" > /dev/null; then fail "Ray processes are still running after ray down"; fi
say "PASSED"
