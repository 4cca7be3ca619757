"""Train the specialists on Ray: the entry script for a cluster (stage 3 of specdistill).

    python train_specialists.py --config configs/quickstart.yaml                 # embedded Ray, this machine
    ray submit cluster.yaml train_specialists.py -- --config configs/hanzi-1k.yaml
    ray job submit --working-dir . -- python train_specialists.py --config configs/hanzi-1k.yaml

Options: --config, --run-dir, --set KEY=VALUE (repeatable), --address (host:port, 'auto', 'local'),
--force. Without --address it uses RAY_ADDRESS (set by ``ray job submit``), else a cluster started on
this machine with ``ray start`` (the head node under ``ray submit``), else an embedded Ray sized to
this machine. See docs/cluster.md.
"""

from specialists.fanout import main

if __name__ == "__main__":
    main()
