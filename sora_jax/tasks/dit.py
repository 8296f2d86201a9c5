"""The DiT task: rectified flow on NaViT-packed latent tokens of captioned videos.

With config.text.encoder = "precomputed" and config.text.path set (configs/wan21.py with umT5), a frozen
pretrained text encoder turns the batch's caption ids (config.text.tokenizer = "hf") into features inside the
step; its parameters are the task's frozen arrays, sharded by their logical axes like the DiT's and never
differentiated. When the latent cache (config.data.source = "latents") holds that encoder's features
(`python -m sora_jax.encode` writes them), training reads them instead and the step holds no encoder.
"""
from __future__ import annotations

import numpy as np

from data_pipelines import pipeline
from data_pipelines.latents import cached_text_features
from data_pipelines.media import SKIP_REASONS
from sora_jax.config_validation import validate_dit, validate_dit_for_mesh
from sora_jax.convert.hf_text import CaptionFeatures, caption_encoder_of, encode_captions, encoder_axes
from sora_jax.diffusion.flow import flow_loss
from sora_jax.models import build_model


class DiTTask:
    """Trains config.model on packed batches from data_pipelines.pipeline; validation is the flow loss
    at fixed, evenly spread timesteps and fixed noise, so it is comparable across steps and runs."""

    throughput_unit = "tokens"

    def __init__(self, config):
        self.config = config
        self._cached_features = None  # decided on first use: the latent cache's manifest says

    def validate(self) -> None:
        validate_dit(self.config)

    def validate_for_mesh(self, mesh_shape: dict) -> None:
        validate_dit_for_mesh(self.config, mesh_shape)

    def build_model(self, rngs):
        return build_model(self.config, rngs)

    def _step_encoder(self):
        """The frozen caption encoder the step runs: none when training reads features cached with the latents."""
        if self._cached_features is None:
            self._cached_features = cached_text_features(self.config)
        return None if self._cached_features else caption_encoder_of(self.config)

    def frozen(self):
        """{"text_encoder": params} with a frozen caption encoder in the step (config.text.path), else {}."""
        encoder = self._step_encoder()
        return {} if encoder is None else {"text_encoder": encoder[1]}

    def frozen_axes(self):
        """The frozen encoder's parameters carry their logical axes (embed, heads, mlp) as the DiT's do: sharded
        over fsdp and tensor, not replicated (umT5-XXL is 11 GB in bfloat16)."""
        encoder = self._step_encoder()
        if encoder is None:
            return {}
        return {"text_encoder": encoder_axes(encoder)}

    def _with_caption_features(self, frozen, batch: dict) -> dict:
        """The batch with its caption ids replaced by the frozen encoder's features, when the step runs one."""
        encoder = self._step_encoder()
        if encoder is None:
            return batch
        # The params come in through `frozen` (a jit argument, sharded), not the cache: no baked-in constants.
        features = encode_captions(encoder[0], frozen["text_encoder"], batch["text"], batch["text_segment_ids"],
                                   batch["text_positions"])
        return {**batch, "text": features}

    def train_data(self, process_index: int, process_count: int, start: int = 0):
        return pipeline.packed_dataset(self.config, "train", process_index, process_count, start)

    def reshard_start(self, states: list[dict], start: int, process_count: int) -> int:
        return pipeline.reshard_start(states, start, process_count)

    def eval_data(self, process_index: int, process_count: int) -> list[dict]:
        """Held-out batches (from the raw source); with cached caption features for training, their captions are
        encoded here, once, so that neither step holds the encoder."""
        batches = pipeline.eval_batches(self.config, self.config.eval_batches, process_index, process_count)
        if self._step_encoder() is not None or caption_encoder_of(self.config) is None:
            return batches
        encode = CaptionFeatures(self.config)
        return [{**b, "text": encode(b["text"], b["text_segment_ids"], b["text_positions"])} for b in batches]

    def loss(self, model, frozen, batch, key, step):
        del step
        batch = self._with_caption_features(frozen, batch)
        loss, aux = flow_loss(model, batch, key, self.config.flow, self.config.flow.caption_dropout, tasks=True)
        return loss, {"count": aux["real_tokens"]}

    def eval_metrics(self, model, frozen, batch, key) -> dict:
        batch = self._with_caption_features(frozen, batch)
        loss, _ = flow_loss(model, batch, key, self.config.flow, caption_dropout=0.0)
        return {"loss": loss}

    def host_metrics(self, batch: dict) -> dict:
        skipped = batch.get("host_skipped", np.zeros(len(SKIP_REASONS)))
        return {"padding_fraction": pipeline.padding_fraction(batch),
                **{f"skipped_{reason}": int(n) for reason, n in zip(SKIP_REASONS, skipped)}}

    def after_training(self, workdir: str) -> dict:
        """Samples held-out prompts (the procedural world's, scored by the color detector; or the first
        held-out captions of real data) into WORKDIR/samples."""
        import os

        from sora_jax.evaluation.color import color_accuracy
        from sora_jax.evaluation.detectors import direction_accuracy, shape_accuracy, whole_object_accuracy
        from sora_jax.generation import Sampler, sample_to_dir

        s = self.config.sample
        if s.num_prompts <= 0:
            return {}
        prompts, procedural = pipeline.sample_prompts(self.config, s.num_prompts)
        if not prompts:
            return {}
        sampler = Sampler.from_workdir(workdir, s.use_ema)
        out = os.path.join(workdir, "samples")
        videos, paths = sample_to_dir(sampler, prompts, out, s.width, s.height, s.frames, s.steps, s.guidance,
                                      self.config.seed, s.fps)
        scores = {}
        if procedural:  # the four figures of the demo: color, shape, direction, one whole object
            scores = {**color_accuracy(videos, prompts), **shape_accuracy(videos, prompts),
                      **(direction_accuracy(videos, prompts) if s.frames > 1 else {}),
                      **whole_object_accuracy(videos)}
        return {"samples_dir": out, "sample_paths": paths, **scores}
