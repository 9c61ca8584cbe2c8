"""A plain sampling loop from diffusers' parts, independent of catversion/executor.py, for image-equality tests.

It is how ImageGenerator sampled before the executor existed: the whole batch's rows in one UNet
call ([all unconditional; all conditional] with guidance), the textbook guidance mix, diffusers'
``DDIMScheduler.step`` on the batch, and the VAE. It shares with the code under test only the
text encoding and the per-seed noise (``ImageGenerator.encode`` and ``initial_latents``), which
are not sampling; a bug in the executor's rows, guidance, DDIM step, previews or decode makes the
images differ.
"""

import torch
from diffusers import DDIMScheduler


@torch.no_grad()
def reference_images(generator, requests, steps, guidance, size=None, previews_at=()):
    """Images [B, 3, H, W] in [-1, 1] (float32, CPU); with ``previews_at`` (steps done), also
    {steps done: images [B, 3, H, W]} decoded from DDIM's predicted clean latent after those steps."""
    base = generator.base
    size = size or base.resolution
    cond, uncond = generator.encode(requests)
    guided = guidance != 1.0
    embeddings = torch.cat([uncond, cond]) if guided else cond
    scheduler = DDIMScheduler.from_config(base.scheduler_config)
    scheduler.set_timesteps(steps, device=base.device)
    latents = generator.initial_latents([r.seed for r in requests], size) * scheduler.init_noise_sigma
    unet = base.unet
    previews = {}
    for done, t in enumerate(scheduler.timesteps, start=1):
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]) if guided else latents, t)
        eps = unet(model_in.to(unet.dtype), t, encoder_hidden_states=embeddings.to(unet.dtype)).sample.float()
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        out = scheduler.step(eps, t, latents, eta=0.0)
        latents = out.prev_sample
        if done in previews_at:
            previews[done] = decode(base, out.pred_original_sample)
    images = decode(base, latents)
    return (images, previews) if previews_at else images


def decode(base, latents):
    vae = base.vae
    return vae.decode((latents / base.vae_scaling_factor).to(vae.dtype)).sample.float().cpu().clamp(-1, 1)
