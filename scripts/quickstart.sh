#!/usr/bin/env bash
# The embedded default end to end, on CPU: train the digits teacher, distill it into a 4-step,
# 2-expert generator with Phased DMD, sample both (teacher: 40 steps with CFG; student: 4 steps)
# and evaluate them side by side.  ~15 minutes on 2 cores.
#
#     bash scripts/quickstart.sh [OUT]        (default OUT: runs/quickstart)
#
# Writes OUT/teacher, OUT/distill, OUT/samples/{teacher,student} and OUT/eval (results.md,
# comparison.png: teacher 40 steps vs student 4 steps). Refuses to overwrite an existing OUT.
set -euo pipefail
out="${1:-runs/quickstart}"
if [ -e "$out" ]; then
    echo "quickstart: $out already exists; remove it or pass another directory" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")/.." && pwd)"
set -x
python -m phased_dmd_mp.pretrain_teacher --config "$here/configs/digits_teacher.yaml" \
    --out "$out/teacher"
python -m phased_dmd_mp.pretrain_distill --config "$here/configs/digits_phased_dmd.yaml" \
    --set teacher="$out/teacher" --out "$out/distill"
python -m phased_dmd_mp.sample --teacher "$out/teacher" --seeds 16 --out "$out/samples/teacher"
python -m phased_dmd_mp.sample --checkpoint "$out/distill" --seeds 16 --out "$out/samples/student"
python -m phased_dmd_mp.evaluate "$out/samples/teacher/samples.npz" \
    "$out/samples/student/samples.npz" --out "$out/eval"
