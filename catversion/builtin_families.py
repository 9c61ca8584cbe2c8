"""The built-in random-weight models of Stable Diffusion 2.x and XL (SD 1.x's are in sd_v1.py).

"tiny-sd2" (v-prediction, a 5-layer 32-wide OpenCLIP-style encoder) and "tiny-sdxl" (two 5-layer
encoders, pooled text embeds and time ids, the UNet layout diffusers' own SDXL tests use) are for tests
and the demo: 64 px, built in float32 on the CPU from a fixed seed, so every machine builds the same
weights. "sd2-random" (SD 2.1's 768 px v-prediction shapes) and "sdxl-random" (SDXL base's 1024 px
shapes) are for GPU benchmarks. All use the tiny CLIP-style tokenizer (sd_v1.tiny_tokenizer); SDXL's
second tokenizer pads with "!" as SDXL's own does. docs/families.md lists where each shape comes from.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .families import SD2, SDXL, Family
from .sd_v1 import BUILTIN_SEED, MAX_LENGTH, SD15_TEXT_VOCAB_SIZE, SD_SCHEDULER_CONFIG, TINY_VOCAB_SIZE, \
    _default_dtype, tiny_tokenizer

SDXL_VAE_SCALING_FACTOR = 0.13025
FAMILY_OF = {"tiny-sd2": SD2, "sd2-random": SD2, "tiny-sdxl": SDXL, "sdxl-random": SDXL}
TINY = ("tiny-sd2", "tiny-sdxl")
SEED_OFFSET = {"tiny-sd2": 100, "sd2-random": 100, "tiny-sdxl": 200, "sdxl-random": 200}


def family(name: str) -> Family:
    return FAMILY_OF[name]


def tokenizers(name: str) -> dict[str, CLIPTokenizer]:
    """{subfolder: tokenizer}: the tiny tokenizer for every encoder; SDXL's second pads with "!"."""
    made = {"tokenizer": tiny_tokenizer()}
    if FAMILY_OF[name] is SDXL:
        second = tiny_tokenizer()
        second.pad_token = "!"
        made["tokenizer_2"] = second
    return made


def _clip(width: int, layers: int, heads: int, intermediate: int, act: str, projection: int, vocab: int,
          ids: dict[str, int]) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate,
                          projection_dim=projection, num_hidden_layers=layers, num_attention_heads=heads,
                          max_position_embeddings=MAX_LENGTH, hidden_act=act, layer_norm_eps=1e-5, **ids)


def _text_configs(name: str, tokens: dict[str, CLIPTokenizer]) -> dict[str, CLIPTextConfig]:
    def ids(tokenizer: CLIPTokenizer) -> dict[str, int]:
        return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)

    first = ids(tokens["tokenizer"])
    if name == "tiny-sd2":
        return {"text_encoder": _clip(32, 5, 4, 37, "gelu", 32, TINY_VOCAB_SIZE, first)}
    if name == "sd2-random":  # OpenCLIP ViT-H as SD 2.1 stores it: 23 layers
        return {"text_encoder": _clip(1024, 23, 16, 4096, "gelu", 512, SD15_TEXT_VOCAB_SIZE, first)}
    second = ids(tokens["tokenizer_2"])
    if name == "tiny-sdxl":  # the sizes of diffusers' SDXL pipeline tests
        return {"text_encoder": _clip(32, 5, 4, 37, "gelu", 32, TINY_VOCAB_SIZE, first),
                "text_encoder_2": _clip(32, 5, 4, 37, "gelu", 32, TINY_VOCAB_SIZE, second)}
    return {"text_encoder": _clip(768, 12, 12, 3072, "quick_gelu", 768, SD15_TEXT_VOCAB_SIZE, first),
            "text_encoder_2": _clip(1280, 32, 20, 5120, "gelu", 1280, SD15_TEXT_VOCAB_SIZE, second)}


def _unet_config(name: str) -> dict:
    if name == "tiny-sd2":
        return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                    block_out_channels=(32, 64), norm_num_groups=16, cross_attention_dim=32,
                    attention_head_dim=(2, 4), use_linear_projection=True)
    if name == "sd2-random":  # SD 2.1's unet/config.json
        return dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                    block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32, cross_attention_dim=1024,
                    attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
    if name == "tiny-sdxl":  # diffusers' SDXL tests' layout at 8x8 latents
        return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                    block_out_channels=(32, 64), norm_num_groups=16, attention_head_dim=(2, 4),
                    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
                    cross_attention_dim=64)
    return dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,  # SDXL base's unet/config.json
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(320, 640, 1280), norm_num_groups=32, attention_head_dim=(5, 10, 20),
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                transformer_layers_per_block=(1, 2, 10), projection_class_embeddings_input_dim=2816,
                cross_attention_dim=2048)


def vae_config(name: str) -> dict:
    tiny = name in TINY
    return dict(in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(16, 32, 32, 32) if tiny else (128, 256, 512, 512),
                layers_per_block=1 if tiny else 2, norm_num_groups=16 if tiny else 32,
                sample_size=64 if tiny else 8 * _unet_config(name)["sample_size"],
                scaling_factor=SDXL_VAE_SCALING_FACTOR if FAMILY_OF[name] is SDXL else 0.18215)


def scheduler_config(name: str) -> dict:
    """SD's training noise schedule; SD 2.x's built-ins predict v (as SD 2.1 at 768 px), SDXL's ε."""
    config = dict(SD_SCHEDULER_CONFIG)
    if FAMILY_OF[name] is SD2:
        config["prediction_type"] = "v_prediction"
    return config


def sample_size(name: str) -> int:
    return _unet_config(name)["sample_size"]


def build_modules(name: str, device: torch.device, dtype: torch.dtype, components: tuple[str, ...],
                  tokens: dict[str, CLIPTokenizer]) -> dict[str, torch.nn.Module]:
    """The requested modules on `device`: text encoders in float32, UNet and VAE in `dtype` (sd_v1.build_modules's
    rules: tiny ones built on the CPU in float32, each component from its own seed)."""
    configs = _text_configs(name, tokens)
    builders = {"text_encoder": lambda: CLIPTextModel(configs["text_encoder"])}
    if "text_encoder_2" in configs:
        builders["text_encoder_2"] = lambda: CLIPTextModelWithProjection(configs["text_encoder_2"])
    builders["unet"] = lambda: UNet2DConditionModel(**_unet_config(name))
    builders["vae"] = lambda: AutoencoderKL(**vae_config(name))
    build_device, build_dtype = ((torch.device("cpu"), torch.float32) if name in TINY else (device, dtype))
    wanted = set(components) | ({"text_encoder_2"} if "text_encoder" in components else set())
    built = {}
    for index, component in enumerate(("text_encoder", "unet", "vae", "text_encoder_2")):
        if component not in wanted or component not in builders:
            continue
        text = component.startswith("text_encoder")
        cuda = [build_device] if build_device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), torch.device(build_device), \
                _default_dtype(torch.float32 if text else build_dtype):
            torch.manual_seed(BUILTIN_SEED + SEED_OFFSET[name] + index)
            module = builders[component]()
        if not text:
            torch.nn.Module.to(module, device=device, dtype=dtype)
        built[component] = module
    return built
