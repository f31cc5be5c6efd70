"""`ray job submit --working-dir . -- python jobs/safety.py --config FILE [key=value ...]`

The same arguments as `sfumato safety`; the cluster's nodes have sfumato installed (cluster.yaml).
"""

import sys

from sfumato.cli import main

if __name__ == "__main__":
    sys.exit(main(["safety", *sys.argv[1:]]))
