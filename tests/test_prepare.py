"""python -m phased_dmd_mp.prepare: teacher directories from tiny diffusers pipeline folders.

The conditions must be what the pipeline itself computes (its encode_prompt, prepare_latents,
encode_image), teacher.yaml must follow the pipeline's configs, an interrupted run must resume
without redoing finished shards, and mismatched parts must be refused before weights load."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from phased_dmd_mp import atomic, prepare
from phased_dmd_mp.data.conditions import ConditionSet
from phased_dmd_mp.data.teacher import read_spec, teacher_experts

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red cat", "a dog on the grass running", "blue ball in snow", "a cat", "photo"]
SIZE = ["--height", "32", "--width", "32"]


def write_prompts(path, prompts=PROMPTS):
    path.write_text("\n".join(prompts) + "\n")
    return path


def write_images(folder, count):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 255, (24 + 8 * i, 40, 3), np.uint8)  # sizes differ: resized
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


def run_prepare(tmp_path, pipeline, *extra, name="teacher"):
    args = [
        "--pipeline",
        str(pipeline),
        "--prompts",
        str(write_prompts(tmp_path / "p.txt")),
        "--out",
        str(tmp_path / name),
        "--batch-size",
        "2",
        "--no-progress",
        *SIZE,
        *extra,
    ]
    assert prepare.main(args) == 0
    return tmp_path / name


@pytest.fixture(scope="module")
def prepared(tiny_pipeline, tmp_path_factory):
    """prepared(kind) -> (pipeline folder, teacher directory), made once per module."""
    made = {}

    def get(kind):
        if kind not in made:
            root = tmp_path_factory.mktemp(f"prepared_{kind}")
            extra = ["--frames", "5"] if kind != "qwen_image" else []
            if kind == "wan21_i2v":
                extra += ["--images", str(write_images(root / "images", len(PROMPTS)))]
            made[kind] = tiny_pipeline(kind), run_prepare(root, tiny_pipeline(kind), *extra)
        return made[kind]

    return get


def test_wan22_teacher_yaml_follows_the_pipeline(prepared):
    pipeline, teacher = prepared("wan22_t2v")
    spec = read_spec(teacher)
    # 32 x 32 pixels, 5 frames -> VAE /8 spatial, /4 temporal (1 + 4 frames -> 2 latent frames)
    assert spec.latent_shape == (16, 2, 4, 4)
    assert spec.shift == 3.0  # UniPC flow_shift
    assert (spec.guidance_scale, spec.sampling_steps) == (5.0, 50)  # WanPipeline.__call__'s
    assert spec.boundary_ratio == 0.875
    high, low, boundary = teacher_experts(teacher, spec)
    assert (high, low, boundary) == (
        pipeline.resolve() / "transformer",
        pipeline.resolve() / "transformer_2",
        0.875,
    )
    assert not (teacher / "transformer").exists()  # referred to, not copied
    # config keys still override the teacher.yaml
    assert teacher_experts(teacher, spec, boundary=0.9)[2] == 0.9


def load_reference(pipeline, text_dtype=torch.bfloat16):
    """The pipeline as prepare loads it: the text encoder in `text_dtype` (prepare's default
    --dtype bfloat16), the VAE and CLIP in float32."""
    return diffusers.DiffusionPipeline.from_pretrained(
        pipeline, dtype={"default": text_dtype, "vae": torch.float32, "image_encoder": torch.float32}
    )


def shard_bytes(teacher):
    return sum(f.stat().st_size for f in (teacher / "conditions").glob("items-*.safetensors"))


@torch.no_grad()  # as the pipeline's __call__ runs (CPU attention kernels differ)
def test_wan_text_equals_the_pipelines_encode_prompt(prepared):
    pipeline, teacher = prepared("wan22_t2v")
    pipe = load_reference(pipeline)
    conditions = ConditionSet(teacher / "conditions")
    assert len(conditions) == len(PROMPTS) and conditions.fields == ("text",)
    assert conditions.text_tokens == "real"
    # in the batches prepare used (--batch-size 2), as a run drawing them gets them
    for first in range(0, len(PROMPTS), 2):
        batch = PROMPTS[first : first + 2]
        expected = pipe.encode_prompt(batch, max_sequence_length=512)[0]
        got = conditions.batch(range(first, first + len(batch))).text
        assert got.shape == (len(batch), 512, 16) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    negative = pipe.encode_prompt("", max_sequence_length=512)[0]
    torch.testing.assert_close(conditions.uncond(1).text, negative[:1], rtol=0, atol=0)
    # stored: the real tokens only ("a red cat" is 4 tokens with </s>), in bf16; the set as
    # the code before real-token sets wrote it on a CPU: 512 x 16 float32 per prompt
    assert conditions.batch([0]).text[0, :4].abs().sum() > 0
    before = 512 * 16 * 4
    assert shard_bytes(teacher) / len(PROMPTS) <= before / 4


@torch.no_grad()  # as the pipeline's __call__ runs (CPU attention kernels differ)
def test_wan21_i2v_conditions_equal_the_pipelines_own(prepared):
    from diffusers.utils import load_image

    pipeline, teacher = prepared("wan21_i2v")
    spec = read_spec(teacher)
    assert spec.latent_shape == (16, 2, 4, 4) and spec.shift == 5.0
    assert spec.transformer_2 is None and spec.boundary_ratio is None
    pipe = load_reference(pipeline)
    conditions = ConditionSet(teacher / "conditions")
    assert conditions.fields == ("text", "image_latents", "image_embeds")
    batch = conditions.batch([3])
    image = load_image(str(teacher.parent / "images" / "003.png"))
    pixels = pipe.video_processor.preprocess(image, height=32, width=32).float()
    _, condition = pipe.prepare_latents(pixels, 1, 16, 32, 32, 5, torch.float32, "cpu")
    assert batch.image_latents.shape == (1, 20, 2, 4, 4)  # 4 mask + 16 latent channels
    torch.testing.assert_close(batch.image_latents, condition, rtol=0, atol=0)
    torch.testing.assert_close(batch.image_embeds, pipe.encode_image(image), rtol=0, atol=0)
    text, _ = pipe.encode_prompt(PROMPTS[2:4], max_sequence_length=512)  # its batch
    torch.testing.assert_close(batch.text, text[1:], rtol=0, atol=0)


@torch.no_grad()  # as the pipeline's __call__ runs (CPU attention kernels differ)
def test_qwen_image_text_and_mask_equal_the_pipelines(prepared):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    pipeline, teacher = prepared("qwen_image")
    spec = read_spec(teacher)
    assert spec.latent_shape == (4, 1, 8, 8)  # VAE /4, single frame
    mu = calculate_shift(16, 256, 8192, 0.5, 0.9)  # (8/2) x (8/2) packed tokens
    assert spec.shift == pytest.approx(math.exp(mu)) and spec.guidance_scale == 4.0
    pipe = load_reference(pipeline)
    conditions = ConditionSet(teacher / "conditions")
    assert conditions.fields == ("text", "text_mask")
    for first in range(0, len(PROMPTS), 2):  # prepare's batches: padded to their longest
        expected, mask = pipe.encode_prompt(PROMPTS[first : first + 2])
        got = conditions.batch(range(first, min(first + 2, len(PROMPTS))))
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(expected.shape[:2], dtype=torch.long)
        torch.testing.assert_close(got.text, expected, rtol=0, atol=0)
        assert torch.equal(got.text_mask, mask)
    # the set's tokens: its longest prompt's; a batch of short ones is padded less
    longest = max(len(pipe.encode_prompt([p])[0][0]) for p in PROMPTS)
    assert conditions.shape("text") == (longest, 16)
    assert conditions.batch([4]).text.shape == (1, len(pipe.encode_prompt(PROMPTS[4])[0][0]), 16)
    expected, _ = pipe.encode_prompt([""])
    uncond = conditions.uncond(1)
    torch.testing.assert_close(uncond.text, expected, rtol=0, atol=0)
    assert uncond.text_mask.all()


@torch.no_grad()
def test_dtype_float32_stores_the_float32_pipelines_embeddings(tiny_pipeline, tmp_path):
    teacher = run_prepare(tmp_path, tiny_pipeline("qwen_image"), "--dtype", "float32")
    pipe = load_reference(tiny_pipeline("qwen_image"), torch.float32)
    got = ConditionSet(teacher / "conditions").batch([0, 1])
    assert got.text.dtype == torch.float32
    torch.testing.assert_close(got.text, pipe.encode_prompt(PROMPTS[:2])[0], rtol=0, atol=0)


def test_an_interrupted_run_resumes_without_redoing_shards(
    tiny_pipeline, tmp_path, monkeypatch, prepared
):
    _, reference = prepared("wan22_t2v")
    calls = []
    real = prepare.ConditionEncoder.text

    def crash_after_two(self, prompts):
        calls.append(list(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while encoding the third batch
        return real(self, prompts)

    monkeypatch.setattr(prepare.ConditionEncoder, "text", crash_after_two)
    resumable = ["--frames", "5", "--shard-size", "2"]
    with pytest.raises(KeyboardInterrupt):
        run_prepare(tmp_path, tiny_pipeline("wan22_t2v"), *resumable)
    partial = tmp_path / "teacher" / prepare.PARTIAL
    assert sorted(p.name for p in partial.glob("items-*")) == [
        "items-000000000-000000002.safetensors",
        "items-000000002-000000004.safetensors",
    ]
    assert not (tmp_path / "teacher" / "teacher.yaml").exists()

    # other arguments are refused: the finished shards were made with these
    monkeypatch.setattr(prepare.ConditionEncoder, "text", real)
    with pytest.raises(SystemExit):
        run_prepare(tmp_path, tiny_pipeline("wan22_t2v"), "--frames", "9", "--shard-size", "2")

    # a kill while a shard was being written leaves only its temporary file
    atomic.partial_name(partial / "items-000000004-000000005.safetensors").write_bytes(b"half")
    calls.clear()
    monkeypatch.setattr(
        prepare.ConditionEncoder, "text", lambda self, p: calls.append(list(p)) or real(self, p)
    )
    teacher = run_prepare(tmp_path, tiny_pipeline("wan22_t2v"), *resumable)
    assert calls == [PROMPTS[4:], [""]]  # the last shard and the negative prompt only
    assert not partial.exists() and not list((teacher / "conditions").glob(".*"))
    resumed, whole = ConditionSet(teacher / "conditions"), ConditionSet(reference / "conditions")
    assert torch.equal(resumed.batch(range(5)).text, whole.batch(range(5)).text)
    assert yaml.safe_load((teacher / "teacher.yaml").read_text()) == yaml.safe_load(
        (reference / "teacher.yaml").read_text()
    )


@pytest.mark.parametrize("kind", ["wan22_t2v", "qwen_image"])
def test_online_sets_hold_the_prompts_and_encode_the_cached_embeddings(prepared, tmp_path, kind):
    """prepare --online writes the prompt list only (no encoder loads); opened, the set encodes
    a drawn batch with the pipeline's text encoder: the cached set's tensors exactly."""
    from phased_dmd_mp.data.online import OnlineConditionSet
    from phased_dmd_mp.data.teacher import read_conditions

    pipeline, cached_teacher = prepared(kind)
    extra = ["--frames", "5"] if kind != "qwen_image" else []
    teacher = run_prepare(tmp_path, pipeline, "--online", "--online-device", "cpu", *extra)
    assert sorted(p.name for p in (teacher / "conditions").iterdir()) == [
        "conditions.json", "prompt_offsets.npy", "prompts.txt"
    ]  # fmt: skip
    assert read_spec(teacher) == read_spec(cached_teacher)
    online, cached = read_conditions(teacher), read_conditions(cached_teacher)
    assert isinstance(online, OnlineConditionSet) and online.encoder.device.type == "cpu"
    assert len(online) == len(cached) and online.specs == cached.specs
    assert online.prompts([4, 1]) == [PROMPTS[4], PROMPTS[1]]
    for indices in ([4, 0, 2], [1]):
        got, expected = online.batch(indices), cached.batch(indices)
        assert torch.equal(got.text, expected.text)
        assert (got.text_mask is None) == (expected.text_mask is None)
        assert got.text_mask is None or torch.equal(got.text_mask, expected.text_mask)
    assert torch.equal(online.uncond(2).text, cached.uncond(2).text)


def test_a_run_on_an_online_set_starts_as_on_the_cached_set(prepared, tmp_path):
    """The first iteration (a 1-step DMD update of the generator and the fake score) on the
    Wan2.2 teacher: the same losses to the bit with online encoding as with the cached set."""
    from distill_helpers import run_distill

    pipeline, cached = prepared("wan22_t2v")
    online = run_prepare(tmp_path, pipeline, "--online", "--frames", "5")
    one = ["algorithm=dmd", "num_steps=1", "num_phases=1", "iterations_per_phase=1"]
    histories = []
    for name, teacher in (("cached", cached), ("online", online)):
        assert run_distill(tmp_path / name, teacher, *one, "batch_size=2", "sample_every=100") == 0
        history = json.loads((tmp_path / name / "history.json").read_text())
        histories.append([{k: v for k, v in e.items() if "loss" in k} for e in history])
    assert histories[0] == histories[1] and any(histories[0])


MANY_PROMPTS = [*PROMPTS, "red ball", "a dog sitting in the snow on the grass"]
WORKER = Path(__file__).parent / "parallel" / "prepare_worker.py"


def torchrun_prepare(args, kill_rank=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[2])}
    if kill_rank is not None:
        env["KILL_RANK"] = str(kill_rank)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(WORKER), *args,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_two_ranks_under_torchrun_write_the_one_process_set_and_resume_after_a_kill(
    tiny_pipeline, tmp_path
):
    """Qwen-Image (masked text, the set's longest prompt found over every rank's shards): 7
    prompts in 4 shards of 2, shards 0 and 2 on rank 0, 1 and 3 on rank 1. Rank 1 is killed
    after its first shard; the same command continues; the set equals one process's, file by
    file and tensor by tensor."""
    from safetensors.torch import load_file

    prompts = write_prompts(tmp_path / "p.txt", MANY_PROMPTS)
    args = [
        "--pipeline", str(tiny_pipeline("qwen_image")), "--prompts", str(prompts),
        "--batch-size", "1", "--shard-size", "2", "--no-progress", *SIZE,
    ]  # fmt: skip
    assert prepare.main([*args, "--out", str(tmp_path / "one")]) == 0

    two = ["--out", str(tmp_path / "two")]
    killed = torchrun_prepare([*args, *two], kill_rank=1)
    assert killed.returncode != 0
    partial = tmp_path / "two" / prepare.PARTIAL
    assert "items-000000002-000000004.safetensors" in os.listdir(partial)  # rank 1's first
    assert not (tmp_path / "two" / "conditions").exists()
    resumed = torchrun_prepare([*args, *two])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "teacher directory" in resumed.stderr and not partial.exists()

    one, two = tmp_path / "one" / "conditions", tmp_path / "two" / "conditions"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    assert json.loads((one / "conditions.json").read_text()) == json.loads(
        (two / "conditions.json").read_text()
    )
    for file in one.glob("*.safetensors"):
        a, b = load_file(file), load_file(two / file.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ConditionSet(two).shape("text")[0] == max(
        len(ConditionSet(one).batch([i]).text[0]) for i in range(len(MANY_PROMPTS))
    )


def configs_only(pipeline, folder):
    """The pipeline's json files without weights: a check that loads weights would fail."""
    for file in pipeline.rglob("*.json"):
        target = folder / file.relative_to(pipeline)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, target)
    return folder


def edit(path, **values):
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "component, values, args, message",
    [
        (
            "transformer",
            {"text_dim": 24},
            [],
            "text_encoder width 16 does not match transformer text_dim 24",
        ),
        (
            "transformer",
            {"in_channels": 20},
            [],
            "transformer in_channels 20 does not match vae z_dim 16",
        ),
        ("vae", {"z_dim": 8}, [], "transformer out_channels 16 does not match vae z_dim 8"),
        (
            "transformer_2",
            {"text_dim": 8},
            [],
            "transformer_2 text_dim 8 does not match transformer's 16",
        ),
        (
            None,
            {},
            ["--frames", "6"],
            "--frames 6 must be 1 + a multiple of the VAE's temporal factor 4",
        ),
        (
            None,
            {},
            ["--height", "40"],
            "--height 40 must be a multiple of the VAE factor x patch size 8 x 2 = 16",
        ),
    ],
)
def test_mismatches_are_one_line_errors_before_weights_load(
    tiny_pipeline, tmp_path, capsys, component, values, args, message
):
    folder = configs_only(tiny_pipeline("wan22_t2v"), tmp_path / "pipe")
    if component:
        edit(folder / component / "config.json", **values)
    with pytest.raises(SystemExit) as exit_info:
        run_prepare(tmp_path, folder, "--frames", "5", *args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(message)


def test_i2v_images_by_name_or_order_and_count(prepared, tmp_path, capsys):
    """`IMAGE<TAB>prompt` lines pick their first frame by name; otherwise sorted order, and the
    counts must agree."""
    pipeline, by_order = prepared("wan21_i2v")
    images = by_order.parent / "images"
    lines = [f"{4 - i:03d}.png\t{p}" for i, p in enumerate(PROMPTS)]  # images reversed
    (tmp_path / "named.txt").write_text("\n".join(lines) + "\n")
    args = [
        "--pipeline",
        str(pipeline),
        "--prompts",
        str(tmp_path / "named.txt"),
        "--frames",
        "5",
        "--images",
        str(images),
        "--batch-size",
        "5",
        "--no-progress",
        *SIZE,
    ]
    assert prepare.main([*args, "--out", str(tmp_path / "named")]) == 0
    named = ConditionSet(tmp_path / "named" / "conditions").batch(range(5))
    ordered = ConditionSet(by_order / "conditions").batch(range(5))
    torch.testing.assert_close(named.image_latents, ordered.image_latents.flip(0))
    torch.testing.assert_close(named.text, ordered.text, rtol=0, atol=1e-5)  # same prompts

    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(images / "000.png", few)
    with pytest.raises(SystemExit):
        run_prepare(tmp_path, pipeline, "--frames", "5", "--images", str(few))
    assert "holds 1 images for 5 prompts" in capsys.readouterr().err


def test_pretrain_distill_runs_on_the_prepared_two_expert_teacher_in_bf16(
    prepared, tmp_path, monkeypatch
):
    """2 iterations (one per phase) in bf16 on the Wan2.2 teacher as prepared: both experts
    routed at teacher.yaml's boundary, previews decoded through the pipeline's VAE."""
    import imageio.v3 as iio
    from distill_helpers import run_distill

    from phased_dmd_mp.distill import roles

    _, teacher = prepared("wan22_t2v")
    routed = []

    class Recording(roles.RoutedVelocity):
        def __init__(self, high, low, boundary):
            routed.append(boundary)
            super().__init__(high, low, boundary)

    monkeypatch.setattr(roles, "RoutedVelocity", Recording)  # where the runner builds models
    run = tmp_path / "run"
    assert (
        run_distill(
            run,
            teacher,
            "dtype=bfloat16",
            "batch_size=2",
            "iterations_per_phase=1",
            "sample_every=2",
        )
        == 0
    )
    assert routed and routed[0] == 0.875  # the teacher (its fakes copy it: same boundary)
    png = iio.imread(run / "samples" / "iter_000002.png")
    assert png.ndim == 3 and png.std() > 0  # 5 prompts x 4 seeds, labelled (test_figures)
    video = iio.imread(run / "samples" / "iter_000002.mp4")
    assert video.shape == (5, 32, 4 * 32, 3)  # 5 frames, 4 prompts side by side
    history = json.loads((run / "history.json").read_text())
    losses = [entry["generator_loss"] for entry in history if "generator_loss" in entry]
    assert len(losses) == 2 and all(map(math.isfinite, losses))


def test_validate_run_follows_the_prepared_teacher_yaml(prepared, tmp_path):
    """validate_run (before any weights load) finds both experts through teacher.yaml and
    checks them against each other and the conditions."""
    from phased_dmd_mp.config import ConfigError
    from phased_dmd_mp.distill.config import DistillConfig
    from phased_dmd_mp.distill.validate import validate_run

    pipeline, teacher = prepared("wan22_t2v")
    validate_run(DistillConfig(teacher=str(teacher), batch_size=2), world_size=1)

    # the same teacher whose low-noise expert (named by teacher.yaml) disagrees
    low = tmp_path / "transformer_2"
    low.mkdir()
    config = json.loads((pipeline / "transformer_2" / "config.json").read_text())
    (low / "config.json").write_text(json.dumps({**config, "text_dim": 8}))
    other = tmp_path / "teacher"
    other.mkdir()
    (other / "conditions").symlink_to(teacher / "conditions")
    spec = yaml.safe_load((teacher / "teacher.yaml").read_text())
    (other / "teacher.yaml").write_text(yaml.safe_dump({**spec, "transformer_2": str(low)}))
    with pytest.raises(ConfigError, match="text_dim = 8 in .*transformer_2/config.json, but 16"):
        validate_run(DistillConfig(teacher=str(other), batch_size=2), world_size=1)

    # a low-noise expert for a one-expert teacher needs a boundary
    _, i2v = prepared("wan21_i2v")
    with pytest.raises(ConfigError, match="teacher_low_noise needs moe_boundary"):
        validate_run(DistillConfig(teacher=str(i2v), teacher_low_noise=str(low)), world_size=1)


# --- inputs as users hand them in (issue 20; data/readers.py) ---------------------------------


def test_a_bom_and_crlf_prompt_file_gives_the_plain_files_conditions(prepared, tmp_path):
    """A UTF-8 BOM used to stay in the first prompt (Qwen-Image encoded '\\ufeffa red cat':
    more tokens); with CRLF line ends the conditions must be the plain file's, bit for bit."""
    pipeline, reference = prepared("qwen_image")
    prompts = tmp_path / "windows.txt"
    prompts.write_bytes(("\ufeff" + "\r\n".join(PROMPTS) + "\r\n").encode())
    args = ["--pipeline", str(pipeline), "--prompts", str(prompts), "--out", str(tmp_path / "t")]
    assert prepare.main([*args, "--batch-size", "2", "--no-progress", *SIZE]) == 0
    got = ConditionSet(tmp_path / "t" / "conditions").batch(range(len(PROMPTS)))
    expected = ConditionSet(reference / "conditions").batch(range(len(PROMPTS)))
    assert torch.equal(got.text_mask, expected.text_mask)
    assert torch.equal(got.text, expected.text)


@torch.no_grad()
def test_a_16_bit_greyscale_first_frame_is_scaled_not_white(prepared, tmp_path):
    """Pillow's convert('RGB') clamps I;16 to 255 (99.6% white); prepare must encode the image
    the user sees: the same latents as its 8-bit version."""
    pipeline, _ = prepared("wan21_i2v")
    rng = np.random.default_rng(1)
    grey16 = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
    grey8 = np.round(grey16 * (255 / 65535)).astype(np.uint8)
    from PIL import Image

    for name, image in (("deep", Image.fromarray(grey16)), ("plain", Image.fromarray(grey8))):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(len(PROMPTS)):
            image.save(folder / f"{i:03d}.png")
        args = ["--frames", "5", "--images", str(folder)]
        run_prepare(tmp_path, pipeline, *args, name=f"teacher_{name}")
    deep = ConditionSet(tmp_path / "teacher_deep" / "conditions").batch([0])
    plain = ConditionSet(tmp_path / "teacher_plain" / "conditions").batch([0])
    torch.testing.assert_close(deep.image_latents, plain.image_latents, rtol=0, atol=0)
    torch.testing.assert_close(deep.image_embeds, plain.image_embeds, rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["truncated", "html"])
def test_a_bad_first_frame_is_one_line_before_the_pipeline_loads(
    prepared, tmp_path, capsys, monkeypatch, damage
):
    pipeline, by_order = prepared("wan21_i2v")
    images = tmp_path / "images"
    shutil.copytree(by_order.parent / "images", images)
    bad = images / "003.png"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.write_text("<!DOCTYPE html><html><head><title>403 Forbidden</title></head></html>")

    def never(*args, **kwargs):
        raise AssertionError("the pipeline loaded before the inputs were checked")

    monkeypatch.setattr(prepare.ConditionEncoder, "__init__", never)
    with pytest.raises(SystemExit) as exit_info:
        run_prepare(tmp_path, pipeline, "--frames", "5", "--images", str(images))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(bad) in err.strip().splitlines()[-1]
    assert ("truncated" if damage == "truncated" else "HTML") in err
    assert not (tmp_path / "teacher" / prepare.PARTIAL).exists()


def test_a_nonfinite_encoding_names_the_prompts_line(prepared, tmp_path, capsys, monkeypatch):
    pipeline, _ = prepared("wan22_t2v")
    real = prepare.ConditionEncoder.text

    def overflowing(self, prompts):  # a float16 T5 overflows on some prompts
        out = real(self, prompts)
        if "blue ball in snow" in prompts:
            out[prompts.index("blue ball in snow")][0, 0] = float("inf")
        return out

    monkeypatch.setattr(prepare.ConditionEncoder, "text", overflowing)
    with pytest.raises(SystemExit) as exit_info:
        run_prepare(tmp_path, pipeline, "--frames", "5")
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "p.txt:3: the encoders gave NaN/Inf (text) for 'blue ball in snow'" in last


def test_disk_full_while_encoding_is_one_line_and_a_rerun_continues(
    prepared, tmp_path, capsys, monkeypatch
):
    """A shard that does not fit: exit 1 naming it, the finished shards kept, no half shard."""
    pipeline, reference = prepared("wan22_t2v")
    real = atomic._save_file

    def full_at_the_second_shard(tensors, path, metadata):
        if "items-000000002" in str(path):
            from safetensors import SafetensorError

            raise SafetensorError("I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata)

    monkeypatch.setattr(atomic, "_save_file", full_at_the_second_shard)
    args = ["--pipeline", str(pipeline), "--prompts", str(write_prompts(tmp_path / "p.txt"))]
    args += ["--out", str(tmp_path / "t"), "--batch-size", "2", "--shard-size", "2"]
    args += ["--no-progress", "--frames", "5", *SIZE]
    assert prepare.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    partial = tmp_path / "t" / prepare.PARTIAL
    second = partial / "items-000000002-000000004.safetensors"
    assert f"error: disk full writing {second} (" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in partial.iterdir()) == [
        "items-000000000-000000002.safetensors", "prepare.json"
    ]  # fmt: skip
    monkeypatch.undo()
    assert prepare.main(args) == 0
    got = ConditionSet(tmp_path / "t" / "conditions").batch(range(len(PROMPTS))).text
    assert torch.equal(got, ConditionSet(reference / "conditions").batch(range(len(PROMPTS))).text)


def test_a_prompt_longer_than_the_encoder_keeps_is_named(prepared, tmp_path, capsys):
    """umT5 keeps 512 tokens and encode_prompt cuts a longer prompt there without a word; the
    user learns which lines lost their end. Was: silent (a 2,000-token prompt exited 0)."""
    pipeline, _ = prepared("wan22_t2v")
    long = "a cinematic shot of " + ", ".join(f"detail {i} in soft light" for i in range(200))
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a red cat\n{long}\nphoto\n")
    args = ["--pipeline", str(pipeline), "--prompts", str(prompts), "--out", str(tmp_path / "t")]
    assert prepare.main([*args, "--no-progress", "--frames", "5", *SIZE]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"warning: 1 prompt(s) of {prompts} fill all 512 tokens the text encoder keeps and are "
        "cut there (line 2): shorten them to keep all their words"
    ]
    assert ConditionSet(tmp_path / "t" / "conditions").batch([1]).text[0].abs().amax(-1).all()
