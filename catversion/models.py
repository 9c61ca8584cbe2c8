"""Load the frozen Stable Diffusion base model (1.x, 2.x or XL; a diffusers folder or hub id) that residuals
personalize, or an offline built-in ("tiny", "tiny-sd2", "tiny-sdxl" for tests and the demo; "sd15-random",
"sd2-random", "sdxl-random" for benchmarks; built in sd_v1.py and builtin_families.py). The model's family
(catversion/families.py) is recognised from its model_index.json and configs."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.utils import is_accelerate_available
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import builtin_families, sd_v1
from .families import SD1, Family, recognise
from .limits import BUILTIN_MODELS, DEFAULT_MODEL, PRECISION_CHOICES, PRECISIONS  # noqa: F401  (re-exported)
from .modelsource import ModelNotAvailableError, component_error, how_to_get, local_folder, model_index
from .sd_v1 import MAX_LENGTH, MIN_TOKENIZER_VOCAB, SD_VAE_SCALING_FACTOR, tiny_tokenizer

COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae")  # "tokenizer"/"text_encoder": every one the family has
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# float64 has a name only so that exactness tests can train on a float64 copy of the tiny model that they
# build themselves (tests/exactness.py); no loader, command line or config accepts it.
TEST_DTYPES = {"fp64": torch.float64}
TEXT_DTYPE = torch.float32  # the text encoder and the residual path, whatever the precision


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """A concrete precision name: "auto" is bf16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISION_CHOICES)}")
    return precision


def precision_name(dtype: torch.dtype) -> str:
    """"fp32" | "bf16" | "fp16" for a UNet/VAE dtype ("fp64" for the exactness tests' float64 model)."""
    for name, value in {**DTYPES, **TEST_DTYPES}.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not a supported precision ({', '.join(PRECISIONS)})")


@dataclass
class BaseModel:
    """The frozen parts of a Stable Diffusion model; components not requested are None.

    ``tokenizer``/``text_encoder`` are the family's first (SDXL: CLIP ViT-L), ``tokenizer_2``/``text_encoder_2``
    SDXL's second (OpenCLIP bigG, with projection); ``family`` says how they condition the UNet.
    """

    model_id: str
    tokenizer: CLIPTokenizer | None
    text_encoder: CLIPTextModel | None
    unet: UNet2DConditionModel | None
    vae: AutoencoderKL | None
    scheduler_config: dict
    fingerprint: str | None  # of every text encoder (text_encoders_fingerprint)
    resolution: int
    vae_scaling_factor: float
    device: torch.device
    dtype: torch.dtype  # the UNet's and the VAE's; the text encoder is float32 (float64 only in exactness tests)
    family: Family = SD1
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    zero_empty_negative: bool = False  # an empty negative prompt is all-zero conditioning (SDXL's default)

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """{subfolder name: text encoder} of every encoder the family has (loaded ones only)."""
        found = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {spec.name: found[spec.name] for spec in self.family.encoders if found[spec.name] is not None}

    @property
    def tokenizers(self) -> dict[str, CLIPTokenizer]:
        """{encoder subfolder name: its tokenizer} (loaded ones only)."""
        found = {"tokenizer": self.tokenizer, "tokenizer_2": self.tokenizer_2}
        return {spec.name: found[spec.tokenizer] for spec in self.family.encoders if found[spec.tokenizer] is not None}

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: "epsilon" or "v_prediction" (or "sample"), from the scheduler config."""
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def precision(self) -> str:
        """"fp32" | "bf16" | "fp16": the UNet/VAE precision (recorded in residuals and fingerprints)."""
        return precision_name(self.dtype)

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            raise ValueError(f"base model {self.model_id!r} was loaded without its vae; "
                             "pass components=(..., 'vae') to load_base_model")
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def tokenize(self, prompts: list[str], encoder: str = "text_encoder") -> torch.LongTensor:
        """Token ids [B, 77] on self.device for text encoder ``encoder``, padded with its tokenizer's pad
        token (SD 1.x/2.x: the end token; SDXL's second tokenizer: "!")."""
        tokenizer = self.tokenizers.get(encoder)
        if tokenizer is None:
            raise ValueError(f"base model {self.model_id!r} was loaded without its tokenizer; "
                             "pass components=(..., 'tokenizer') to load_base_model")
        if isinstance(prompts, str):
            raise TypeError(f"tokenize expects a list of prompts, got the string {prompts!r}; "
                            "wrap it as [prompt]")
        ids = tokenizer(list(prompts), padding="max_length", max_length=MAX_LENGTH,
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


def text_encoders_fingerprint(encoders: dict[str, torch.nn.Module]) -> str:
    """The base model's fingerprint: its one text encoder's (text_encoder_fingerprint, so residuals written
    before SDXL support keep matching), or for several a hash of each one's, by name."""
    if list(encoders) == ["text_encoder"]:
        return text_encoder_fingerprint(encoders["text_encoder"])
    parts = "\0".join(f"{name}={text_encoder_fingerprint(module)}" for name, module in encoders.items())
    return "sha256:" + hashlib.sha256(parts.encode()).hexdigest()


def _builtin_model(name: str, device: torch.device, dtype: torch.dtype,
                   components: tuple[str, ...]) -> BaseModel:
    if name in sd_v1.BUILTINS:
        tokenizers = {"tokenizer": tiny_tokenizer()}
        built = sd_v1.build_modules(name, device, dtype, components, tokenizers["tokenizer"])
        facts = (SD1, sd_v1.scheduler_config(), sd_v1.sample_size(name), sd_v1.vae_config(name))
    else:
        tokenizers = builtin_families.tokenizers(name)
        built = builtin_families.build_modules(name, device, dtype, components, tokenizers)
        facts = (builtin_families.family(name), builtin_families.scheduler_config(name),
                 builtin_families.sample_size(name), builtin_families.vae_config(name))
    family, scheduler_config, sample_size, vae_config = facts
    if "tokenizer" not in components:
        tokenizers = {}
    return _assemble(name, family, tokenizers, built, scheduler_config, sample_size, vae_config, device, dtype,
                     zero_empty_negative=family.zero_empty_negative)


def _assemble(model_id: str, family: Family, tokenizers: dict, modules: dict, scheduler_config: dict,
              unet_sample_size: int, vae_config: dict, device: torch.device,
              dtype: torch.dtype, zero_empty_negative: bool) -> BaseModel:
    """Fingerprint the text encoders as stored, then put them on device in float32 (the precision
    policy); unet and vae arrive in `dtype` already."""
    encoders = {spec.name: modules[spec.name] for spec in family.encoders if modules.get(spec.name) is not None}
    fingerprint = None
    if encoders:
        fingerprint = text_encoders_fingerprint(encoders)
        for module in encoders.values():
            module.to(device=device, dtype=TEXT_DTYPE)
    unet, vae = modules.get("unet"), modules.get("vae")
    for module in (*encoders.values(), unet, vae):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return BaseModel(model_id=model_id, tokenizer=tokenizers.get("tokenizer"), text_encoder=encoders.get("text_encoder"),
                     unet=unet, vae=vae, scheduler_config=scheduler_config,
                     fingerprint=fingerprint, resolution=unet_sample_size * vae_scale_factor,
                     # vae configs written before diffusers named the factor are SD v1's
                     vae_scaling_factor=float(vae_config.get("scaling_factor",
                                                             SD_VAE_SCALING_FACTOR)),
                     device=device, dtype=dtype, family=family, tokenizer_2=tokenizers.get("tokenizer_2"),
                     text_encoder_2=encoders.get("text_encoder_2"), zero_empty_negative=zero_empty_negative)


def tiny_base_model(device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                    ) -> BaseModel:
    """The built-in toy SD v1 model: 64 px images, 8x8 latents, a 5-layer 32-wide text encoder.
    Weights come from a fixed seed, so every build on every machine is identical."""
    return load_base_model("tiny", device=device, dtype=dtype)


def _load_component(name: str, component: str, load):
    try:
        return load()
    except (OSError, HfHubHTTPError, HFValidationError) as error:
        raise component_error(name, component, error) from error


def read_model_index(name: str, source: str) -> dict:
    """model_index.json of a diffusers folder or hub id ({} when it has none: a folder of only the components)."""
    if os.path.isdir(source):
        return model_index(name, source)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(source, "model_index.json")
    except EntryNotFoundError:
        return {}
    except (OSError, HfHubHTTPError, HFValidationError) as error:
        raise component_error(name, "model_index.json", error) from error
    return model_index(name, os.path.dirname(path))


def family_of(name: str, source: str, index: dict) -> Family:
    """The family of a diffusers folder or hub id from its model_index.json and first text encoder's config."""
    from transformers import CLIPTextConfig

    text = _load_component(name, "text_encoder", lambda: CLIPTextConfig.from_pretrained(source, subfolder="text_encoder"))
    components = dict(index)
    if not index and os.path.isdir(os.path.join(source, "text_encoder_2")):
        components["text_encoder_2"] = True
    return recognise(index.get("_class_name"), int(text.hidden_size), components, f"base model {name!r}",
                     text_act=text.hidden_act)


def _load_pretrained(name: str, device: torch.device, dtype: torch.dtype,
                     components: tuple[str, ...]) -> BaseModel:
    source = local_folder(name, components) or name
    index = read_model_index(name, source)
    family = family_of(name, source, index)
    if len(family.encoders) > 1 and os.path.isdir(source):
        local_folder(name, [*(s.tokenizer for s in family.encoders if "tokenizer" in components),
                            *(s.name for s in family.encoders if "text_encoder" in components)])

    def load(component: str, cls, **kwargs):
        return _load_component(name, component,
                               lambda: cls.from_pretrained(source, subfolder=component, **kwargs))

    # diffusers asks for accelerate on every load without it; loading is only slower then.
    fast_init = is_accelerate_available()
    tokenizers, modules = {}, {}
    for spec in family.encoders:
        tokenizer = None
        if "tokenizer" in components:
            tokenizer = load(spec.tokenizer, CLIPTokenizer)
            # Offline, transformers may hand back a 2-3 token placeholder instead of failing.
            if len(tokenizer) < MIN_TOKENIZER_VOCAB:
                raise ModelNotAvailableError(
                    f"base model {name!r}: its {spec.tokenizer} is missing or broken (got a vocabulary of "
                    f"{len(tokenizer)} tokens, a CLIP tokenizer has 49408); {how_to_get(name)}")
            tokenizer.model_max_length = MAX_LENGTH
            tokenizers[spec.tokenizer] = tokenizer
        if "text_encoder" in components:
            cls = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
            # float32 whatever the checkpoint stores (a fp16 variant is upcast): the precision policy.
            encoder = modules[spec.name] = load(spec.name, cls, torch_dtype=TEXT_DTYPE)
            if tokenizer is not None and len(tokenizer) > encoder.config.vocab_size:
                raise ModelNotAvailableError(
                    f"base model {name!r}: {spec.tokenizer} has {len(tokenizer)} tokens but the text encoder "
                    f"only embeds {encoder.config.vocab_size}; {spec.tokenizer}/ and {spec.name}/ "
                    "must come from the same model")
    if "unet" in components:
        modules["unet"] = load("unet", UNet2DConditionModel, torch_dtype=dtype, low_cpu_mem_usage=fast_init)
    if "vae" in components:
        modules["vae"] = load("vae", AutoencoderKL, torch_dtype=dtype, low_cpu_mem_usage=fast_init)

    # Sizes come from the configs so that a partial load still knows the native resolution.
    def config(component: str, cls) -> dict:
        return dict(_load_component(name, component,
                                    lambda: cls.load_config(source, subfolder=component)))

    unet_config = dict(modules["unet"].config) if "unet" in modules else config("unet", UNet2DConditionModel)
    vae_config = dict(modules["vae"].config) if "vae" in modules else config("vae", AutoencoderKL)
    scheduler_config = config("scheduler", DDIMScheduler)
    # SD v1 ships a PNDM config, which has no clip_sample; DDIM/DDPM would default it to True
    # and clip latents that SD was never trained to keep in [-1, 1].
    scheduler_config.setdefault("clip_sample", False)
    zero_negative = bool(index.get("force_zeros_for_empty_prompt", family.zero_empty_negative))
    return _assemble(name, family, tokenizers, modules, scheduler_config,
                     unet_config["sample_size"], vae_config, device, dtype, zero_empty_negative=zero_negative)


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
                    components: tuple[str, ...] = COMPONENTS, *, precision: str | None = None) -> BaseModel:
    """Load a frozen Stable Diffusion base model (1.x, 2.x or XL): a built-in (limits.BUILTIN_MODELS), a local
    diffusers folder, or a hub id.

    Precision policy: the text encoder is always float32; the UNet and VAE run in ``precision``
    ("auto" | "fp32" | "bf16" | "fp16"; "auto" = bf16 on CUDA, fp32 elsewhere) or in ``dtype``
    (one of the two, not both; neither = "auto"). Components left out of `components` are None.
    "sd15-random", "sd2-random" and "sdxl-random" have the real models' shapes with random weights and
    the tiny tokenizer (its ids all fit the 49408-token embedding); they are for benchmarks, and their
    weights depend on the device and precision they are built on.
    """
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {COMPONENTS}")
    device = torch.device(device)
    if dtype is not None and precision is not None:
        raise ValueError("pass precision or dtype, not both")
    if dtype is None:
        dtype = DTYPES[resolve_precision(precision or "auto", device)]
    if dtype not in DTYPES.values():  # the policy (float64 is for exactness tests' own copies only)
        raise ValueError(f"dtype {dtype} is not a supported precision ({', '.join(PRECISIONS)})")
    if name in BUILTIN_MODELS:
        return _builtin_model(name, device, dtype, tuple(components))
    return _load_pretrained(name, device, dtype, tuple(components))
