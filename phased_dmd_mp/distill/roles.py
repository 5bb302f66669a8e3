"""Which model plays which role in a distillation run, and what each trained role holds (run
mechanics, apart from the distillation step in trainer.py).

The teacher (one model, or Wan2.2's two experts routed at a boundary) and the optional student
are loaded frozen; generator expert k is a full copy of the model it starts from (made when its
phase first trains) or LoRA adapter k on that model's shared weights; phase k's fake model is a
copy of the teacher experts its noise reaches (or of the student, `fake_init: student`). Each
trained role has a `TrainedModel` (distill/optim.py: DDP buffers, optimizer, fp32 main params
and EMA), retired with its phase in sequential order; what the export writes of an expert comes
from there (`exported_values`). `Distiller` (trainer.py) inherits these methods.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import Tensor

from phased_dmd_mp.distill.models import RoutedVelocity, VelocityModel, experts_reached
from phased_dmd_mp.distill.optim import TrainedModel, parameters_holding
from phased_dmd_mp.models import build, convert
from phased_dmd_mp.models.convert import diffusers_to_ours, read_diffusers_dir
from phased_dmd_mp.models.loading import (
    load_checkpoint,
    load_whole_state_dict,
    read_stored_shard,
)
from phased_dmd_mp.models.lora import add_lora


class ModelRoles:
    """The models of a `Distiller` (which provides config, execution, device, timesteps,
    bounds, shift and the role dictionaries its __init__ sets up)."""

    def _build(self, arch, whole_state: dict[str, Tensor], source: Path) -> VelocityModel:
        module = build(arch, self.execution, init_weights=False).to(self.device)
        with torch.no_grad():
            load_whole_state_dict(module, whole_state)
        module.requires_grad_(False)
        return VelocityModel(module, source=Path(source))

    def _load(self, directory: Path) -> VelocityModel:
        """A frozen model from a diffusers-format transformer, or from our sharded checkpoint
        (`python -m phased_dmd_mp.models.convert to-ours`), which each rank reads only its
        shard of."""
        config = json.loads((Path(directory) / "config.json").read_text())
        if "_class_name" in config:
            _, arch, state = read_diffusers_dir(directory)
            return self._build(arch, diffusers_to_ours(state, arch), directory)
        arch, _, _ = convert.read_layout(directory)
        module = build(arch, self.execution, init_weights=False).to(self.device)
        load_checkpoint(module, directory)
        module.requires_grad_(False)
        return VelocityModel(module, source=Path(directory))

    def _load_teacher(self, path: Path, low_noise: Path | None, boundary: float | None):
        high = self._load(path)
        if low_noise is None:
            return high
        return RoutedVelocity(high, self._load(low_noise), boundary)

    def _teacher_at(self, t: float) -> VelocityModel:
        """The teacher (expert) that scores timestep t: a generator expert starts from the one
        that owns the first step of its phase."""
        if isinstance(self.teacher, RoutedVelocity):
            return self.teacher.high if t >= self.teacher.boundary else self.teacher.low
        return self.teacher

    def _copy(self, model: VelocityModel, trainable: bool) -> VelocityModel:
        """A new model (same architecture and layout) with `model`'s base weights."""
        module = build(model.arch, self.execution, init_weights=False).to(self.device)
        with torch.no_grad():
            module.load_state_dict(model.base_state(), strict=False)
        module.requires_grad_(trainable)
        return VelocityModel(module, source=model.source)

    def _generator_experts(self) -> list[VelocityModel]:
        """Expert k starts from the student when there is one, else from the teacher (expert)
        owning the first step of phase k: a full copy, or with LoRA, adapter k - 1 on that
        model's own (frozen, shared) weights. A full copy is made when its phase first trains
        (`_expert`); until then the model it copies stands in, so phase 1 holds one copy
        rather than K."""
        config = self.config
        owners = [
            self.student or self._teacher_at(self.timesteps[self.bounds[k]])
            for k in range(config.num_phases)
        ]
        if config.generator_adapter == "full":
            return owners
        for base in {id(o): o for o in owners}.values():
            add_lora(
                base.module,
                config.lora_rank,
                config.lora_alpha,
                config.num_phases,
                seed=config.seed,
            )
            base.has_lora = True
        return [
            VelocityModel(owner.module, adapter=k, source=owner.source)
            for k, owner in enumerate(owners)
        ]

    def _expert(self, k: int) -> VelocityModel:
        """Generator expert k, its full copy made now if it is still its teacher."""
        if self.config.generator_adapter == "full" and k not in self.copied_experts:
            self.generator[k - 1] = self._copy(self.generator[k - 1], trainable=True)
            self.copied_experts.add(k)
        return self.generator[k - 1]

    def _fake(self, k: int):
        """Phase k's fake model, re-initialised when the phase starts (`_new_fake`)."""
        if k not in self.fakes:
            self.fakes[k] = self._new_fake(k)
        return self.fakes[k]

    def _new_fake(self, k: int):
        """A new fake model for phase k from the teacher (or with fake_init student, from the
        student). Of a two-expert teacher it copies only the experts the phase's noise
        injection reaches (Wan2.2's phase 1 in (0.875, 1): the high-noise expert alone)."""
        teacher = self.teacher
        if self.config.fake_init == "student":
            return self._copy(self.student, True)
        if not isinstance(teacher, RoutedVelocity):
            return self._copy(teacher, True)
        low, high = self.config.injection_range(k, self.shift)
        needed = experts_reached(low, high, teacher.boundary)
        reached = [e for e, n in zip((teacher.high, teacher.low), needed) if n]
        copies = [self._copy(expert, True) for expert in reached]
        return copies[0] if len(copies) == 1 else RoutedVelocity(*copies, teacher.boundary)

    def _trained(self, role: str, k: int) -> TrainedModel:
        """The optimizer state of role "generator", "fake" or "real_critic" (levers) of phase k."""
        key = (role, k)
        if key not in self.trained:
            config = self.config
            models = {"generator": self._expert, "fake": self._fake}
            model = models.get(role, self.levers.real_critic)(k)
            first = model.high if isinstance(model, RoutedVelocity) else model
            self.trained[key] = TrainedModel(
                model.parameters(),
                first.module.config,
                lr=config.generator_lr if role == "generator" else config.fake_lr,
                betas=config.betas,
                weight_decay=config.weight_decay,
                grad_clip=config.grad_clip,
                main_params_dtype=config.main_params_dtype,
                shard=config.distributed_optimizer,
                offload=config.optimizer_offload,
            )
            if role == "generator" and model.adapter is None and model.dtype != torch.float32:
                # a full copy trains from the weights as stored (fp32 main params of an fp32
                # checkpoint), not from their bf16 rounding
                stored = read_stored_shard(model.module, model.source)
                names = {id(p): name for name, p in model.module.named_parameters()}
                self.trained[key].set_main_params(
                    [stored[names[id(p)]].float() for p in model.parameters()]
                )
        return self.trained[key]

    def _retire_phase(self, k: int) -> None:
        """Sequential order: phase k is done; its fake model, gradient buffers, main parameters
        and optimizer states go; the expert keeps its weights and (gathered) EMA."""
        self.levers.retire(k)
        self.fakes.pop(k, None)
        self.trained.pop(("fake", k), None)
        generator = self.trained.pop(("generator", k), None)
        if generator is None:
            return
        if (ema := generator.full_ema()) is not None:
            self.finished_ema[k] = ema
        elif self.generator[k - 1].dtype != torch.float32:  # the weights are their rounding
            self.finished_main[k] = [t.cpu() for t in generator.full_main_params()]

    def exported_values(self, k: int) -> list[Tensor]:
        """What the export writes of expert k's trained tensors (aligned with its
        `parameters()`), as training keeps them: the fp32 EMA when kept, else the fp32 main
        parameters, of which bf16 weights are the rounding (the weights themselves in fp32 and
        pure bf16). Collective over data-parallel ranks when the optimizer is sharded."""
        trained = self.trained.get(("generator", k))
        if trained is not None:
            ema = trained.full_ema()
            return ema if ema is not None else trained.full_main_params()
        if k in self.finished_ema:
            return self.finished_ema[k]
        if k in self.finished_main:
            return [t.to(self.device) for t in self.finished_main[k]]
        return [p.detach().float() for p in self.generator[k - 1].parameters()]

    @contextlib.contextmanager
    def exported_parameters(self, k: int):
        """Expert k's trained parameters hold `exported_values(k)` (fp32) for the block: what
        the export reads; in an fp32 run the model also runs forward so."""
        with parameters_holding(self.generator[k - 1].parameters(), self.exported_values(k)):
            yield
