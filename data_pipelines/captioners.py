"""Captioner plug-ins for `python -m data_pipelines.prepare --captioner=PATH`.

A captioner turns a few decoded frames of one file into a caption string. The contract is the small
`Captioner` protocol below; `CAPTIONERS` maps a kind name (the `--captioner_kind` flag) to a constructor
`cls(path, **options)`. The only kind today is "hf": a local Hugging Face image-to-text model directory.

Models are read from disk only (no network) and from safetensors only: a directory holding nothing but
pickle checkpoints (pytorch_model.bin) is refused, because loading pickle can run arbitrary code.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from absl import logging

from sora_jax.safetensors_io import PICKLE_SUFFIXES


@runtime_checkable
class Captioner(Protocol):
    """What `prepare` calls: frames (uint8 H x W x 3 arrays, in time order) -> one caption."""

    def caption(self, frames: Sequence[np.ndarray]) -> str:
        ...


class CaptionerError(ValueError):
    """A captioner that cannot be built or run; the message names the model path and the fix."""


def check_model_dir(path: str) -> None:
    """Refuses, before any file is processed, a path that cannot hold a local safetensors model.

    Parameters
    ----------
    path : str
        The model directory given as --captioner.

    Raises
    ------
    CaptionerError
        If the directory is missing, has no config.json, or has no *.safetensors weights.
    """
    if not path or not os.path.isdir(path):
        raise CaptionerError(
            f"--captioner={path!r} is not a directory; give a local Hugging Face model directory "
            "(config.json + *.safetensors), e.g. one written by `save_pretrained` or `huggingface-cli download`.")
    names = os.listdir(path)
    if "config.json" not in names:
        raise CaptionerError(f"--captioner={path!r} has no config.json; it is not a Hugging Face model "
                             "directory (point at the folder that holds config.json).")
    if not any(n.endswith(".safetensors") for n in names):
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        hint = (f" It holds pickle weights ({', '.join(sorted(pickles))}), which are refused because loading "
                "them can run code; convert them to safetensors first." if pickles else "")
        raise CaptionerError(f"--captioner={path!r} has no *.safetensors weights.{hint}")


@contextlib.contextmanager
def quiet_transformers():
    """Silences transformers' INFO/WARNING chatter, progress bars and Python warnings for the block.

    The console of `prepare` shows one progress bar and a summary; library messages about the load
    (weights, processor fallbacks, generation defaults) would drown it. The previous state is restored.
    """
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class HFImageToText:
    """A local Hugging Face image-to-text model (BLIP, GIT, ViT + GPT-2 encoder-decoders, ...).

    Captions the middle frame of what it is given, with greedy decoding, so the same frames always give
    the same caption. Loading uses `local_files_only=True` and `use_safetensors=True`.

    Parameters
    ----------
    path : str
        Model directory: config.json, *.safetensors, and a processor (processor_config.json) or an image
        processor (preprocessor_config.json) plus a tokenizer.
    max_new_tokens : int
        Longest caption, in tokens.
    prompt : str
        Optional text the caption is conditioned on (e.g. "a video of"); stripped from the output.
    device : str
        torch device to run on ("cpu", "cuda", ...).
    """

    def __init__(self, path: str, max_new_tokens: int = 32, prompt: str = "", device: str = "cpu"):
        check_model_dir(path)
        if max_new_tokens <= 0:
            raise CaptionerError(f"max_new_tokens={max_new_tokens} must be positive.")
        self.path, self.max_new_tokens, self.prompt, self.device = path, max_new_tokens, prompt, device
        try:
            import torch  # noqa: F401  (the models below are PyTorch modules)
            import transformers  # noqa: F401
        except ImportError as e:
            raise CaptionerError(f"the 'hf' captioner needs transformers and torch ({e}); "
                                 "`pip install transformers torch`.") from e
        with quiet_transformers():
            try:
                self._load()
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CaptionerError(f"--captioner={path!r} could not be loaded as an image-to-text model: "
                                     f"{type(e).__name__}: {e}") from e
        logging.info("captioner %s: %s, image processor %s, tokenizer %s, %d parameters", path,
                     type(self.model).__name__, type(self.image_processor).__name__,
                     type(self.tokenizer).__name__, sum(p.numel() for p in self.model.parameters()))

    def _load(self) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
        kwargs = dict(local_files_only=True)
        # A combined processor (BLIP, GIT, ...) prepares image and prompt together; encoder-decoder
        # checkpoints (ViT + GPT-2) ship an image processor and a tokenizer separately, and
        # AutoProcessor then returns just the tokenizer.
        processor = AutoProcessor.from_pretrained(self.path, **kwargs)
        if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
            self.processor = processor
            self.image_processor, self.tokenizer = processor.image_processor, processor.tokenizer
        else:
            self.processor = None
            self.image_processor = AutoImageProcessor.from_pretrained(self.path, **kwargs)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, **kwargs)
        # float32: captions must not depend on the reduced-precision kernels of one device.
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.path, use_safetensors=True, dtype=torch.float32, **kwargs)
        self.model.to(self.device).eval()

    def _inputs(self, image: np.ndarray) -> dict:
        """Model inputs for one image (and the prompt, if any)."""
        import torch
        if self.processor is not None:
            inputs = self.processor(images=[image], text=[self.prompt] if self.prompt else None,
                                    return_tensors="pt")
            return {k: v.to(self.device) for k, v in inputs.items()}
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        inputs = {"pixel_values": pixels.to(self.device)}
        if self.prompt:
            # Encoder-decoders take the prompt as the start of the decoder's sequence.
            ids = self.tokenizer(self.prompt, add_special_tokens=False)["input_ids"]
            start = self.model.config.decoder_start_token_id
            if start is None:
                start = self.model.generation_config.decoder_start_token_id
            inputs["decoder_input_ids"] = torch.tensor([[start, *ids]], device=self.device)
        return inputs

    def caption(self, frames: Sequence[np.ndarray]) -> str:
        """Greedy caption of the middle frame.

        Parameters
        ----------
        frames : sequence of np.ndarray
            uint8 (H, W, 3) frames in time order; at least one.

        Returns
        -------
        str
            The caption, whitespace-normalised; the prompt is removed from its start. May be empty if
            the model emits only special tokens (`prepare` then leaves the caption absent).
        """
        import torch
        if len(frames) == 0:
            raise CaptionerError("caption() needs at least one frame.")
        image = np.ascontiguousarray(frames[len(frames) // 2])
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise CaptionerError(f"frames must be uint8 (H, W, 3); got {image.dtype} {image.shape}.")
        inputs = self._inputs(image)
        with quiet_transformers(), torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      num_beams=1)
        ids = out[0]
        if not self.model.config.is_encoder_decoder and "input_ids" in inputs:
            ids = ids[inputs["input_ids"].shape[1]:]  # decoder-only models echo the prompt
        text = " ".join(self.tokenizer.decode(ids, skip_special_tokens=True).split())
        if self.prompt and text.lower().startswith(self.prompt.strip().lower()):
            text = text[len(self.prompt.strip()):].strip()
        return text


CAPTIONERS = {"hf": HFImageToText}


def build_captioner(kind: str, path: str, **options) -> Captioner:
    """The captioner `kind` from CAPTIONERS, loaded from `path`.

    Parameters
    ----------
    kind : str
        A key of CAPTIONERS.
    path : str
        Model location passed to the constructor.
    **options
        Constructor options (e.g. max_new_tokens, prompt).

    Raises
    ------
    CaptionerError
        Unknown kind, or a model that cannot be loaded.
    """
    if kind not in CAPTIONERS:
        raise CaptionerError(f"unknown captioner kind {kind!r}; choose one of {sorted(CAPTIONERS)}.")
    return CAPTIONERS[kind](path, **options)
