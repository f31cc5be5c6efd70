"""`ray job submit --working-dir . -- python jobs/tune.py --config configs/tune.yaml [--resume] [key=value ...]`

The same arguments as `sfumato tune`; tune.output_dir (every trial's run folder) and the shards
must be on storage every node sees. Trials run concurrently up to tune.search.max_concurrent_trials,
each taking the proxy's train.num_workers workers.
"""

import sys

from sfumato.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
