"""torchrun worker: rehearse several shipped recipes in one process group, one after another.

    torchrun --nproc_per_node=2 tests/parallel/rehearsal_worker.py OUT RECIPE=TEACHER[+K=V]...

Each RECIPE (a file name in configs/) runs through `pretrain_distill.main`, as a user launches
it, with tests/rehearsal.py's overrides for this world size (and the K=V config overrides after
each "+", e.g. the levers), into OUT/<recipe stem>. Recipes may
scale to different layouts (TP=2 for a TP=8 recipe, DP=2 for a data-parallel one): megatron's
model-parallel groups are rebuilt between them.
"""

import os
import sys
from pathlib import Path

from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).parents[1]))
from rehearsal import CONFIGS, rehearsal_overrides

from phased_dmd_mp import pretrain_distill


def main() -> None:
    out, *items = sys.argv[1:]
    world_size = int(os.environ["WORLD_SIZE"])
    for item in items:
        item, *extra = item.split("+")
        name, teacher = item.split("=", 1)
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        args = ["--config", str(CONFIGS / name), "--out", str(Path(out) / Path(name).stem)]
        for override in [*rehearsal_overrides(name, Path(teacher), world_size), *extra]:
            args += ["--set", override]
        code = pretrain_distill.main([*args, "--no-progress"])
        assert code == 0, f"{name}: exit code {code}"


if __name__ == "__main__":
    main()
