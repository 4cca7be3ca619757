"""Train the specialists on Ray: the entry script for a cluster (stage 3 of specdistill).

    python train_specialists.py --config configs/quickstart.yaml                 # embedded Ray, this machine
    ray submit cluster.yaml train_specialists.py -- --config configs/hanzi-1k.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python train_specialists.py --config configs/hanzi-1k.yaml --run-dir '~/specdistill/runs/hanzi-1k'

Options: --config, --run-dir, --set KEY=VALUE (repeatable), --address (host:port, 'auto', 'local'),
--force. Without --address it uses RAY_ADDRESS (set by ``ray job submit``), else a cluster started on
this machine with ``ray start`` (the head node under ``ray submit``), else an embedded Ray sized to
this machine. ``ray submit`` runs this script from the head's home directory: the config and the
run directory are found from the checkout the project is installed from (or ``$SPECDISTILL_HOME``),
not the current directory, and the run directory is printed first. See docs/cluster.md.
"""

from specialists.fanout import main

if __name__ == "__main__":
    main()
