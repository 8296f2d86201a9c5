"""Converters from diffusers / Hugging Face checkpoints to our modules. Safetensors only, never pickle."""
from sora_jax.convert.diffusers_vae import load_diffusers_vae, vae_config_from_diffusers

__all__ = ["load_diffusers_vae", "vae_config_from_diffusers"]
