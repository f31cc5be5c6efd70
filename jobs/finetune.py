"""`ray job submit --working-dir . -- python jobs/finetune.py --config FILE [--from RUN_DIR] [key=value ...]`

The same arguments as `sfumato finetune`; the parent run folder, the new run's folder and its data
(shards ) must be on storage every node sees.
"""

import sys

from sfumato.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
