"""Everything a distillation config points at, checked before any model loads.

`validate_run(config, world_size)` reads small files: the teacher's teacher.yaml, the
config.json of each teacher transformer (diffusers format or our sharded one) and the condition
set's manifest (its shards stat'ed against the sizes it records, not read; an online set's prompt
files and pipeline folder must exist; the items are read only when the manifest does not record
them finite). It raises `phased_dmd_mp.config.ConfigError`, one line naming the key or file and
both values, for what would otherwise fail after every rank loaded a 14B teacher:

- paths: `teacher` (with teacher.yaml and transformer/config.json, or the transformer folder
  teacher.yaml names), `teacher_low_noise` (a transformer folder; default teacher.yaml's
  `transformer_2`, which needs a boundary: `moe_boundary` or teacher.yaml's `boundary_ratio`),
  `conditions` (default <teacher>/conditions);
- the latent shape of teacher.yaml against the transformer: Wan takes latent channels (+ the
  conditions' image-latent channels, I2V) as in_channels and returns the latent channels as
  out_channels; Qwen-Image packs 2x2 patches of single-frame latents, so in_channels = 4 x
  channels; patch sizes divide frames/height/width;
- the conditions against the transformer: text width = text_dim (Wan) / joint_attention_dim
  (Qwen-Image), image latents on the latent grid, CLIP image tokens exactly when the model has
  an image embedder (Wan2.1 I2V), first-frame latents (Wan2.2 TI2V) of one latent frame; every value finite (a set whose manifest does not record
  that its writer checked it is read once; data/readers.py `check_finite`);
- a two-expert teacher's experts have the same architecture;
- the config's `architecture` and `latent_shape` (preflight's facts before the teacher is on
  disk), where set, are the teacher's;
- a `student` (its transformer folder) shares the teacher's latent space and conditioning
  (latent channels, patch size, text width, image conditioning), whatever its size, and is
  the `student_architecture` where that is set;
- each of `latent_shapes` against the transformer as teacher.yaml's shape, and on the grid of
  the conditions' image latents when there are any;
- the real latents (`real_data`, default <teacher>/real_data) where a lever needs them, against
  teacher.yaml's latent shape;
- every phase's noise-injection interval overlaps `t_range` and its `phase_t_ranges` entry at
  the run's shift (`shift`, default teacher.yaml's), which would otherwise fail when the phase
  starts;
- the parallel layout (phased_dmd_mp/parallel/layout.py) on `world_size` ranks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data.conditions import MANIFEST, ConditionSet, check_files, read_manifest
from phased_dmd_mp.data.readers import check_finite
from phased_dmd_mp.data.real_data import real_data_dir
from phased_dmd_mp.data.teacher import (
    CONDITIONS_DIR,
    SPEC_FILE,
    TRANSFORMER_DIR,
    read_spec,
    student_transformer,
    teacher_experts,
)
from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.models.config import (
    QwenImageConfig,
    WanConfig,
    architecture_file,
    read_architecture,
)
from phased_dmd_mp.models.convert import read_diffusers_config, read_layout
from phased_dmd_mp.parallel.layout import check_layout


def read_transformer_arch(directory: Path, key: str) -> WanConfig | QwenImageConfig:
    """The architecture in a transformer folder's config.json: diffusers format or our sharded
    checkpoint (`python -m phased_dmd_mp.models.convert to-ours`)."""
    config_path = directory / "config.json"
    if not directory.is_dir():
        raise ConfigError(f"{key}: {directory} does not exist (expected a transformer folder)")
    if not config_path.is_file():
        raise ConfigError(f"{key}: {directory} has no config.json (expected a transformer folder)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{config_path} is not valid JSON: {error}") from error
    if "_class_name" in config:
        return read_diffusers_config(directory)[1]
    return read_layout(directory)[0]


def _check_experts_agree(high, low, high_file: Path, low_file: Path) -> None:
    if type(high) is not type(low):
        raise ConfigError(
            f"teacher_low_noise: {low_file} is a {type(low).__name__}, {high_file} a "
            f"{type(high).__name__}"
        )
    if differing := first_differing_field(high, low):
        name, a, b = differing
        raise ConfigError(
            f"teacher_low_noise: {name} = {b} in {low_file}, but {a} in the "
            f"high-noise expert's {high_file}; the two experts must share an architecture"
        )


def first_differing_field(a, b) -> tuple[str, object, object] | None:
    """(name, a's value, b's value) of the first field two architecture configs of one type
    disagree on; None when they are equal."""
    for field in dataclasses.fields(a):
        if getattr(a, field.name) != getattr(b, field.name):
            return field.name, getattr(a, field.name), getattr(b, field.name)
    return None


# What a student shares with its teacher: the latent space and the conditioning it reads.
SHARED_WITH_STUDENT = {
    WanConfig: ("in_channels", "out_channels", "patch_size", "text_dim", "image_dim",
                "pos_embed_seq_len"),
    QwenImageConfig: ("in_channels", "out_channels", "patch_size", "joint_attention_dim"),
}  # fmt: skip


def check_student(teacher, student, teacher_file: Path, student_file: Path) -> None:
    """A student may differ from the teacher in size (widths, layers, heads), not in what its
    inputs and outputs mean. Raises ConfigError naming both values and files."""
    if type(teacher) is not type(student):
        raise ConfigError(
            f"student: {student_file} is a {type(student).__name__}, the teacher's "
            f"{teacher_file} a {type(teacher).__name__}; a student must be of the teacher's family"
        )
    for name in SHARED_WITH_STUDENT[type(teacher)]:
        ours, theirs = getattr(student, name), getattr(teacher, name)
        if ours != theirs:
            raise ConfigError(
                f"student: {name} = {ours} in {student_file}, but {theirs} in the teacher's "
                f"{teacher_file}; a student shares the teacher's latent space and conditioning"
            )


def check_latents(arch, latent_shape, image_channels: int, spec_file: Path, arch_file: Path):
    channels, *grid = latent_shape
    if isinstance(arch, WanConfig):
        patch = arch.patch_size
        expected_in = channels + image_channels
        what = f"latent channels {channels}" + (
            f" + image-latent channels {image_channels} = {expected_in}" if image_channels else ""
        )
        if arch.in_channels != expected_in:
            raise ConfigError(
                f"in_channels = {arch.in_channels} in {arch_file}, but {what} from {spec_file}"
            )
    else:
        patch = (1, arch.patch_size, arch.patch_size)
        if grid[0] != 1:
            raise ConfigError(
                f"latent_shape {list(latent_shape)} in {spec_file} has {grid[0]} frames; "
                f"Qwen-Image ({arch_file}) takes single-frame latents"
            )
        expected_in = channels * arch.patch_size**2
        if arch.in_channels != expected_in:
            raise ConfigError(
                f"in_channels = {arch.in_channels} in {arch_file}, but latent channels {channels} "
                f"from {spec_file} packed in {arch.patch_size}x{arch.patch_size} patches give "
                f"{expected_in}"
            )
    if arch.out_channels != channels:
        raise ConfigError(
            f"out_channels = {arch.out_channels} in {arch_file}, but latent_shape in {spec_file} "
            f"has {channels} channels"
        )
    for name, size, p in zip(("frames", "height", "width"), grid, patch):
        if size % p:
            raise ConfigError(
                f"latent {name} = {size} in {spec_file} is not divisible by the patch size {p} "
                f"of {arch_file}"
            )


def _check_first_frame(arch, shape, latent_shape, manifest: Path, arch_file: Path) -> None:
    """first_frame_latents (Wan2.2 TI2V image-to-video) stand in for frame 0 of the latents:
    one frame of the latent's channels and grid, for a Wan model that takes the latents alone
    and patches frames one by one, of a video of more than one latent frame."""
    expected = [latent_shape[0], 1, *latent_shape[2:]]
    if list(shape) != expected:
        raise ConfigError(
            f"first_frame_latents in {manifest} are {list(shape)} per item, but {expected} "
            "(one latent frame) from teacher.yaml"
        )
    if not isinstance(arch, WanConfig) or arch.in_channels != arch.out_channels:
        raise ConfigError(
            f"{manifest} has first_frame_latents (Wan2.2 TI2V image-to-video), which the model "
            f"in {arch_file} does not take (a Wan model with in_channels = out_channels does)"
        )
    if arch.patch_size[0] != 1 or latent_shape[1] < 2:
        raise ConfigError(
            f"first_frame_latents in {manifest} need a patch size of 1 in time (here "
            f"{arch.patch_size[0]}, {arch_file}) and more than one latent frame (teacher.yaml: "
            f"{latent_shape[1]})"
        )


def _check_conditions(arch, specs: dict, latent_shape, manifest: Path, arch_file: Path) -> None:
    text_dim = arch.text_dim if isinstance(arch, WanConfig) else arch.joint_attention_dim
    key = "text_dim" if isinstance(arch, WanConfig) else "joint_attention_dim"
    width = specs["text"][0][-1]
    if width != text_dim:
        raise ConfigError(
            f"the text embeddings in {manifest} are {width} wide, but {key} = {text_dim} in "
            f"{arch_file}"
        )
    if "image_latents" in specs:
        shape = specs["image_latents"][0]
        if isinstance(arch, QwenImageConfig):
            raise ConfigError(
                f"{manifest} has image_latents, which Qwen-Image ({arch_file}) does not take"
            )
        if len(shape) != 4 or list(shape[1:]) != list(latent_shape[1:]):
            raise ConfigError(
                f"image_latents in {manifest} are {list(shape)} per item, but [channels, "
                f"*{list(latent_shape[1:])}] on the latent grid of teacher.yaml"
            )
    if "first_frame_latents" in specs:
        _check_first_frame(arch, specs["first_frame_latents"][0], latent_shape, manifest, arch_file)
    image_dim = getattr(arch, "image_dim", None)
    if ("image_embeds" in specs) != (image_dim is not None):
        raise ConfigError(
            f"{manifest} has image_embeds but {arch_file} has no image embedder (image_dim)"
            if image_dim is None
            else f"{arch_file} attends to CLIP image tokens (image_dim = {image_dim}) but "
            f"{manifest} has no image_embeds"
        )
    if image_dim is not None and specs["image_embeds"][0][-1] != image_dim:
        raise ConfigError(
            f"the image_embeds in {manifest} are {specs['image_embeds'][0][-1]} wide, but "
            f"image_dim = {image_dim} in {arch_file}"
        )


def _check_latent_shapes(config, arch, prepared, specs: dict, image_channels, arch_file) -> None:
    """Each of `latent_shapes` fits the model (channels, patch sizes); image conditions, made
    on the grid of the prepared shape, allow no other grid."""
    for shape in config.latent_shapes:
        check_latents(arch, shape, image_channels, f"latent_shapes entry {list(shape)}", arch_file)
        spatial = [name for name in ("image_latents", "first_frame_latents") if name in specs]
        if not spatial:
            continue
        # a first frame fixes the grid, image latents (all frames) the frame count too
        same_grid = list(shape[2:]) == list(prepared[2:]) and shape[1] > 1
        if not same_grid or ("image_latents" in specs and shape[1] != prepared[1]):
            raise ConfigError(
                f"latent_shapes entry {list(shape)}: the teacher's {spatial[0]} are on the grid "
                f"of its prepared latent_shape {list(prepared)}; image-conditioned teachers "
                "train at the size they were prepared at"
            )


def validate_run(config: DistillConfig, world_size: int) -> None:
    """Check the files `config` points at and its layout on `world_size` ranks (module
    docstring); reads no weights. Raises ConfigError."""
    teacher = Path(config.teacher)
    spec = read_spec(teacher)  # the directory and teacher.yaml
    spec_file = teacher / SPEC_FILE
    transformer, low, _ = teacher_experts(
        teacher, spec, config.teacher_low_noise, config.moe_boundary
    )
    if spec.transformer is None and not transformer.is_dir():
        raise ConfigError(
            f"teacher {config.teacher!r} has no {TRANSFORMER_DIR}/: point `teacher` at a "
            "directory written by `python -m phased_dmd_mp.pretrain_teacher` or `python -m "
            "phased_dmd_mp.prepare` (or laid out like one)"
        )
    arch = read_transformer_arch(transformer, "teacher")
    arch_file = transformer / "config.json"
    check_named_teacher(config, arch, arch_file, spec.latent_shape, spec_file)
    if low is not None:
        low_key = "teacher_low_noise" if config.teacher_low_noise else f"{spec_file} transformer_2"
        low_arch = read_transformer_arch(low, low_key)
        _check_experts_agree(arch, low_arch, arch_file, low / "config.json")

    conditions = Path(config.conditions) if config.conditions else teacher / CONDITIONS_DIR
    key = "conditions" if config.conditions else "teacher"
    try:
        manifest = read_manifest(conditions)
        check_files(conditions, manifest)
    except ConfigError as error:
        raise ConfigError(f"{key}: {error}") from None
    specs = manifest["specs"]
    image_channels = specs["image_latents"][0][0] if "image_latents" in specs else 0
    check_latents(arch, spec.latent_shape, image_channels, spec_file, arch_file)
    _check_conditions(arch, specs, spec.latent_shape, conditions / MANIFEST, arch_file)
    _check_latent_shapes(config, arch, spec.latent_shape, specs, image_channels, arch_file)
    for lever in ("real_critic_weight", "gan_weight"):
        if getattr(config, lever):
            real_data_dir(config.real_data, teacher, spec.latent_shape, lever)
    check_run_layout(arch, config, world_size)
    shift = config.shift or spec.shift
    for phase in range(1, config.num_phases + 1):
        try:
            config.injection_range(phase, shift)
        except ValueError as error:
            raise ConfigError(f"{error} at shift {shift:g}") from None
    if config.student is not None:
        student = student_transformer(config.student)
        student_arch = read_transformer_arch(student, "student")
        check_student(arch, student_arch, arch_file, student / "config.json")
        if config.ida_weight and config.fake_init == "teacher" and student_arch != arch:
            raise ConfigError(
                f"ida_weight: the generator starts from the student {student}, the fake model "
                "from the teacher (fake_init: teacher), another architecture: IDA blends one "
                "into the other weight by weight; set fake_init: student"
            )
        if config.student_architecture is not None:
            check_named_architecture("student_architecture", config.student_architecture,
                                     student_arch, student / "config.json", "student")  # fmt: skip
        try:  # the teacher passed: name the model that does not divide
            check_run_layout(student_arch, config, world_size)
        except ConfigError as error:
            raise ConfigError(f"student ({student / 'config.json'}): {error}") from None
    stored = manifest["text_tokens"] != "online"  # an online set is encoded (and checked) live
    if stored and not manifest["finite"]:  # last: the only check that reads more than small files
        try:
            check_finite(ConditionSet(conditions))
        except ConfigError as error:
            raise ConfigError(f"{key}: {error}") from None


def check_named_architecture(key: str, name: str, arch, arch_file: Path, whose: str) -> None:
    """The architecture config key `key` names (`name`: a configs/models/ name or a YAML path)
    is `arch`, read from `whose` model's `arch_file` (ConfigError naming a differing field)."""
    named, file = read_architecture(name), architecture_file(name)
    if type(named) is not type(arch):
        raise ConfigError(
            f"{key}: {file} is a {type(named).__name__}, the {whose}'s {arch_file} a "
            f"{type(arch).__name__}; set {key} to the {whose}'s (or null)"
        )
    if differing := first_differing_field(named, arch):
        name, ours, theirs = differing
        raise ConfigError(
            f"{key}: {name} = {ours} in {file}, but {theirs} in the "
            f"{whose}'s {arch_file}; set {key} to the {whose}'s (or null)"
        )


def check_named_teacher(config: DistillConfig, arch, arch_file: Path, latent_shape, spec_file):
    """The config's `architecture` and `latent_shape` (what preflight plans with before the
    teacher is on disk), where given, are the teacher directory's own (ConfigError)."""
    if config.architecture is not None:
        check_named_architecture("architecture", config.architecture, arch, arch_file, "teacher")
    if config.latent_shape is not None and tuple(config.latent_shape) != tuple(latent_shape):
        raise ConfigError(
            f"latent_shape: {list(config.latent_shape)} in the config, but "
            f"{list(latent_shape)} in {spec_file}; set it to the teacher's (or null)"
        )


def check_run_layout(arch, config: DistillConfig, world_size: int) -> None:
    """parallel/layout.py's rules for this config's layout on world_size ranks (ConfigError)."""
    check_layout(
        arch,
        tensor_parallel=config.tensor_parallel,
        pipeline_parallel=config.pipeline_parallel,
        context_parallel=config.context_parallel,
        sequence_parallel=config.sequence_parallel,
        world_size=world_size,
        batch_size=config.batch_size,
        micro_batch_size=config.micro_batch_size,
    )
