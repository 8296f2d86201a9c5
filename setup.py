"""sora_jax: Sora-style text-to-video diffusion in JAX/Flax NNX.

Versions are pinned exactly: the quickstart and CI install from this file on a fresh machine, and a
moving dependency is the usual cause of a red run. BUILD_NOTES.md says why each pin was chosen.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml_collections==1.1.0",
    "clu==0.0.12",
    # clu.metric_writers imports TensorFlow's summary writer unconditionally; the CPU wheel is enough.
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    "einops==0.8.2",
    "numpy==2.4.6",
    "absl-py==2.5.1",
    "av==18.1.0",  # MP4 (libx264 is bundled in the wheel)
    "pillow==13.0.0",  # GIF and PNG
    "tqdm==4.70.1",
    "safetensors==0.8.0",
    # tfds.data_source reads TFDS datasets in ArrayRecord format (data_pipelines/sources.py).
    "tensorflow-datasets==4.9.10",
    # Local Hugging Face models: the captioner plug-in of data_pipelines.prepare; later T5/umT5 tokenizers.
    "transformers==5.23.0",
]

EXTRAS = {
    # torch (CPU build) and diffusers are test-only: numerical parity of our modules with theirs.
    # jax[tpu] brings libtpu, whose compiler the TPU ahead-of-time test (tests/test_aot.py) runs on the CPU.
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "torch==2.13.0", "diffusers==0.42.1", "jax[tpu]==0.10.2",
             "ruff==0.17.6"],  # the linter launch/test.sh runs (rules: ruff.toml)
    # Ahead-of-time compiles for TPU slices on a CPU machine (python -m sora_jax.aot --topology=v5p-128).
    "aot": ["jax[tpu]==0.10.2"],
    # Accelerator installs replace the CPU jaxlib; versions must match jax above.
    "tpu": ["jax[tpu]==0.10.2"],
    "gpu": ["jax[cuda12]==0.10.2"],
}

setup(
    name="sora_jax",
    version="0.1.0",
    description="Sora-style text-to-video diffusion training in JAX/Flax NNX",
    packages=find_packages(include=["sora_jax", "sora_jax.*", "data_pipelines", "data_pipelines.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
