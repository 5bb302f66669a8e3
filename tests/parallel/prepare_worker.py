"""torchrun worker: python -m phased_dmd_mp.prepare on each rank (tests/test_prepare.py).

With KILL_RANK=r, rank r dies (os._exit, as a killed process: no cleanup) right after writing
its first shard, so torchrun stops the others: an interrupted multi-rank prepare."""

import os
import sys

from phased_dmd_mp import prepare

if os.environ.get("KILL_RANK") == os.environ["RANK"]:
    real_save = prepare.save_shard

    def save_then_die(tensors, path):
        real_save(tensors, path)
        os._exit(9)

    prepare.save_shard = save_then_die

sys.exit(prepare.main(sys.argv[1:]))
