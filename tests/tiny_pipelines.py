"""Tiny random diffusers pipelines saved as real pipeline folders, built locally (no hub).

Each builder writes what `DiffusionPipeline.from_pretrained(folder)` reads: model_index.json and
every component (tokenizer, text encoder, VAE, transformer(s), scheduler, and for Wan2.1 I2V the
CLIP image encoder and its processor), with the classes the released pipelines use:

    wan22_t2v   WanPipeline, two experts (transformer, transformer_2, boundary_ratio 0.875),
                umT5 text encoder + T5 tokenizer, AutoencoderKLWan, UniPC (flow_shift 3)
    wan21_i2v   WanImageToVideoPipeline, one expert with 36 input channels and CLIP image
                attention, CLIPVisionModel + CLIPImageProcessor, UniPC (flow_shift 5)
    wan22_i2v   WanImageToVideoPipeline as Wan2.2-I2V-A14B: two experts with 36 input channels
                (boundary_ratio 0.9) and no CLIP image encoder, UniPC (flow_shift 5)
    wan22_ti2v  WanPipeline with expand_timesteps as Wan2.2-TI2V-5B: one expert on 48 latent
                channels of a Wan2.2-style VAE (2x2 patches, spatial factor 16), UniPC (shift 5)
    wan_student a transformer folder only: a smaller WanTransformer3DModel in the Wan
                pipelines' latent space and text width (a `student`)
    qwen_image  QwenImagePipeline, Qwen2.5-VL text encoder + Qwen2 tokenizer,
                AutoencoderKLQwenImage, FlowMatchEuler with dynamic shifting

Sizes: text width 16, latent channels 16 (Wan) / 48 (Wan2.2 TI2V) / 4 (Qwen-Image), spatial VAE
factor 8 (Wan) / 16 (TI2V) / 4 (Qwen-Image), temporal factor 4. Generating 16x16 pixels (32x64
for TI2V; x 5 frames for Wan) takes well under a second on one CPU core. The tokenizers are real `transformers` tokenizer classes whose
vocabularies are built here with the `tokenizers` package; the Qwen2 tokenizer splits Qwen-Image's
prompt template into the same 34 prefix tokens the pipeline drops (`prompt_template_encode_start_idx`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

# Words the tiny tokenizers know as whole tokens; other words fall back to characters (T5) or
# bytes (Qwen2), as real tokenizers do with rare words.
WORDS = (
    "a cat dog red blue green ball on the grass in snow running sitting photo of video "
    "bright low quality worst static blurry"
).split()

QWEN_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


def _seeded():
    torch.manual_seed(0)


def t5_tokenizer():
    """A transformers T5Tokenizer (Unigram, as umT5's) over WORDS plus single characters."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.:;!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{word}", -1.0) for word in WORDS]
    vocab += [(c, -5.0) for c in chars] + [(f"▁{c}", -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def qwen2_tokenizer():
    """A transformers Qwen2Tokenizer (byte-level BPE) whose merges spell WORDS and the prompt
    template's words, so the template prefix is 34 tokens as with Qwen2.5-VL's own."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    base = Qwen2Tokenizer()  # its pre-tokenizer (Qwen2's regex + byte level) with no vocab
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = base.backend_tokenizer.pre_tokenizer
    # the template's pieces between special tokens, as the tokenizer will see them
    pieces = re.split("|".join(map(re.escape, special)), QWEN_TEMPLATE.replace("{}", ""))
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator([" ".join(WORDS), *pieces] * 4, trainer)
    vocab = trained.get_vocab()
    merges = [tuple(pair) for pair in json.loads(trained.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": special[1:]})
    return tokenizer


def umt5_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    _seeded()
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
    )
    return UMT5EncoderModel(config).eval()


def wan_vae():
    from diffusers import AutoencoderKLWan

    _seeded()
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()


def wan22_vae():
    """Wan2.2's VAE layout (TI2V-5B): 48 latent channels, 2x2 pixel patches (12 channels in),
    residual blocks, spatial factor 16."""
    from diffusers import AutoencoderKLWan

    _seeded()
    stats = torch.Generator().manual_seed(1)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        latents_mean=(0.2 * torch.randn(48, generator=stats)).tolist(),
        latents_std=(1 + torch.rand(48, generator=stats)).tolist(),
    ).eval()


def wan_transformer(in_channels=16, image_dim=None, seed=0, out_channels=16):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    heads, head_dim = 2, 12
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else heads * head_dim,
    ).eval()


def build_wan_student(folder: str | Path) -> Path:
    """A smaller Wan transformer folder (1 layer, 1 head of 12, FFN 16, against the pipelines'
    2 layers, 2 heads of 12, FFN 32) in the tiny Wan pipelines' latent space and text width:
    a `student` for their teachers."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(7)
    WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=1,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=16,
        freq_dim=64,
        ffn_dim=16,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval().save_pretrained(folder)
    return Path(folder)


def unipc(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=flow_shift,
    )


def build_wan22_t2v(folder: str | Path) -> Path:
    """Two-expert Wan2.2 T2V pipeline folder (high-noise `transformer`, low-noise
    `transformer_2`, boundary_ratio 0.875)."""
    from diffusers import WanPipeline

    tokenizer = t5_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=umt5_encoder(len(tokenizer)),
        vae=wan_vae(),
        scheduler=unipc(3.0),
        transformer=wan_transformer(seed=1),
        transformer_2=wan_transformer(seed=2),
        boundary_ratio=0.875,
    )
    pipe.save_pretrained(folder)
    return Path(folder)


def build_wan21_i2v(folder: str | Path) -> Path:
    """Wan2.1 I2V pipeline folder: one expert with 36 input channels (latent + mask + first-frame
    latent) attending to CLIP image tokens (hidden_states[-2] of a tiny CLIPVisionModel)."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    tokenizer = t5_tokenizer()
    _seeded()
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=4,
            projection_dim=4,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            intermediate_size=16,
            patch_size=8,
        )
    ).eval()
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=umt5_encoder(len(tokenizer)),
        vae=wan_vae(),
        scheduler=unipc(5.0),
        transformer=wan_transformer(in_channels=36, image_dim=4, seed=3),
        image_encoder=image_encoder,
        image_processor=CLIPImageProcessor(crop_size=32, size=32),
    )
    pipe.save_pretrained(folder)
    return Path(folder)


def build_wan22_i2v(folder: str | Path) -> Path:
    """Wan2.2 I2V pipeline folder as the A14B one: two experts (boundary_ratio 0.9) with 36
    input channels and no CLIP image encoder (image conditioning through the latents alone)."""
    from diffusers import WanImageToVideoPipeline

    tokenizer = t5_tokenizer()
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=umt5_encoder(len(tokenizer)),
        vae=wan_vae(),
        scheduler=unipc(5.0),
        transformer=wan_transformer(in_channels=36, seed=4),
        transformer_2=wan_transformer(in_channels=36, seed=5),
        boundary_ratio=0.9,
    )
    pipe.save_pretrained(folder)
    return Path(folder)


def build_wan22_ti2v(folder: str | Path) -> Path:
    """Wan2.2 TI2V pipeline folder as the 5B one: WanPipeline with expand_timesteps (per-token
    timesteps; image-to-video through WanImageToVideoPipeline on the same folder), one expert
    on 48-channel latents of a Wan2.2 VAE, UniPC (flow_shift 5)."""
    from diffusers import WanPipeline

    tokenizer = t5_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=umt5_encoder(len(tokenizer)),
        vae=wan22_vae(),
        scheduler=unipc(5.0),
        transformer=wan_transformer(in_channels=48, out_channels=48, seed=6),
        expand_timesteps=True,
    )
    pipe.save_pretrained(folder)
    return Path(folder)


def build_qwen_image(folder: str | Path) -> Path:
    """Qwen-Image pipeline folder (Qwen2.5-VL text encoder, 4 latent channels)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen2_tokenizer()
    _seeded()
    vocab = len(tokenizer)
    text_config = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6},
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        vocab_size=vocab,
        image_token_id=vocab - 1,
        video_token_id=vocab - 1,
        vision_start_token_id=vocab - 1,
        vision_end_token_id=vocab - 1,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    _seeded()
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.0, 0.3],
        latents_std=[1.5, 0.5, 1.0, 2.0],
    ).eval()
    _seeded()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return Path(folder)


BUILDERS = {
    "wan22_t2v": build_wan22_t2v,
    "wan21_i2v": build_wan21_i2v,
    "wan22_i2v": build_wan22_i2v,
    "wan22_ti2v": build_wan22_ti2v,
    "wan_student": build_wan_student,
    "qwen_image": build_qwen_image,
}
