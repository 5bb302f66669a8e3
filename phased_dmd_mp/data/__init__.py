"""What the distillation reads instead of data: condition sets (conditions.py: format and
reader; condition_writer.py; online.py: prompts encoded when drawn), user inputs (readers.py),
diffusers pipeline folders and their encoders (pipeline_folder.py, encoders.py), the embedded
teachers' data (digits.py: scikit-learn's digits and class embeddings; mixture.py: a 2D Gaussian
mixture) and teacher directories (teacher.py)."""

from phased_dmd_mp.data.condition_writer import ConditionSetWriter, write_condition_set
from phased_dmd_mp.data.conditions import ConditionSampler, ConditionSet, open_conditions
from phased_dmd_mp.data.teacher import (
    TeacherSpec,
    load_transformer,
    read_conditions,
    read_spec,
)

__all__ = [
    "ConditionSampler",
    "ConditionSet",
    "ConditionSetWriter",
    "TeacherSpec",
    "load_transformer",
    "open_conditions",
    "read_conditions",
    "read_spec",
    "write_condition_set",
]
