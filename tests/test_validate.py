"""validate_run: every path a distillation config names and every shape the teacher's files
imply is checked from config.json / teacher.yaml / conditions.json alone, before any model loads;
each mismatch is one line naming both values and the file."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_cli
from distill_helpers import distill_args

from phased_dmd_mp import pretrain_distill
from phased_dmd_mp.config import ConfigError, load_config
from phased_dmd_mp.data.conditions import FORMAT, MANIFEST, VERSION
from phased_dmd_mp.data.teacher import TeacherSpec, write_spec
from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.distill.validate import validate_run
from phased_dmd_mp.models import QwenImageConfig, WanConfig
from phased_dmd_mp.models.config import MODELS_DIR
from phased_dmd_mp.models.convert import DIFFUSERS_CLASSES, model_kind

WAN = WanConfig(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2)  # fmt: skip
WAN_I2V = WanConfig(num_attention_heads=2, attention_head_dim=8, in_channels=9, out_channels=4,
                    text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2, image_dim=6,
                    added_kv_proj_dim=16)  # fmt: skip
QWEN = QwenImageConfig(in_channels=64, out_channels=16, num_layers=2, attention_head_dim=8,
                       num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(2, 2, 4))  # fmt: skip


def write_transformer(path: Path, arch) -> Path:
    path.mkdir(parents=True)
    config = {"_class_name": DIFFUSERS_CLASSES[model_kind(arch)], **arch.to_diffusers()}
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_manifest(path: Path, tensors: dict) -> Path:
    """A condition set's manifest and empty files where it names them: validation stats the
    files (sizes as the manifest records them) and never opens them (`finite`: its writer
    checked them, so validation does not scan them)."""
    path.mkdir(parents=True)
    manifest = {
        "format": FORMAT, "version": VERSION, "count": 1,
        "tensors": {name: {"shape": shape, "dtype": "float32"} for name, shape in tensors.items()},
        "shards": [{"file": "items-000000000-000000001.safetensors", "count": 1, "bytes": 0}],
        "uncond": "uncond.safetensors", "finite": True,
    }  # fmt: skip
    (path / MANIFEST).write_text(json.dumps(manifest))
    for file in (manifest["shards"][0]["file"], manifest["uncond"]):
        (path / file).touch()
    return path


def teacher_dir(root: Path, arch, latent_shape, tensors) -> Path:
    """teacher.yaml, transformer/config.json and conditions/conditions.json; no weights."""
    root.mkdir(parents=True)
    write_transformer(root / "transformer", arch)
    write_manifest(root / "conditions", tensors)
    write_spec(root, TeacherSpec(latent_shape=latent_shape, shift=3.0, guidance_scale=2.0))
    return root


def config(teacher: Path, *overrides: str) -> DistillConfig:
    return load_config(DistillConfig, None, [f"teacher={teacher}", "batch_size=4", *overrides])


WAN_TEXT = {"text": [5, 8]}
I2V = {"text": [5, 8], "image_latents": [5, 3, 8, 8], "image_embeds": [7, 6]}


def test_consistent_runs_validate_from_config_files_alone(tmp_path):
    validate_run(config(teacher_dir(tmp_path / "wan", WAN, (4, 3, 8, 8), WAN_TEXT)), 1)
    validate_run(config(teacher_dir(tmp_path / "i2v", WAN_I2V, (4, 3, 8, 8), I2V)), 1)
    qwen = teacher_dir(tmp_path / "qwen", QWEN, (16, 1, 8, 6), {"text": [5, 12], "text_mask": [5]})
    validate_run(config(qwen), 1)
    low = write_transformer(tmp_path / "low", WAN)
    wan = tmp_path / "wan"
    validate_run(config(wan, f"teacher_low_noise={low}", "moe_boundary=0.875"), 1)
    validate_run(config(wan, "tensor_parallel=2", "micro_batch_size=2"), 4)


CASES = {
    "qwen_odd_height": (QWEN, (16, 1, 7, 8), {"text": [5, 12]}, (),
                        "latent height = 7 in {t}/teacher.yaml is not divisible by the patch size 2 of {t}/transformer/config.json"),
    "qwen_frames": (QWEN, (16, 2, 8, 8), {"text": [5, 12]}, (), "has 2 frames; Qwen-Image"),
    "qwen_in_channels": (QWEN, (8, 1, 8, 8), {"text": [5, 12]}, (),
                         "in_channels = 64 in {t}/transformer/config.json, but latent channels 8 from {t}/teacher.yaml packed in 2x2 patches give 32"),
    "wan_in_channels": (WAN, (3, 3, 8, 8), WAN_TEXT, (), "in_channels = 4 in {t}/transformer/config.json, but latent channels 3"),
    "wan_patch": (WAN, (4, 3, 8, 7), WAN_TEXT, (), "latent width = 7 in {t}/teacher.yaml is not divisible by the patch size 2"),
    "text_width": (WAN, (4, 3, 8, 8), {"text": [5, 16]}, (),
                   "the text embeddings in {t}/conditions/conditions.json are 16 wide, but text_dim = 8 in {t}/transformer/config.json"),
    "i2v_channels": (WAN_I2V, (4, 3, 8, 8), {**I2V, "image_latents": [4, 3, 8, 8]}, (),
                     "in_channels = 9 in {t}/transformer/config.json, but latent channels 4 + image-latent channels 4 = 8"),
    "i2v_grid": (WAN_I2V, (4, 3, 8, 8), {**I2V, "image_latents": [5, 1, 8, 8]}, (), "image_latents in {t}/conditions/conditions.json are [5, 1, 8, 8] per item"),
    "clip_missing": (WAN_I2V, (4, 3, 8, 8), {"text": [5, 8], "image_latents": [5, 3, 8, 8]}, (),
                     "attends to CLIP image tokens (image_dim = 6) but {t}/conditions/conditions.json has no image_embeds"),
    "clip_width": (WAN_I2V, (4, 3, 8, 8), {**I2V, "image_embeds": [7, 5]}, (), "image_embeds in {t}/conditions/conditions.json are 5 wide, but image_dim = 6"),
    "placeholder_low_noise": (WAN, (4, 3, 8, 8), WAN_TEXT, ("teacher_low_noise=/path/to/wan22/transformer_2", "moe_boundary=0.875"),
                              "teacher_low_noise: /path/to/wan22/transformer_2 does not exist"),
    "missing_conditions": (WAN, (4, 3, 8, 8), WAN_TEXT, ("conditions=/path/to/conditions",), "conditions: condition set /path/to/conditions does not exist"),
    "layout": (WAN, (4, 3, 8, 8), WAN_TEXT, ("tensor_parallel=2",), "world size = 3 is not divisible by tensor_parallel x pipeline_parallel = 2"),
    # a recipe's architecture / latent_shape (what preflight planned with) the teacher is not
    "named_architecture": (WAN, (4, 3, 8, 8), WAN_TEXT, ("architecture=wan2.1_t2v_14b",),
                           "architecture: num_attention_heads = 40 in {models}/wan2.1_t2v_14b.yaml, but 2 in the teacher's {t}/transformer/config.json"),
    "named_kind": (WAN, (4, 3, 8, 8), WAN_TEXT, ("architecture=qwen_image",),
                   "architecture: {models}/qwen_image.yaml is a QwenImageConfig, the teacher's {t}/transformer/config.json a WanConfig"),
    "named_latents": (WAN, (4, 3, 8, 8), WAN_TEXT, ("latent_shape=[4, 3, 8, 10]",),
                      "latent_shape: [4, 3, 8, 10] in the config, but [4, 3, 8, 8] in {t}/teacher.yaml"),
    # phase 1 of 4 steps in 2 phases at teacher.yaml's shift 3 injects in (0.75, 1)
    "phase_t_ranges": (WAN, (4, 3, 8, 8), WAN_TEXT, ("phase_t_ranges=[[0.1, 0.2], [0, 1]]",),
                       "phase 1's noise-injection interval (0.75, 1) does not overlap t_range / phase_t_ranges (0.1, 0.2) at shift 3"),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_mismatches_are_one_line_errors_naming_values_and_file(tmp_path, name):
    arch, latent, tensors, overrides, message = CASES[name]
    teacher = teacher_dir(tmp_path / "t", arch, latent, tensors)
    with pytest.raises(ConfigError) as info:
        validate_run(config(teacher, *overrides), 3 if name == "layout" else 1)
    expected = message.format(t=teacher, models=MODELS_DIR)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_named_architecture_and_latent_shape_that_agree_pass(tmp_path):
    teacher = teacher_dir(tmp_path / "wan", WAN, (4, 3, 8, 8), WAN_TEXT)
    named = tmp_path / "wan.yaml"
    named.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v
                                     for k, v in dataclasses.asdict(WAN).items()}))  # fmt: skip
    validate_run(config(teacher, f"architecture={named}", "latent_shape=[4, 3, 8, 8]"), 1)


def test_a_missing_or_resized_shard_is_found_without_reading_it(tmp_path):
    teacher = teacher_dir(tmp_path / "t", WAN, (4, 3, 8, 8), WAN_TEXT)
    shard = teacher / "conditions" / "items-000000000-000000001.safetensors"
    validate_run(config(teacher), 1)
    shard.write_bytes(b"12345")
    with pytest.raises(ConfigError, match=f"teacher: {shard} is 5 bytes, .* says 0"):
        validate_run(config(teacher), 1)
    shard.unlink()
    with pytest.raises(ConfigError, match=f"condition set file {shard} is missing"):
        validate_run(config(teacher), 1)


def test_out_channels_and_two_expert_disagreement(tmp_path):
    wide_out = WanConfig(**{**WAN.to_diffusers(), "patch_size": (1, 2, 2), "out_channels": 8})
    teacher = teacher_dir(tmp_path / "t", wide_out, (4, 3, 8, 8), WAN_TEXT)
    with pytest.raises(
        ConfigError, match="out_channels = 8 in .*, but latent_shape in .* has 4 channels"
    ):
        validate_run(config(teacher), 1)
    teacher = teacher_dir(tmp_path / "wan", WAN, (4, 3, 8, 8), WAN_TEXT)
    deeper = WanConfig(**{**WAN.to_diffusers(), "patch_size": (1, 2, 2), "num_layers": 4})
    low = write_transformer(tmp_path / "low", deeper)
    with pytest.raises(ConfigError) as info:
        validate_run(config(teacher, f"teacher_low_noise={low}", "moe_boundary=0.875"), 1)
    assert f"num_layers = 4 in {low}/config.json, but 2 in the high-noise expert's " in str(
        info.value
    )


def test_cli_refuses_a_placeholder_expert_before_loading_any_model(
    tmp_path, teacher, capsys, monkeypatch
):
    from phased_dmd_mp.distill import trainer

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(trainer.Distiller, "__init__", no_loading)
    args = distill_args(tmp_path / "run", teacher, "teacher_low_noise=/path/to/wan22/transformer_2",
                        "moe_boundary=0.875")  # fmt: skip
    code, err = run_cli(pretrain_distill.main, args, capsys)
    assert code == 2 and "teacher_low_noise: /path/to/wan22/transformer_2 does not exist" in err
    assert "Traceback" not in err


def test_a_pipeline_folder_given_as_teacher_points_to_prepare(tmp_path):
    """The likely first mistake with a downloaded model: `teacher=` the diffusers folder itself."""
    pipeline = tmp_path / "Wan2.2-T2V-A14B-Diffusers"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError) as info:
        validate_run(config(pipeline), 1)
    message = str(info.value)
    assert f"{pipeline} is a diffusers pipeline folder, not a teacher directory" in message
    assert f"python -m phased_dmd_mp.prepare --pipeline {pipeline}" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="write one with python -m phased_dmd_mp.prepare"):
        validate_run(config(tmp_path), 1)


def test_a_nonfinite_condition_is_named_before_any_model_loads(
    tmp_path, teacher, capsys, monkeypatch
):
    """A set written by other code (no `finite` record) holding an Inf: validation reads it and
    names the condition, instead of the runner skipping updates without saying why."""
    import shutil

    from safetensors.torch import load_file, save_file

    from phased_dmd_mp.distill import trainer

    conditions = shutil.copytree(teacher / "conditions", tmp_path / "conditions")
    manifest = json.loads((conditions / MANIFEST).read_text())
    manifest.pop("finite", None)
    (conditions / MANIFEST).write_text(json.dumps(manifest))
    shard = conditions / manifest["shards"][-1]["file"]
    tensors = load_file(shard)
    tensors["text"][1, 0, 0] = float("inf")
    save_file(tensors, shard)
    index = manifest["count"] - manifest["shards"][-1]["count"] + 1

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the conditions were checked")

    monkeypatch.setattr(trainer.Distiller, "__init__", no_loading)
    args = distill_args(tmp_path / "run", teacher, f"conditions={conditions}")
    code, err = run_cli(pretrain_distill.main, args, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"conditions: condition set {conditions}: condition {index}: NaN/Inf in text" in err


def test_a_student_of_another_size_validates_and_one_of_other_latents_is_one_line(
    tmp_path, capsys
):
    """A student may have other widths, layers and heads (also as a pipeline folder's
    transformer); another latent channel count or text width is named with both values and
    files, and fake_init student without a student is a config error naming the key."""
    teacher = teacher_dir(tmp_path / "t", WAN, (4, 3, 8, 8), WAN_TEXT)
    small = dict(WAN.to_diffusers(), patch_size=(1, 2, 2), num_attention_heads=1,
                 attention_head_dim=6, ffn_dim=8, num_layers=1)  # fmt: skip
    student = write_transformer(tmp_path / "small", WanConfig(**small))
    validate_run(config(teacher, f"student={student}", "fake_init=student"), 1)
    pipeline = tmp_path / "pipeline"
    write_transformer(pipeline / "transformer", WanConfig(**small))
    (pipeline / "model_index.json").write_text("{}")
    validate_run(config(teacher, f"student={pipeline}"), 1)
    for name, value in (("out_channels", 8), ("in_channels", 8), ("text_dim", 16)):
        other = write_transformer(tmp_path / name, WanConfig(**{**small, name: value}))
        with pytest.raises(ConfigError) as info:
            validate_run(config(teacher, f"student={other}"), 1)
        message = str(info.value)
        expected = (f"student: {name} = {value} in {other}/config.json, but {getattr(WAN, name)} "
                    f"in the teacher's {teacher}/transformer/config.json")  # fmt: skip
        assert message.startswith(expected) and "\n" not in message, message
    qwen = write_transformer(tmp_path / "qwen", QWEN)
    with pytest.raises(ConfigError, match="is a QwenImageConfig, the teacher's .* a WanConfig"):
        validate_run(config(teacher, f"student={qwen}"), 1)
    with pytest.raises(ConfigError, match="student: /nowhere does not exist"):
        validate_run(config(teacher, "student=/nowhere"), 1)
    # IDA blends the fake into the generator weight by weight: both must be the student
    validate_run(config(teacher, f"student={student}", "fake_init=student", "ida_weight=0.03"), 1)
    with pytest.raises(ConfigError) as info:
        validate_run(config(teacher, f"student={student}", "ida_weight=0.03"), 1)
    message = str(info.value)
    assert message.startswith(f"ida_weight: the generator starts from the student {student}")
    assert message.endswith("set fake_init: student") and "\n" not in message
    # the student's own layout: 1 head does not split over 2 ranks
    with pytest.raises(ConfigError) as info:
        validate_run(config(teacher, f"student={student}", "tensor_parallel=2"), 2)
    assert str(info.value).startswith(f"student ({student}/config.json): num_attention_heads = 1")
    code, err = run_cli(
        pretrain_distill.main,
        distill_args(tmp_path / "run", teacher, "fake_init=student"),
        capsys,
    )
    assert code == 2 and "fake_init: student needs `student`" in err
    assert len(err.strip().splitlines()) == 1


def test_student_architecture_is_the_student_folders(tmp_path):
    """`student_architecture` (what preflight plans the student with before it is on disk)
    must be the student folder's: a differing field is one line naming both files."""
    teacher = teacher_dir(tmp_path / "t", WAN, (4, 3, 8, 8), WAN_TEXT)
    small = WanConfig(**dict(WAN.to_diffusers(), patch_size=(1, 2, 2), num_layers=1))
    student = write_transformer(tmp_path / "small", small)
    named = tmp_path / "small.yaml"
    named.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v
                                     for k, v in dataclasses.asdict(small).items()}))  # fmt: skip
    validate_run(config(teacher, f"student={student}", f"student_architecture={named}"), 1)
    with pytest.raises(ConfigError) as info:
        named_1_3b = "student_architecture=wan2.1_t2v_1.3b"
        validate_run(config(teacher, f"student={student}", named_1_3b), 1)
    message = str(info.value)
    assert message.startswith(
        f"student_architecture: num_attention_heads = 12 in {MODELS_DIR}/wan2.1_t2v_1.3b.yaml, "
        f"but 2 in the student's {student}/config.json"
    ) and "\n" not in message, message
    with pytest.raises(ValueError, match="student_architecture names the architecture of `stud"):
        config(teacher, "student_architecture=wan2.1_t2v_1.3b")


def test_latent_shapes_are_checked_like_teacher_yaml_and_image_grids_stay(tmp_path):
    """Each trained latent shape is checked against the model as teacher.yaml's is (a size not
    divisible by the patch is one line naming the entry); image conditions pin the grid."""
    teacher = teacher_dir(tmp_path / "wan", WAN, (4, 3, 8, 8), WAN_TEXT)
    validate_run(config(teacher, "latent_shapes=[[4, 3, 8, 8], [4, 5, 8, 12]]"), 1)
    with pytest.raises(ConfigError) as info:
        validate_run(config(teacher, "latent_shapes=[[4, 3, 8, 8], [4, 3, 8, 7]]"), 1)
    message = str(info.value)
    assert message.startswith(
        "latent width = 7 in latent_shapes entry [4, 3, 8, 7] is not divisible by the patch "
        f"size 2 of {teacher}/transformer/config.json"
    ) and "\n" not in message
    with pytest.raises(ConfigError, match="latent channels 8 from latent_shapes entry"):
        validate_run(config(teacher, "latent_shapes=[[8, 3, 8, 8]]"), 1)
    i2v = teacher_dir(tmp_path / "i2v", WAN_I2V, (4, 3, 8, 8), I2V)
    with pytest.raises(ConfigError, match="image_latents are on the grid of its prepared"):
        validate_run(config(i2v, "latent_shapes=[[4, 3, 8, 8], [4, 3, 8, 12]]"), 1)
    with pytest.raises(ConfigError, match="latent_shape_weights needs one weight > 0 per"):
        config(teacher, "latent_shapes=[[4, 3, 8, 8]]", "latent_shape_weights=[1, 2]")
    with pytest.raises(ConfigError, match="latent_shape_weights needs latent_shapes"):
        config(teacher, "latent_shape_weights=[1, 2]")
