"""``python -m affectfast.doctor ddp-worker SHARDS FOLDER DEVICE BATCH SIZE``: what torchrun starts."""

import sys

from affectfast.doctor.ddp import main

main(sys.argv[1:])
