"""The distilled generator as a diffusers pipeline folder, and its LoRAs in ComfyUI's format.

`write_pipeline(export_dir, source)` turns RUN/export (expert_k/ transformers, generator.json)
and the diffusers pipeline folder the teacher came from into RUN/export/pipeline/, which stock
`DiffusionPipeline.from_pretrained` loads and which, at `num_inference_steps=N` and guidance 1,
runs exactly the trained steps with the trained experts:

    model_index.json   the source's, with the student's transformers, scheduler and routing
    transformer/       -> ../expert_1 (symlink; transformer_2/ -> ../expert_2 with two experts)
    scheduler/         a stock scheduler whose step table at N steps is the trained one
    vae/, text_encoder/, tokenizer/, image_encoder/, ...   symlinks into the source folder

Timesteps. Training uses t_i = shift(1 - i/N) (schedule.timestep_table). Stock
FlowMatchEulerDiscreteScheduler.set_timesteps(N) spaces N points from 1 to its shifted
sigma_min and shifts again (4 steps at shift 5: 1000, 909.7, 717.3, 24.4), and no setting of it
gives the table with num_train_timesteps = 1000. So:
  - pipelines whose __call__ passes its own sigmas (QwenImagePipeline: linspace(1, 1/N, N)) get
    FlowMatchEulerDiscreteScheduler(shift, use_dynamic_shifting=False): shift(those sigmas) is
    the table (float32); `stochastic_sampling` is DMD2's re-noising step when the run used it;
  - the others (WanPipeline, WanImageToVideoPipeline call set_timesteps(N)) get diffusers'
    FlowMapEulerDiscreteScheduler(shift), whose set_timesteps(N) is shift(linspace(1, 0, N + 1))
    in float64, the table bit for bit, and whose step is the Euler step. It has no re-noising,
    so a run with `step_noise: renoise` gets our pipeline class (below).
Other step counts give the same schedule at that many steps (what the student was not trained for).

Experts. Wan pipelines run `transformer` where t >= boundary_ratio * 1000 and `transformer_2`
below. Two experts get boundary_ratio halfway between expert 1's last timestep and expert 2's
first, so the trained steps route as trained whatever the rounding; the tie of a step exactly on
the teacher's own boundary (shift 7: t = 0.875 = Wan2.2's) is thereby the export's non-issue:
that step is expert 2's, as in training, where phase k's steps are expert k's by index.
Stock diffusers routes at most two experts by one boundary, and Qwen-Image one.

Our pipeline class. A student stock diffusers cannot run as trained (more than two Wan experts,
two or more Qwen-Image experts, re-noising steps on Wan) gets the same folder with our own
pipeline class instead of the stock one and its scheduler (`write_student_pipeline`):

    model_index.json         _class_name ["pipeline_phased_dmd_wan", "PhasedDMDWanPipeline"] (or
                             the Qwen-Image one), transformer, transformer_2, ... (one per expert),
                             timesteps, expert_of_step, step_noise
    pipeline_phased_dmd_wan.py, phased_dmd_student.py   the class (student_pipelines/), as is

which `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` (or
`custom_pipeline=folder/"pipeline_phased_dmd_wan.py"`) loads: it encodes prompts and images with
the stock pipeline's own methods and runs the trained table, each step on its expert. Only a
pipeline family without such a class, or more than 8 experts, gets no pipeline/
(`PipelineUnsupported` says why; `python -m phased_dmd_mp.sample` runs every student).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import diffusers
import torch
from safetensors import safe_open

from phased_dmd_mp import atomic
from phased_dmd_mp.config import ConfigError

PIPELINE_DIR = "pipeline"
MODEL_INDEX = "model_index.json"
OWN_COMPONENTS = ("transformer", "transformer_2", "scheduler")
NUM_TRAIN_TIMESTEPS = 1000


class PipelineUnsupported(Exception):
    """Stock diffusers cannot run this generator as trained (the message says why)."""


def read_model_index(source: str | Path) -> dict:
    path = Path(source) / MODEL_INDEX
    if not path.is_file():
        raise ConfigError(f"{source} is not a diffusers pipeline folder ({MODEL_INDEX} is missing)")
    return json.loads(path.read_text())


def pipeline_class(model_index: dict) -> type:
    name = model_index.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise ConfigError(f"{MODEL_INDEX}: _class_name {name!r} is not a diffusers pipeline")
    return cls


def passes_sigmas(cls: type) -> bool:
    """Whether the pipeline's __call__ computes its own sigmas (QwenImagePipeline's
    linspace(1, 1/N, N)) rather than calling scheduler.set_timesteps(N)."""
    return "sigmas" in inspect.signature(cls.__call__).parameters


def scheduler_config(cls: type, shift: float, renoise: bool) -> dict:
    """The scheduler_config.json whose schedule, as `cls` sets it up at N steps, is
    timestep_table(N, shift) (module docstring)."""
    if passes_sigmas(cls):
        return {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
            "shift": shift,
            "use_dynamic_shifting": False,
            "stochastic_sampling": renoise,
        }
    if renoise:
        raise PipelineUnsupported(
            f"{cls.__name__} has no re-noising sampler (step_noise: renoise); the run's "
            "samples come from python -m phased_dmd_mp.sample"
        )
    return {
        "_class_name": "FlowMapEulerDiscreteScheduler",
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "shift": shift,
    }


def routing(cls: type, timesteps: list[float], expert_of_step: list[int]) -> float | None:
    """boundary_ratio for the experts of each step (1-based, as generator.json lists them):
    None for one expert, the midpoint between the two experts' adjacent timesteps for two."""
    experts = sorted(set(expert_of_step))
    if len(experts) == 1:
        return None
    accepts = inspect.signature(cls.__init__).parameters
    if len(experts) > 2 or not {"transformer_2", "boundary_ratio"} <= accepts.keys():
        raise PipelineUnsupported(
            f"{cls.__name__} routes {'two experts' if 'transformer_2' in accepts else 'one expert'}"
            f" by timestep; this generator has {len(experts)}. Run it with python -m "
            "phased_dmd_mp.sample (docs/distill-your-own-model.md, 'Sample'), or distill "
            f"with num_phases: {2 if 'transformer_2' in accepts else 1} for a pipeline stock "
            "diffusers loads"
        )
    first_low = expert_of_step.index(2)
    if expert_of_step != [1] * first_low + [2] * (len(expert_of_step) - first_low):
        raise PipelineUnsupported(f"experts {expert_of_step} are not one boundary apart")
    return (timesteps[first_low - 1] + timesteps[first_low]) / 2


def pipeline_sizes(source: str | Path, latent_shapes) -> list[dict]:
    """Each latent shape [C, F, H, W] as the pipeline's call arguments: height and width in
    pixels (and num_frames for video), by the source folder's VAE factors."""
    from phased_dmd_mp.data.pipeline_folder import read_pipeline, vae_factors

    pipe = read_pipeline(source)
    temporal, spatial = vae_factors(pipe)
    sizes = []
    for _, frames, height, width in latent_shapes:
        size = {"height": height * spatial, "width": width * spatial}
        if pipe.is_wan:
            size["num_frames"] = (frames - 1) * temporal + 1
        sizes.append(size)
    return sizes


def _link(link: Path, target: Path) -> None:
    """A relative symlink, so that moving the run and the source folder together keeps it."""
    link.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))


def write_pipeline(export_dir: str | Path, source: str | Path) -> Path:
    """Write export_dir/pipeline/ from export_dir's generator.json and expert_k/ folders and the
    source pipeline folder: the source's own pipeline class where it can run the generator as
    trained, else our student pipeline class (`write_student_pipeline`). Raises
    PipelineUnsupported when neither can, ConfigError for a source that is not a pipeline
    folder."""
    export_dir, source = Path(export_dir), Path(source)
    summary = json.loads((export_dir / "generator.json").read_text())
    index = read_model_index(source)
    cls = pipeline_class(index)
    try:
        scheduler = scheduler_config(cls, summary["shift"], summary["step_noise"] == "renoise")
        boundary = routing(cls, summary["timesteps"], summary["expert_of_step"])
    except PipelineUnsupported as stock_cannot:
        return write_student_pipeline(export_dir, source, str(stock_cannot))
    target = _fresh(export_dir / PIPELINE_DIR)
    new_index = dict(index)
    _link_components(target, source, index, OWN_COMPONENTS)
    transformer_class = _transformer_class(export_dir, summary)
    new_index["transformer"] = transformer_class
    _link(target / "transformer", export_dir / summary["experts"][0])
    if boundary is None:
        if "transformer_2" in inspect.signature(cls.__init__).parameters:
            new_index["transformer_2"] = [None, None]
    else:
        new_index["transformer_2"] = transformer_class
        _link(target / "transformer_2", export_dir / summary["experts"][1])
    if "boundary_ratio" in inspect.signature(cls.__init__).parameters:
        new_index["boundary_ratio"] = boundary
    new_index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    (target / "scheduler").mkdir(exist_ok=True)
    atomic.write_json(
        target / "scheduler" / "scheduler_config.json",
        {**scheduler, "_diffusers_version": diffusers.__version__},
    )
    atomic.write_json(target / MODEL_INDEX, new_index)
    return target


# --- our pipeline class, for what stock diffusers cannot run -----------------------------------

STUDENT_PIPELINES = Path(__file__).parent / "student_pipelines"
STUDENT_SHARED = "phased_dmd_student.py"  # the schedule both classes import
STUDENT_CLASSES = {  # the source's pipeline class -> (our module, our class)
    "WanPipeline": ("pipeline_phased_dmd_wan", "PhasedDMDWanPipeline"),
    "WanImageToVideoPipeline": ("pipeline_phased_dmd_wan", "PhasedDMDWanPipeline"),
    "QwenImagePipeline": ("pipeline_phased_dmd_qwen_image", "PhasedDMDQwenImagePipeline"),
}


def pipeline_loading(folder: Path) -> dict:
    """How DiffusionPipeline.from_pretrained(folder, ...) loads the pipeline folder `folder`:
    its class and whether our class file needs trust_remote_code=True (generator.json)."""
    name = json.loads((folder / MODEL_INDEX).read_text())["_class_name"]
    custom = isinstance(name, list)
    return {"class": name[1] if custom else name, "trust_remote_code": custom}


def write_student_pipeline(export_dir: Path, source: Path, stock_cannot: str) -> Path:
    """export_dir/pipeline/ with our pipeline class file (student_pipelines/) beside
    model_index.json, diffusers' custom-pipeline layout: `_class_name` [module, class], the
    experts as transformer, transformer_2, ..., the trained table, routing and step rule in
    its config, the source's encoders and VAE linked. Raises PipelineUnsupported (with the
    reason the source's own class cannot run it, `stock_cannot`) for another pipeline family
    or more experts than the class holds."""
    from phased_dmd_mp.distill.student_pipelines.phased_dmd_student import (
        EXPERT_NAMES,
        MAX_EXPERTS,
    )

    summary = json.loads((export_dir / "generator.json").read_text())
    index = read_model_index(source)
    name = index.get("_class_name")
    experts = summary["experts"]
    if name not in STUDENT_CLASSES or len(experts) > MAX_EXPERTS:
        raise PipelineUnsupported(
            f"{stock_cannot}; and our student pipeline class takes Wan and Qwen-Image students "
            f"of at most {MAX_EXPERTS} experts ({name}, {len(experts)})"
        )
    module, class_name = STUDENT_CLASSES[name]
    target = _fresh(export_dir / PIPELINE_DIR)
    for file in (f"{module}.py", STUDENT_SHARED):
        shutil.copyfile(STUDENT_PIPELINES / file, target / file)
    own = {*OWN_COMPONENTS, *EXPERT_NAMES, "boundary_ratio", "expand_timesteps"}
    new_index = {"_class_name": [module, class_name], "_diffusers_version": diffusers.__version__}
    new_index.update(_link_components(target, source, index, own))
    transformer_class = _transformer_class(export_dir, summary)
    for k, expert_name in enumerate(EXPERT_NAMES):
        if k < len(experts):
            new_index[expert_name] = transformer_class
            _link(target / expert_name, export_dir / experts[k])
        else:
            new_index[expert_name] = [None, None]
    new_index["scheduler"] = [None, None]  # the steps are the trained table below
    if name.startswith("Wan"):
        new_index["expand_timesteps"] = bool(index.get("expand_timesteps", False))
    new_index.update(
        timesteps=summary["timesteps"],
        expert_of_step=summary["expert_of_step"],
        step_noise=summary["step_noise"],
    )
    (target / MODEL_INDEX).write_text(json.dumps(new_index, indent=2) + "\n")
    return target


def _fresh(target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)  # removes the links, never what they point to
    target.mkdir(parents=True)
    return target


def _link_components(target: Path, source: Path, index: dict, own) -> dict:
    """Link every component of the source's model_index except `own` into target; returns
    their model_index entries."""
    linked = {}
    for name, value in index.items():
        if name.startswith("_") or name in own:
            continue
        if isinstance(value, list) and len(value) == 2 and value[0] is not None:
            if not (source / name).exists():
                raise ConfigError(
                    f"{source}/{MODEL_INDEX} lists {name}, but {source / name} is missing"
                )
            _link(target / name, source / name)
            linked[name] = value
    return linked


def _transformer_class(export_dir: Path, summary: dict) -> list:
    config = json.loads((export_dir / summary["experts"][0] / "config.json").read_text())
    return ["diffusers", config["_class_name"]]


# --- LoRA in the ComfyUI / LightX2V key format -----------------------------------------------

COMFY_FILE = "lora_comfyui.safetensors"
# diffusers' Wan module names -> the original Wan names ComfyUI and LightX2V use (diffusers'
# loaders/lora_conversion_utils.py _convert_non_diffusers_wan_lora_to_diffusers inverts this)
WAN_MODULES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def comfy_module(module: str, kind: str) -> str:
    """diffusers' `blocks.3.attn1.to_q` -> `diffusion_model.blocks.3.self_attn.q` (Wan);
    Qwen-Image keeps diffusers' names under `diffusion_model.`."""
    if kind == "wan":
        _, layer, inner = module.split(".", 2)
        if inner not in WAN_MODULES:
            raise ConfigError(f"no ComfyUI name for the Wan module {module}")
        module = f"blocks.{layer}.{WAN_MODULES[inner]}"
    return f"diffusion_model.{module}"


def write_comfy_lora(lora_dir: str | Path, kind: str) -> Path:
    """lora_dir/lora_comfyui.safetensors: the diffusers LoRA of lora_dir
    (pytorch_lora_weights.safetensors, models/lora.py) as `diffusion_model.<module>.lora_down.
    weight` [r, in], `.lora_up.weight` [out, r] and `.alpha` (a scalar; scale alpha / r, here 1:
    lora_B carries the scale), the keys ComfyUI and LightX2V read and diffusers'
    `load_lora_weights` converts."""
    from phased_dmd_mp.models.lora import DIFFUSERS_PREFIX, LORA_FILE, METADATA_KEY

    lora_dir = Path(lora_dir)
    with safe_open(lora_dir / LORA_FILE, framework="pt") as handle:
        config = json.loads(handle.metadata()[METADATA_KEY])
        theirs = {k.removeprefix(DIFFUSERS_PREFIX): handle.get_tensor(k) for k in handle.keys()}
    alpha = torch.tensor(float(config[DIFFUSERS_PREFIX + "lora_alpha"]))
    out = {}
    for key, tensor in theirs.items():
        module, which = key.removesuffix(".weight").rsplit(".lora_", 1)
        name = comfy_module(module, kind)
        out[f"{name}.lora_{'down' if which == 'A' else 'up'}.weight"] = tensor
        out[f"{name}.alpha"] = alpha.clone()
    path = lora_dir / COMFY_FILE
    atomic.save_safetensors(out, path, {"format": "pt"})
    return path
