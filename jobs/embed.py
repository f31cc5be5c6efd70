"""`ray job submit --working-dir . -- python jobs/embed.py --config FILE [key=value ...]`

The same arguments as `sfumato embed`; the cluster's nodes have sfumato installed (cluster.yaml).
"""

import sys

from sfumato.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
