"""`ray job submit --working-dir . -- python jobs/evaluate.py RUN_DIR [--checkpoint step-N] [key=value ...]`

The same arguments as `sfumato evaluate`; the run folder must be on storage the driver can read.
"""

import sys

from sfumato.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
