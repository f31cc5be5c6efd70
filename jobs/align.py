"""`ray job submit --working-dir . -- python jobs/align.py --config FILE [--from RUN_DIR] [key=value ...]`

The same arguments as `sfumato align`; the parent run folder, the new run's folder and its data
(shards, the pairs table) must be on storage every node sees.
"""

import sys

from sfumato.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))
