#!/usr/bin/env bash
# Install specdistill on one cluster node into a virtual environment and make that environment the
# one every later command of the node runs (`ray start`, `ray submit`'s `python`, `ray exec`).
#
#   bash ~/specdistill/scripts/node-setup.sh      # what setup_commands in cluster.yaml and
#                                                 # configs/cluster-onprem.yaml run on every node
#
# A virtual environment, not `pip install --user`: current Ubuntu and Debian images refuse user
# installs into the system Python (PEP 668). `pip install -e .` installs the pins of pyproject.toml,
# so the head and every worker get the same torch/torchvision pair. Safe to run again (`ray up`
# reruns it after every change): it updates the same environment.
#
# Environment:
#   SPECDISTILL_VENV         where the environment lives (default ~/specdistill-venv)
#   SPECDISTILL_PYTHON       the interpreter that creates it (default python3, >= 3.10)
#   SPECDISTILL_NODE_SETUP   "online" (default): install the project and its pinned dependencies
#                            from the package index. "offline": for machines without an index, e.g.
#                            scripts/cluster-smoke.sh: a --system-site-packages environment that
#                            reuses the packages SPECDISTILL_PYTHON already has (torch, ray, ...)
#                            and installs only the project itself (--no-deps).
#   SPECDISTILL_EXTRAS       the optional dependencies (default "cpu": faiss-cpu; "gpu" on CUDA
#                            nodes brings the official faiss-gpu wheels instead)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPECDISTILL_VENV:-$HOME/specdistill-venv}
PY=${SPECDISTILL_PYTHON:-python3}
MODE=${SPECDISTILL_NODE_SETUP:-online}
EXTRAS=${SPECDISTILL_EXTRAS:-cpu}
case "$MODE" in online|offline) ;; *) echo "error: SPECDISTILL_NODE_SETUP=$MODE; use online or offline" >&2; exit 2;; esac

if [ ! -x "$VENV/bin/python" ]; then
  # offline: the base's pip and setuptools too (3.11's ensurepip would shadow them with old ones)
  flags=(); [ "$MODE" = offline ] && flags=(--system-site-packages --without-pip)
  if ! "$PY" -m venv "${flags[@]}" "$VENV" 2>/dev/null; then
    # Ubuntu and Debian ship venv separately
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    rm -rf "$VENV"
    if [ "$MODE" = online ] && command -v apt-get >/dev/null \
        && $SUDO apt-get install -y -qq python3-venv >/dev/null 2>&1 && "$PY" -m venv "${flags[@]}" "$VENV"; then
      :
    else
      echo "error: $PY cannot create a virtual environment; install python3-venv (apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
if [ "$MODE" = offline ]; then
  "${pip[@]}" install --no-deps --no-build-isolation -e .
  # a --system-site-packages environment sees the base's packages but not their commands: give it
  # a `ray` that runs this environment's Python, so Ray's workers import the project installed here
  printf '#!%s\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n' "$VENV/bin/python" > "$VENV/bin/ray"
  chmod +x "$VENV/bin/ray"
else
  "${pip[@]}" install -U pip
  "${pip[@]}" install -e ".[$EXTRAS]"
fi

# the pinned pair must load together (a CPU-only torch cannot load the registry's torchvision)
if ! "$VENV/bin/python" -c "import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)"; then
  echo "error: torch and torchvision in $VENV do not load together; reinstall the pinned pair:" \
       "$VENV/bin/python -m pip install --force-reinstall torch==2.14.1 torchvision==0.29.1" >&2
  exit 1
fi

# Ray runs every command in `bash --login -i` after `source ~/.bashrc`: activate the environment there
line="source $VENV/bin/activate  # specdistill: scripts/node-setup.sh"
grep -qxF "$line" ~/.bashrc 2>/dev/null || echo "$line" >> ~/.bashrc
"$VENV/bin/python" - <<'EOF'
import platform, torch, torchvision, ray, specialists
print(f"specdistill node ready: Python {platform.python_version()}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, ray {ray.__version__}, project {specialists.__path__[0]}")
EOF
