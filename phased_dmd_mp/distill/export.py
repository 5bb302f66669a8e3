"""The trained generator as diffusers-format experts, generator.json and, for a teacher taken
from a diffusers pipeline folder, the student's own pipeline folder (run mechanics)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from phased_dmd_mp import atomic
from phased_dmd_mp.data.teacher import CONDITIONS_DIR, pipeline_dir, read_spec
from phased_dmd_mp.distill.diffusers_pipeline import (
    PIPELINE_DIR,
    PipelineUnsupported,
    pipeline_loading,
    pipeline_loading,
    pipeline_sizes,
    write_comfy_lora,
    write_pipeline,
)
from phased_dmd_mp.distill.models import RoutedVelocity
from phased_dmd_mp.models import convert
from phased_dmd_mp.models.loading import read_stored_shard
from phased_dmd_mp.models.lora import adapter_deltas, save_lora


def export_generator(d) -> Path:
    """The MoE generator (EMA weights when kept) as one diffusers-format transformer per
    expert (with LoRA also the adapter alone, in diffusers' and ComfyUI's formats), plus
    generator.json (timesteps, which expert runs each step, the shapes trained) and, when the
    teacher names its diffusers pipeline folder, export/pipeline/ (distill/diffusers_pipeline.py:
    the stock pipeline class, or ours where the stock one cannot run the generator), or in
    generator.json's `pipeline_unsupported` why neither can.

    Each expert keeps what training learned: it is written from the fp32 values training holds
    (`Distiller.exported_values`: the EMA, else the main parameters; not their bf16 rounding),
    in the dtypes its source checkpoint stores (an fp32 teacher's student is fp32); a LoRA
    expert is the source's stored weights plus the adapter's product computed in fp32, and its
    adapter files hold the fp32 adapter.

    Collective. The export is assembled in RUN/.export.partial/ and renamed to RUN/export/ when
    complete (atomic.py): a full disk on any rank raises DiskFullError on every rank and leaves
    no partial export (a previous complete one stays)."""
    final = d.run_dir / "export"
    writer = dist.get_rank() == 0
    with atomic.staged_directory(final, create=writer) as folder:
        try:
            atomic.collective_write(lambda: None)  # the others wait for the staging directory
            for k, expert in enumerate(d.generator, start=1):
                _export_expert(d, k, expert, folder)
            atomic.collective_write(lambda: _write_summary(d, folder) if writer else None)
        except atomic.DiskFullError:
            raise atomic.DiskFullError(
                f"disk full writing the export {final} ({atomic.free_mib(d.run_dir):.1f} MiB free "
                f"in {d.run_dir}); removed the partial export; free space and run again with "
                "--resume to export"
            ) from None
    dist.barrier()  # the rename is done before any rank returns
    return final


def _export_expert(d, k: int, expert, folder: Path) -> None:
    """Expert k as export/expert_k/ (diffusers) and, with LoRA, export/expert_k_lora/
    (collective: each model-parallel rank's shard goes through expert_k.sharded/)."""
    tp = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_rank()
    writer = dist.get_rank() == 0
    sharded = folder / f"expert_{k}.sharded"
    with d.exported_parameters(k):
        if expert.adapter is not None:
            lora = folder / f"expert_{k}_lora"
            save_lora(expert.module, expert.adapter, lora)
            kind = convert.model_kind(expert.arch)
            atomic.collective_write(lambda: write_comfy_lora(lora, kind) if writer else None)
        weights = _stored_dtype_weights(expert) if d.dp_rank == 0 else None

    def layout():
        if writer:
            sharded.mkdir(parents=True, exist_ok=True)
            convert.write_layout(
                sharded, expert.arch, d.config.tensor_parallel, d.config.pipeline_parallel
            )

    def shard():
        if parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
            atomic.save_safetensors(weights, sharded / convert.shard_file(tp, pp))

    def to_diffusers():
        if writer:
            convert.to_diffusers(sharded, folder / f"expert_{k}")
            shutil.rmtree(sharded)

    for step in (layout, shard, to_diffusers):
        atomic.collective_write(step)


def _write_summary(d, folder: Path) -> None:
    """generator.json and, for a teacher from a diffusers pipeline folder, pipeline/."""
    summary = {
        "timesteps": d.timesteps,
        "expert_of_step": [
            next(k for k in range(1, len(d.bounds)) if i < d.bounds[k])
            for i in range(d.config.num_steps)
        ],
        "experts": [f"expert_{k}" for k in range(1, d.config.num_phases + 1)],
        "shift": d.shift,
        "step_noise": d.config.step_noise,
        # the shapes trained (latent_shape: the first), drawn per iteration by weight
        "latent_shape": list(d.latent_shapes[0]),
        "latent_shapes": [list(shape) for shape in d.latent_shapes],
        "latent_shape_weights": d.shape_weights,
        "value_range": list(d.value_range),
        # absolute, so `sample --checkpoint RUN` works from any directory
        "teacher": str(Path(d.config.teacher).resolve()),
        "conditions": str(
            Path(d.config.conditions or Path(d.config.teacher) / CONDITIONS_DIR).resolve()
        ),
        # the transformer folder the experts started from when not the teacher's (their
        # architecture is its own) and what the fake models started from
        "student": None if d.student is None else str(d.student.source.resolve()),
        "fake_init": d.config.fake_init,
        "algorithm": d.config.algorithm,
        "iterations": d.state.iteration,
        # With LoRA, expert_k is the merged model and expert_k_lora the adapter alone
        # (diffusers' load_lora_weights reads it) on the model it started from: `base` names
        # it as the teacher pipeline's component (or "student"), `base_folder` is that
        # transformer folder.
        "lora": None
        if d.config.generator_adapter == "full"
        else {
            "rank": d.config.lora_rank,
            "alpha": d.config.lora_alpha,
            "base": [_base_component(d, expert) for expert in d.generator],
            "base_folder": [str(expert.source.resolve()) for expert in d.generator],
        },
    }
    atomic.write_json(folder / "generator.json", summary)
    source = pipeline_dir(d.config.teacher, read_spec(d.config.teacher))
    if source is not None:
        # what to ask the pipeline for: each trained shape as height x width (x frames)
        summary["sizes"] = pipeline_sizes(source, d.latent_shapes)
        try:
            written = write_pipeline(folder, source)
            summary["pipeline"] = written.name
            summary["pipeline_loading"] = pipeline_loading(written)
        except PipelineUnsupported as reason:
            shutil.rmtree(folder / PIPELINE_DIR, ignore_errors=True)
            summary["pipeline_unsupported"] = str(reason)
            print(f"no export/{PIPELINE_DIR}: {reason}")
        atomic.write_json(folder / "generator.json", summary)


def _stored_dtype_weights(expert) -> dict[str, Tensor]:
    """This rank's shard of the expert as exported (its trained parameters holding their fp32
    values: `Distiller.exported_parameters`), each tensor in the dtype its source stores: a full
    copy's values cast; a LoRA expert's source weights, as stored, plus the adapter's fp32
    product."""
    stored = read_stored_shard(expert.module, expert.source)
    if expert.adapter is not None:
        deltas = adapter_deltas(expert.module, expert.adapter)
        return {
            name: (value.float() + deltas[name].to(value.device)).to(value.dtype)
            if name in deltas
            else value
            for name, value in stored.items()
        }
    current = expert.module.state_dict()
    return {name: current[name].detach().to(value.dtype) for name, value in stored.items()}


def _base_component(d, expert) -> str:
    """What a LoRA expert's base weights are: `student`, or the teacher pipeline's component,
    `transformer_2` for Wan2.2's low-noise expert, else `transformer`."""
    teacher = d.teacher
    if d.student is not None and expert.module is d.student.module:
        return "student"
    if isinstance(teacher, RoutedVelocity) and expert.module is teacher.low.module:
        return "transformer_2"
    return "transformer"
