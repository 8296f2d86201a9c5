"""Converters from diffusers / Hugging Face checkpoints to our modules, and of our Wan-configured DiT back to
diffusers. Safetensors only, never pickle."""
from sora_jax.convert.diffusers_vae import load_diffusers_vae, vae_config_from_diffusers
from sora_jax.convert.diffusers_wan import apply_dense, load_diffusers_transformer, save_diffusers_transformer
from sora_jax.convert.hf_text import load_hf_text_encoder

__all__ = ["apply_dense", "load_diffusers_transformer", "load_diffusers_vae", "load_hf_text_encoder",
           "save_diffusers_transformer", "vae_config_from_diffusers"]
