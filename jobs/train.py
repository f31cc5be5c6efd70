"""`ray job submit --working-dir . -- python jobs/train.py --config FILE [key=value ...]`
(or `--resume RUN_DIR`)

The same arguments as `sfumato train`; the run folder (train.output_dir) and the shards must be on
storage every node sees.
"""

import sys

from sfumato.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
