"""`ray job submit --working-dir . -- python jobs/export.py RUN_DIR [--checkpoint step-N] [key=value ...]`

The same arguments as `sfumato export`; the run folder must be on storage the driver can read.
"""

import sys

from sfumato.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
