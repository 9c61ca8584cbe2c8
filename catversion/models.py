"""Load the frozen Stable Diffusion v1.x base model (diffusers folder or hub id) that residuals
personalize, or build an offline built-in: "tiny" for tests, "sd15-random" for benchmarks."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.utils import is_accelerate_available
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BUILTIN_MODELS = ("tiny", "sd15-random")
# The hub's maintained copy of Stable Diffusion v1.5 (the runwayml repository was withdrawn).
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae")
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

SD15_TEXT_VOCAB_SIZE = 49408
SD_VAE_SCALING_FACTOR = 0.18215


class ModelNotAvailableError(RuntimeError):
    """A base model (or one of its components) cannot be found or read."""


@dataclass
class BaseModel:
    """The frozen parts of a Stable Diffusion v1 model; components not requested are None."""

    model_id: str
    tokenizer: CLIPTokenizer | None
    text_encoder: CLIPTextModel | None
    unet: UNet2DConditionModel | None
    vae: AutoencoderKL | None
    scheduler_config: dict
    fingerprint: str | None
    resolution: int
    vae_scaling_factor: float
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            raise ValueError(f"base model {self.model_id!r} was loaded without its vae; "
                             "pass components=(..., 'vae') to load_base_model")
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def tokenize(self, prompts: list[str]) -> torch.LongTensor:
        """Token ids [B, 77] on self.device, padded with the end token as SD v1 expects."""
        if self.tokenizer is None:
            raise ValueError(f"base model {self.model_id!r} was loaded without its tokenizer; "
                             "pass components=(..., 'tokenizer') to load_base_model")
        if isinstance(prompts, str):
            raise TypeError(f"tokenize expects a list of prompts, got the string {prompts!r}; "
                            "wrap it as [prompt]")
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=MAX_LENGTH,
                             truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device)


def text_encoder_fingerprint(text_encoder: CLIPTextModel) -> str:
    """sha256 over the encoder's architecture and weights, so a residual can refuse a wrong base.

    Values are hashed as float32 on CPU, so the result does not depend on where the model lives;
    it does change when weights are stored in a lossy dtype (bf16/fp16) before hashing.
    """
    config = text_encoder.config
    arch = {key: getattr(config, key) for key in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "vocab_size", "max_position_embeddings", "hidden_act")}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    state = text_encoder.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        # Name and shape go in with separators so that no two layouts hash the same bytes.
        digest.update(f"\0{name}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.numpy())
    return "sha256:" + digest.hexdigest()


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


def _build_builtin_modules(name: str, device: torch.device, dtype: torch.dtype,
                           components: tuple[str, ...], tokenizer: CLIPTokenizer
                           ) -> dict[str, torch.nn.Module]:
    """The requested modules of a built-in model, on `device` in `dtype` except the tiny text
    encoder, which stays float32 on CPU until it is fingerprinted."""
    size = "tiny" if name == "tiny" else "sd15"
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
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), torch.device(build_device), \
                _default_dtype(build_dtype):
            torch.manual_seed(BUILTIN_SEED + index)
            module = builders[component]()
        if component != "text_encoder":
            # nn.Module.to, because diffusers' own .to warns on any dtype cast even for models
            # like these that keep no module in float32.
            torch.nn.Module.to(module, device=device, dtype=dtype)
        built[component] = module
    return built


def _builtin_model(name: str, device: torch.device, dtype: torch.dtype,
                   components: tuple[str, ...]) -> BaseModel:
    size = "tiny" if name == "tiny" else "sd15"
    tokenizer = tiny_tokenizer()
    built = _build_builtin_modules(name, device, dtype, components, tokenizer)
    return _assemble(name, tokenizer if "tokenizer" in components else None,
                     built.get("text_encoder"), built.get("unet"), built.get("vae"),
                     dict(SD_SCHEDULER_CONFIG), _unet_config(size)["sample_size"],
                     _vae_config(size), device, dtype)


def _assemble(model_id: str, tokenizer, text_encoder, unet, vae, scheduler_config: dict,
              unet_sample_size: int, vae_config: dict, device: torch.device,
              dtype: torch.dtype) -> BaseModel:
    """Fingerprint the text encoder as stored, then put it on device/dtype; unet and vae arrive
    in `dtype` already."""
    fingerprint = None
    if text_encoder is not None:
        fingerprint = text_encoder_fingerprint(text_encoder)
        text_encoder.to(device=device, dtype=dtype)
    for module in (text_encoder, unet, vae):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return BaseModel(model_id=model_id, tokenizer=tokenizer, text_encoder=text_encoder,
                     unet=unet, vae=vae, scheduler_config=scheduler_config,
                     fingerprint=fingerprint, resolution=unet_sample_size * vae_scale_factor,
                     # vae configs written before diffusers named the factor are SD v1's
                     vae_scaling_factor=float(vae_config.get("scaling_factor",
                                                             SD_VAE_SCALING_FACTOR)),
                     device=device, dtype=dtype)


def tiny_base_model(device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                    ) -> BaseModel:
    """The built-in toy SD v1 model: 64 px images, 8x8 latents, a 5-layer 32-wide text encoder.
    Weights come from a fixed seed, so every build on every machine is identical."""
    return load_base_model("tiny", device=device, dtype=dtype)


def _looks_like_path(name: str) -> bool:
    if name.startswith((".", "~", os.sep, "/")) or (os.altsep and os.altsep in name):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _how_to_get(name: str) -> str:
    hub_id = name if not _looks_like_path(name) else DEFAULT_MODEL
    return (f"to fix: download it with network access (HF_HUB_OFFLINE unset), e.g. "
            f"`hf download {hub_id}`, or pass a local diffusers folder that has tokenizer/, "
            f"text_encoder/, unet/, vae/ and scheduler/")


def _load_component(name: str, component: str, load):
    try:
        return load()
    except (OSError, HfHubHTTPError, HFValidationError) as error:
        reason = (str(error).splitlines() or [""])[0]
        raise ModelNotAvailableError(
            f"base model {name!r}: cannot load its {component} ({type(error).__name__}: "
            f"{reason}); {_how_to_get(name)}") from error


def _load_pretrained(name: str, device: torch.device, dtype: torch.dtype,
                     components: tuple[str, ...]) -> BaseModel:
    source = os.path.expanduser(name)
    if _looks_like_path(name) or os.path.exists(source):
        if not os.path.isdir(source):
            raise ModelNotAvailableError(
                f"base model folder {name!r} does not exist; pass an existing diffusers folder, "
                f"a hub id, or one of the built-ins {BUILTIN_MODELS}")
        # A local folder fails with a clearer message here than from_pretrained's hub fallback.
        for component in (*components, "scheduler"):
            if not os.path.isdir(os.path.join(source, component)):
                raise ModelNotAvailableError(
                    f"base model folder {name!r} has no {component}/ subfolder; it must be a "
                    f"diffusers Stable Diffusion folder (tokenizer/, text_encoder/, unet/, vae/, "
                    f"scheduler/); to fix: fill it with network access, e.g. `hf download "
                    f"runwayml/stable-diffusion-v1-5 --local-dir {name}`")

    def load(component: str, cls, **kwargs):
        return _load_component(name, component,
                               lambda: cls.from_pretrained(source, subfolder=component, **kwargs))

    # diffusers asks for accelerate on every load without it; loading is only slower then.
    fast_init = is_accelerate_available()
    tokenizer = text_encoder = unet = vae = None
    if "tokenizer" in components:
        tokenizer = load("tokenizer", CLIPTokenizer)
        # Offline, transformers may hand back a 2-3 token placeholder instead of failing.
        if len(tokenizer) < MIN_TOKENIZER_VOCAB:
            raise ModelNotAvailableError(
                f"base model {name!r}: its tokenizer is missing or broken (got a vocabulary of "
                f"{len(tokenizer)} tokens, a CLIP tokenizer has 49408); {_how_to_get(name)}")
        tokenizer.model_max_length = MAX_LENGTH
    if "text_encoder" in components:
        text_encoder = load("text_encoder", CLIPTextModel)
        if tokenizer is not None and len(tokenizer) > text_encoder.config.vocab_size:
            raise ModelNotAvailableError(
                f"base model {name!r}: tokenizer has {len(tokenizer)} tokens but the text encoder "
                f"only embeds {text_encoder.config.vocab_size}; tokenizer/ and text_encoder/ "
                "must come from the same model")
    if "unet" in components:
        unet = load("unet", UNet2DConditionModel, torch_dtype=dtype, low_cpu_mem_usage=fast_init)
    if "vae" in components:
        vae = load("vae", AutoencoderKL, torch_dtype=dtype, low_cpu_mem_usage=fast_init)

    # Sizes come from the configs so that a partial load still knows the native resolution.
    def config(component: str, cls) -> dict:
        return dict(_load_component(name, component,
                                    lambda: cls.load_config(source, subfolder=component)))

    unet_config = dict(unet.config) if unet is not None else config("unet", UNet2DConditionModel)
    vae_config = dict(vae.config) if vae is not None else config("vae", AutoencoderKL)
    scheduler_config = config("scheduler", DDIMScheduler)
    # SD v1 ships a PNDM config, which has no clip_sample; DDIM/DDPM would default it to True
    # and clip latents that SD was never trained to keep in [-1, 1].
    scheduler_config.setdefault("clip_sample", False)
    return _assemble(name, tokenizer, text_encoder, unet, vae, scheduler_config,
                     unet_config["sample_size"], vae_config, device, dtype)


def resolve_device(name: str | torch.device) -> torch.device:
    """"auto" → the GPU when there is one, else the CPU; a CUDA device without CUDA is an error."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!s}: CUDA is not available on this machine; use cpu")
    return device


def load_base_model(name: str = "tiny", device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None,
                    components: tuple[str, ...] = COMPONENTS) -> BaseModel:
    """Load a frozen SD v1 base model: a built-in ("tiny", "sd15-random"), a local diffusers
    folder, or a hub id.

    dtype None means float32 on CPU and bfloat16 on CUDA. Components left out of `components`
    are None. "sd15-random" has SD v1.5's shapes with random weights and the tiny tokenizer (its
    ids all fit the 49408-token embedding); it is for benchmarks, and its weights depend on the
    device and dtype it is built on.
    """
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {COMPONENTS}")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if name in BUILTIN_MODELS:
        return _builtin_model(name, device, dtype, tuple(components))
    return _load_pretrained(name, device, dtype, tuple(components))
