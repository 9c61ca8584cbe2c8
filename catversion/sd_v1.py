"""Stable Diffusion v1's fixed facts, and the built-in random-weight models of its architecture.

"tiny" (64 px, a 5-layer 32-wide text encoder) is for tests and the demo; "sd15-random" has SD
v1.5's exact shapes for benchmarks. Both are built in code from a fixed seed, with a CLIP-style
tokenizer learned here, so they need no download. `models.load_base_model` is how callers get them.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

MAX_LENGTH = 77  # CLIP's context length; SD v1 always pads prompts to it

# Stable Diffusion v1's training noise schedule; DDIM/DDPM are built from it by the caller.
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
}

# Every byte-level BPE vocabulary holds the 256 byte symbols, their word-final forms and the
# start/end tokens; anything smaller is the placeholder transformers returns for a missing folder.
MIN_TOKENIZER_VOCAB = 2 * 256 + 2

# Words the tiny tokenizer learns as whole tokens: concept classes and common prompt words.
TINY_WORDS = """
a an the of on in at with and to by for from under over next top front behind
photo picture painting drawing sketch image render portrait close up view style
teapot dog cat backpack bear plushie toy bowl can candle clock sneaker boot duck
sloth monster robot car vase wolf glasses cup chair table bag hat shoe ball
beach snow forest city street floor grass water river mountain desert garden
kitchen room sky night sun moon field road bridge
red blue green yellow purple black white pink orange brown grey shiny colorful
wearing floating sitting sleeping cute small big old new fancy
""".split()
TINY_VOCAB_SIZE = 787  # 512 byte symbols + 273 merges learned from TINY_WORDS + 2 special tokens
BUILTIN_SEED = 20231124
BUILTINS = ("tiny", "sd15-random")  # the SD 1.x built-ins (builtin_families.py has the others)

SD15_TEXT_VOCAB_SIZE = 49408
SD_VAE_SCALING_FACTOR = 0.18215


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the rest are shifted
    past 255 so that every byte is a visible, non-whitespace character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on the word list until every word is one token; ties go to the smallest pair
    so the merges (and hence the vocabulary) are the same on every machine."""
    pieces = [[*word[:-1], word[-1] + "</w>"] for word in dict.fromkeys(words)]
    merges = []
    while True:
        pairs = Counter(pair for word in pieces for pair in zip(word, word[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for i, word in enumerate(pieces):
            merged, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == best:
                    merged.append(word[j] + word[j + 1])
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            pieces[i] = merged


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP-style byte-level BPE tokenizer built in code: any text encodes (lower-cased, as in
    CLIP) with no unknown tokens, and the words of TINY_WORDS are single tokens. Ids are laid out like CLIP's: bytes, word-final
    bytes, merges, then <|startoftext|> and <|endoftext|> last."""
    alphabet = list(_bytes_to_unicode().values())
    merges = _learn_merges(TINY_WORDS)
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges),
              "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != TINY_VOCAB_SIZE:
        raise AssertionError(f"tiny tokenizer vocabulary has {len(vocab)} tokens, expected "
                             f"{TINY_VOCAB_SIZE}; update TINY_VOCAB_SIZE with TINY_WORDS")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    if len(tokenizer) != TINY_VOCAB_SIZE:
        raise AssertionError(f"CLIPTokenizer kept {len(tokenizer)} of {TINY_VOCAB_SIZE} tokens")
    probe = "a photo of a teapot"
    decoded = tokenizer.decode(tokenizer(probe).input_ids, skip_special_tokens=True)
    if decoded != probe:
        raise AssertionError(f"tiny tokenizer does not round-trip {probe!r} (got {decoded!r})")
    return tokenizer


def _text_encoder_config(size: str, tokenizer_ids: dict[str, int]) -> CLIPTextConfig:
    # SD v1 pads with the end token, so pad and eos share an id.
    ids = dict(bos_token_id=tokenizer_ids["bos"], eos_token_id=tokenizer_ids["eos"],
               pad_token_id=tokenizer_ids["eos"])
    if size == "tiny":
        return CLIPTextConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                              projection_dim=32, num_hidden_layers=5, num_attention_heads=4,
                              max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", **ids)
    # CLIP ViT-L/14's text tower, as in SD v1.5's text_encoder/config.json.
    return CLIPTextConfig(vocab_size=SD15_TEXT_VOCAB_SIZE, hidden_size=768, intermediate_size=3072,
                          projection_dim=768, num_hidden_layers=12, num_attention_heads=12,
                          max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", **ids)


def _unet_config(size: str) -> dict:
    if size == "tiny":
        # Latents are 8x8 (64 px / 8); two levels keep the SD block layout at toy cost.
        return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                    block_out_channels=(32, 64), norm_num_groups=16,
                    cross_attention_dim=32, attention_head_dim=4)
    return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
                cross_attention_dim=768, attention_head_dim=8)


def _vae_config(size: str) -> dict:
    # Four levels in both sizes: SD's 8x downsampling is what sets latent size and resolution.
    channels = (16, 32, 32, 32) if size == "tiny" else (128, 256, 512, 512)
    return dict(in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=channels, layers_per_block=1 if size == "tiny" else 2,
                norm_num_groups=16 if size == "tiny" else 32,
                sample_size=64 if size == "tiny" else 512,
                scaling_factor=SD_VAE_SCALING_FACTOR)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    """Create parameters directly in `dtype` instead of allocating float32 and casting."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_modules(name: str, device: torch.device, dtype: torch.dtype,
                  components: tuple[str, ...], tokenizer: CLIPTokenizer) -> dict[str, torch.nn.Module]:
    """The requested modules of a built-in model, on `device`; the UNet and VAE in `dtype`, the
    text encoder in float32 (the precision policy; the tiny one stays on CPU until it is
    fingerprinted)."""
    size = _size(name)
    token_ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    builders = {
        "text_encoder": lambda: CLIPTextModel(_text_encoder_config(size, token_ids)),
        "unet": lambda: UNet2DConditionModel(**_unet_config(size)),
        "vae": lambda: AutoencoderKL(**_vae_config(size)),
    }
    # tiny is built in float32 on CPU so that its weights are identical on every machine;
    # sd15-random is built in place because 1B parameters are slow to initialise on CPU.
    build_device, build_dtype = ((torch.device("cpu"), torch.float32) if size == "tiny"
                                 else (device, dtype))
    built = {}
    for index, component in enumerate(("text_encoder", "unet", "vae")):
        if component not in components:
            continue
        # One seed per component: loading a subset gives the same weights as loading all.
        cuda = [build_device] if build_device.type == "cuda" else []
        component_dtype = torch.float32 if component == "text_encoder" else build_dtype
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), torch.device(build_device), \
                _default_dtype(component_dtype):
            torch.manual_seed(BUILTIN_SEED + index)
            module = builders[component]()
        if component != "text_encoder":
            # nn.Module.to, because diffusers' own .to warns on any dtype cast even for models
            # like these that keep no module in float32.
            torch.nn.Module.to(module, device=device, dtype=dtype)
        built[component] = module
    return built


def scheduler_config() -> dict:
    return dict(SD_SCHEDULER_CONFIG)


def sample_size(name: str) -> int:
    """The built-in UNet's latent size (the native resolution is this times the VAE factor)."""
    return _unet_config(_size(name))["sample_size"]


def vae_config(name: str) -> dict:
    return _vae_config(_size(name))


def _size(name: str) -> str:
    return "tiny" if name == "tiny" else "sd15"
