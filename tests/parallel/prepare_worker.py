"""torchrun worker: python -m phased_dmd_mp.prepare on each rank (tests/test_prepare.py).

With KILL_RANK=r, rank r dies (os._exit, as a killed process: no cleanup) right after writing
its first shard, so torchrun stops the others: an interrupted multi-rank prepare."""

import os
import sys

from phased_dmd_mp import atomic, prepare

if os.environ.get("KILL_RANK") == os.environ["RANK"]:
    real_save = atomic.save_safetensors

    def save_then_die(tensors, path, metadata=None):
        real_save(tensors, path, metadata)
        os._exit(9)

    atomic.save_safetensors = save_then_die

sys.exit(prepare.main(sys.argv[1:]))
