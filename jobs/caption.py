"""`ray job submit --working-dir . -- python jobs/caption.py --config FILE [key=value ...]`

The same arguments as `sfumato caption`; the cluster's nodes have sfumato installed (cluster.yaml).
"""

import sys

from sfumato.cli import main

if __name__ == "__main__":
    sys.exit(main(["caption", *sys.argv[1:]]))
