"""One `validate(config)` before anything compiles: each error names the field and the fix."""
from __future__ import annotations

import math

import ml_collections

from sora_jax.layers.attention import BACKEND_CHOICES
from sora_jax.layers.common import DTYPES
from sora_jax.layers.rope import split_pairs
from sora_jax.models.autoencoder import AUTOENCODERS, build_autoencoder
from sora_jax.models.dit import REMAT_POLICIES, model_options
from sora_jax.models.text import TOKENIZERS, frozen_encoder_path, hf_tokenizer_path


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which field and what to do."""


# Text-to-video in one pass, or its image generated first and then animated (generation.Sampler.generate).
FIRST_FRAME = ("joint", "image")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_video_size(config, width: int, height: int, frames: int, what: str = "") -> tuple[int, int, int]:
    """Token grid for a pixel video size, or a ConfigError naming the dimension that does not fit."""
    _require(min(width, height, frames) > 0,
             f"{what}width, height and frames must be positive; got {width}x{height}, {frames} frames.")
    try:
        ae = build_autoencoder(config.autoencoder)
        latent = ae.latent_shape(frames, height, width)
    except ValueError as e:
        raise ConfigError(f"{what}{e}") from None
    grid = []
    for name, size, lsize, stride, patch in zip(("frames", "height", "width"), (frames, height, width), latent,
                                                ae.stride, config.model.patch):
        if lsize % patch:
            unit = stride * patch
            nearest = ""
            if what.startswith("--"):  # a sampling request: name the one the sample command would round to
                w, h, f, _ = round_video_size(config, width, height, frames)
                nearest = f" The nearest valid request is {w}x{h}, {f} frames."
            raise ConfigError(
                f"{what}{name}={size} is not divisible by {unit} (autoencoder stride {stride} x patch {patch}); "
                f"its {lsize} latent {name} must be a multiple of the patch size {patch}.{nearest}")
        grid.append(lsize // patch)
    return tuple(grid)


def round_video_size(config, width: int, height: int, frames: int) -> tuple[int, int, int, str]:
    """The valid request nearest to (width, height, frames), and a line saying what was rounded ("" if nothing).

    Rule: width and height go to the nearest multiple of the autoencoder's spatial stride x the patch (ties
    upward, at least one unit); frames to the nearest count whose latent frames the temporal patch divides
    (for a causal VAE of stride s: 1 + s k frames), ties upward. Non-positive sizes are left for
    check_video_size to refuse.
    """
    if min(width, height, frames) <= 0:
        return width, height, frames, ""
    ae = build_autoencoder(config.autoencoder)
    pt, ph, pw = config.model.patch
    unit_h, unit_w = ae.stride[1] * ph, ae.stride[2] * pw
    near = lambda size, unit: max(unit, int(math.floor(size / unit + 0.5)) * unit)  # noqa: E731
    h, w = near(height, unit_h), near(width, unit_w)

    def fits(f):
        try:
            return ae.latent_shape(f, h, w)[0] % pt == 0
        except ValueError:
            return False
    f = min((c for c in range(1, 2 * frames + 8 * ae.stride[0] * pt) if fits(c)), key=lambda c: (abs(c - frames), -c))
    if (w, h, f) == (width, height, frames):
        return w, h, f, ""
    return w, h, f, (f"rounded {width}x{height}, {frames} frames to {w}x{h}, {f} frames: sides are multiples of "
                     f"{unit_w} x {unit_h} and frame counts fit the autoencoder's stride x patch.")


def validate(config, task) -> None:
    """Checks a training config (common fields, then `task`'s own checks); raises ConfigError before any
    compile. The caller builds the task (sora_jax.tasks.build_task): tasks import these checks, never the
    other way round."""
    validate_common(config)
    task.validate()


def validate_for_mesh(config, mesh_shape: dict, task) -> None:
    """Checks what depends on the device mesh (the task's batch must split over data x fsdp)."""
    del config
    task.validate_for_mesh(mesh_shape)


def validate_common(config) -> None:
    """Checks the fields every task shares: step counts, optimizer, EMA, the non-finite policy."""
    steps = config.total_steps
    # 0 would compile the whole train step and only then find nothing to run.
    _require(steps > 0, f"config.total_steps={steps} {'is negative' if steps < 0 else 'trains nothing'}; it must be "
                        "> 0, the step training runs up to.")
    for field in ("checkpoint_every_steps", "log_every_steps", "eval_every_steps", "eval_batches"):
        _require(int(config[field]) >= 0, f"config.{field}={config[field]} is negative; it must be >= 0.")
    _require(config.checkpoint_every_steps > 0, "config.checkpoint_every_steps must be > 0.")
    _require(config.log_every_steps > 0, "config.log_every_steps must be > 0.")
    _require(config.keep_checkpoints > 0, "config.keep_checkpoints must be > 0.")
    _check_optim(config.optim)
    _require(0.0 <= config.ema_decay < 1.0, f"config.ema_decay={config.ema_decay} must be in [0, 1).")
    _require(config.get("nonfinite", "stop") in ("stop", "skip", "rollback"),
             f"config.nonfinite={config.get('nonfinite')!r}; choose 'stop', 'skip' or 'rollback'.")
    _require(config.get("nonfinite_max_skips", 1) >= 1 and config.get("nonfinite_max_rollbacks", 1) >= 1,
             "config.nonfinite_max_skips and config.nonfinite_max_rollbacks must be >= 1.")
    _require(0.0 < config.get("nonfinite_lr_factor", 0.5) < 1.0,
             f"config.nonfinite_lr_factor={config.get('nonfinite_lr_factor')} must be in (0, 1).")
    _check_finetune(config)


def _check_finetune(config) -> None:
    """config.init_from, init_from_weights and lora (sora_jax/train/init_from.py, sora_jax/models/lora.py)."""
    import os
    import re
    init_from = config.get("init_from", "")
    _require(not init_from or os.path.isdir(init_from),
             f"config.init_from={init_from!r} is not a directory; name a sora_jax work dir or a diffusers "
             "WanTransformer3DModel directory.")
    _require(config.get("init_from_weights", "ema") in ("ema", "params"),
             f"config.init_from_weights={config.get('init_from_weights')!r}; choose 'ema' or 'params'.")
    lora = config.get("lora")
    if lora is None or lora.rank == 0:
        return
    _require(isinstance(lora.rank, int) and lora.rank > 0, f"config.lora.rank={lora.rank!r} must be an integer >= 0 "
                                                           "(0: no LoRA).")
    _require(lora.alpha >= 0, f"config.lora.alpha={lora.alpha} must be >= 0 (0: the rank).")
    _require(bool(init_from), "config.lora.rank > 0 needs config.init_from: the base weights the adapters train on "
                              "(read again at every start, resumes included).")
    targets = (lora.targets,) if isinstance(lora.targets, str) else tuple(lora.targets)
    _require(len(targets) > 0, "config.lora.targets is empty; name the linear layers to adapt (regexes over module "
                               "paths such as blocks/0/attn/q).")
    for target in targets:
        try:
            re.compile(target)
        except re.error as e:
            raise ConfigError(f"config.lora.targets: {target!r} is not a valid regex ({e}).") from None


def _check_optim(o) -> None:
    """AdamW's fields (sora_jax.train.state.make_optimizer): optax accepts any float, so a b1 of 5 would
    train, diverge, and be reported as a non-finite loss far from its cause."""
    for name in ("lr", "warmup_steps", "grad_clip", "weight_decay"):
        _require(o[name] >= 0, f"config.optim.{name}={o[name]} must be >= 0.")
    for name, moment, usual in (("b1", "first", "0.9"), ("b2", "second", "0.99 to 0.999")):
        _require(0.0 <= o[name] < 1.0, f"config.optim.{name}={o[name]} must be in [0, 1): it is the decay rate of "
                                       f"Adam's {moment} moment (usually {usual}).")
    _require(o.schedule in ("constant", "cosine"),
             f"config.optim.schedule={o.schedule!r}; choose 'constant' or 'cosine'.")
    _require(o.get("mu_dtype", "float32") in ("float32", "bfloat16"),
             f"config.optim.mu_dtype={o.get('mu_dtype')!r}; choose 'float32' or 'bfloat16'.")


def validate_dit(config) -> None:
    """Checks the DiT task's model, autoencoder, data, flow and sampling fields."""
    m = config.model
    _require(m.hidden % m.heads == 0,
             f"config.model.hidden={m.hidden} is not divisible by config.model.heads={m.heads}.")
    try:
        split_pairs(m.hidden // m.heads)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None
    _require(m.attention in BACKEND_CHOICES,
             f"config.model.attention={m.attention!r}; choose one of {BACKEND_CHOICES}.")
    _require(m.attention_block > 0 and m.attention_block % 8 == 0,
             f"config.model.attention_block={m.attention_block} must be a positive multiple of 8.")
    for field in ("dtype", "param_dtype"):
        _require(m[field] in DTYPES, f"config.model.{field}={m[field]!r}; choose one of {sorted(DTYPES)}.")
    _require(m.remat in REMAT_POLICIES, f"config.model.remat={m.remat!r}; choose one of {sorted(REMAT_POLICIES)}.")
    try:
        model_options(m)  # qk_norm, ffn_dim, text_proj, ... (sora_jax.models.dit.MODEL_OPTIONS)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(len(m.patch) == 3 and min(m.patch) > 0, f"config.model.patch={m.patch} must be 3 positive ints (t, h, w).")
    _require(config.autoencoder.name in AUTOENCODERS,
             f"config.autoencoder.name={config.autoencoder.name!r}; choose one of {sorted(AUTOENCODERS)}.")
    try:
        build_autoencoder(config.autoencoder)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(config.text.width % config.text.heads == 0,
             f"config.text.width={config.text.width} is not divisible by config.text.heads={config.text.heads}.")
    _check_text(config.text)

    d = config.data
    if d.source == "latents":
        _check_latent_cache(config)
    _check_data_source(config, d)
    if "procedural" in (d.source, d.source == "latents" and d.raw_source):  # sides and frames are the world's
        for field, example in (("sides", "(16, 24, 32)"), ("frames", "(1, 2, 4)")):
            _require(len(d[field]) > 0, f"config.data.{field}={tuple(d[field])} is empty; the procedural world "
                                        f"needs at least one, e.g. --config.data.{field}=\"{example}\".")
        for side in d.sides:
            check_video_size(config, side, side, min(d.frames), what="config.data.sides: ")
        for frames in d.frames:
            check_video_size(config, min(d.sides), min(d.sides), frames, what="config.data.frames: ")
        biggest = math.prod(check_video_size(config, max(d.sides), max(d.sides), max(d.frames)))
        _require(biggest <= d.seq_len,
                 f"config.data.seq_len={d.seq_len} cannot hold the largest sample ({biggest} tokens); raise "
                 f"seq_len or lower config.data.sides / config.data.frames.")
    _require(d.text_len >= config.text.max_len,
             f"config.data.text_len={d.text_len} is below config.text.max_len={config.text.max_len}.")
    _require(d.global_batch_rows > 0, "config.data.global_batch_rows must be > 0.")
    _require(d.max_samples_per_row > 0, "config.data.max_samples_per_row must be > 0.")

    _require(0.0 <= config.flow.caption_dropout < 1.0,
             f"config.flow.caption_dropout={config.flow.caption_dropout} must be in [0, 1).")
    _require(config.flow.prediction in ("velocity", "x0"),
             f"config.flow.prediction={config.flow.prediction!r}; choose 'velocity' or 'x0'.")
    _require(0.0 < config.flow.t_min < 1.0, f"config.flow.t_min={config.flow.t_min} must be in (0, 1).")
    from sora_jax.diffusion.tasks import task_weights
    try:
        task_weights(config.flow)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    s = config.sample
    _require(s.steps > 0, f"config.sample.steps={s.steps} must be > 0.")
    from sora_jax.diffusion.solvers import SOLVERS
    _require(s.get("solver", "euler") in SOLVERS, f"config.sample.solver={s.get('solver')!r}; choose one of {SOLVERS}.")
    _require(s.get("first_frame", "joint") in FIRST_FRAME,
             f"config.sample.first_frame={s.get('first_frame')!r}; choose one of {FIRST_FRAME}.")
    check_guidance_interval(s.get("guidance_interval", (0.0, 1.0)), "config.sample.guidance_interval")
    check_video_size(config, s.width, s.height, s.frames, what="config.sample: ")


def _check_text(text) -> None:
    """The tokenizer's and a frozen caption encoder's directory (config.text.path), read before any weight is."""
    import json
    import os
    path, tokenizer_path = text.get("path", ""), hf_tokenizer_path(text)
    _require(text.tokenizer in TOKENIZERS,
             f"config.text.tokenizer={text.tokenizer!r}; choose one of {sorted(TOKENIZERS)}.")
    if text.tokenizer == "hf":
        _require(bool(tokenizer_path) and os.path.isdir(tokenizer_path),
                 f"config.text.tokenizer='hf' reads its tokenizer from config.text.tokenizer_path or config.text.path, "
                 f"but {tokenizer_path!r} is not a directory; pass a local Hugging Face model directory (what "
                 "save_pretrained writes).")
    if not frozen_encoder_path(text):
        _require(not text.get("pad_captions", False),
                 "config.text.pad_captions=True pads captions to max_len slots of zero features, which needs a frozen "
                 "caption encoder (config.text.encoder='precomputed' with config.text.path); unset it.")
        return
    # A frozen pretrained encoder (sora_jax.convert.hf_text.frozen_text_encoder) computes the features.
    _require(os.path.isdir(path), f"config.text.path={path!r} is not a directory; pass the local Hugging Face "
                                  "directory of the frozen caption encoder (config.json, *.safetensors, tokenizer).")
    config_json = os.path.join(path, "config.json")
    _require(os.path.isfile(config_json), f"config.text.path={path!r} has no config.json; pass a Hugging Face T5 / "
                                          "umT5 encoder directory (save_pretrained or a downloaded snapshot).")
    with open(config_json) as f:
        width = json.load(f).get("d_model")
    _require(width == text.width,
             f"the caption encoder in config.text.path={path!r} emits {width}-wide features but config.text.width="
             f"{text.width} (the model's caption input, Wan's text_dim); use an encoder of that width or a model "
             "built for it.")
    _require(text.tokenizer == "hf",
             f"config.text.path={path!r} names a frozen caption encoder, which reads the ids of its own tokenizer: "
             f"set config.text.tokenizer='hf' (not {text.tokenizer!r}).")


_SOURCE_NAMES = ("procedural", "latents", "folder", "records", "tfds", "mixture")


def _check_data_source(config, d, where: str = "config.data") -> None:
    """The source's own fields: a manifest that exists, a glob that matches, sizes that fit a row."""
    import glob
    import os
    _require(d.source in _SOURCE_NAMES, f"{where}.source={d.source!r}; choose one of {_SOURCE_NAMES}.")
    if d.source == "mixture":
        _require(len(d.mixture) > 0, f"{where}.source='mixture' needs {where}.mixture = ((name, weight), ...).")
        for name, weight in d.mixture:
            _require(name in d.components, f"{where}.mixture names {name!r}, which {where}.components lacks.")
            _require(float(weight) > 0, f"{where}.mixture weight of {name!r} is {weight}; weights must be > 0.")
            part = ml_collections.ConfigDict(d.to_dict())
            part.update(d.components[name].to_dict())
            _require(part.source != "mixture", f"{where}.components.{name} is itself a mixture; nest no mixtures.")
            _check_data_source(config, part, f"{where}.components.{name}")
        return
    if d.source == "folder":
        for field in ("manifest", "eval_manifest"):
            _require(field == "eval_manifest" and not d[field] or os.path.isfile(d[field]),
                     f"{where}.{field}={d[field]!r} is not a file; write one with `python -m data_pipelines.prepare "
                     "--videos=DIR --out=DIR/manifest.jsonl`.")
    if d.source == "records":
        _require(bool(d.records) and bool(glob.glob(d.records)),
                 f"{where}.records={d.records!r} matches no ArrayRecord clip shard.")
    if d.source == "tfds":
        _require(bool(d.tfds_name), f"{where}.source='tfds' needs {where}.tfds_name.")
    if d.source not in ("folder", "records", "tfds"):
        return
    _require(d.fps >= 0, f"{where}.fps={d.fps} must be >= 0 (0 keeps each video's own rate).")
    _require(d.clip_frames >= 1, f"{where}.clip_frames={d.clip_frames} must be >= 1.")
    _require(0 < d.max_sample_tokens <= config.data.seq_len,
             f"{where}.max_sample_tokens={d.max_sample_tokens} must be in [1, config.data.seq_len="
             f"{config.data.seq_len}]: a sample must fit one packed row.")
    _require(d.max_pixels > 0 and d.max_frames > 0, f"{where}.max_pixels and max_frames must be > 0.")


def _check_latent_cache(config) -> None:
    """The cache must exist and have been written by the autoencoder this config decodes with."""
    import json
    import os
    manifest = os.path.join(config.data.latent_dir or "", "manifest.json")
    _require(bool(config.data.latent_dir) and os.path.exists(manifest),
             f"config.data.source='latents' but config.data.latent_dir={config.data.latent_dir!r} has no "
             "manifest.json; run `python -m sora_jax.encode --out=DIR` first and pass that DIR.")
    with open(manifest) as f:
        written_by = json.load(f).get("autoencoder")
    _require(written_by == json.loads(json.dumps(config.autoencoder.to_dict())),  # JSON has lists, not tuples
             f"{config.data.latent_dir} was encoded with autoencoder {written_by}, but config.autoencoder is "
             f"{config.autoencoder.to_dict()}; latents of another autoencoder would train a DiT that decodes "
             "garbage. Point config.autoencoder at the same checkpoint, or re-encode.")
    from data_pipelines.latents import cached_text_features
    try:
        cached_text_features(config)  # caption features of another encoder are refused here, not mid-run
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate_dit_for_mesh(config, mesh_shape: dict) -> None:
    """The DiT's batch rows must split over data x fsdp."""
    split = mesh_shape["data"] * mesh_shape["fsdp"]
    _require(config.data.global_batch_rows % split == 0,
             f"config.data.global_batch_rows={config.data.global_batch_rows} is not divisible by the "
             f"mesh's data x fsdp = {split} devices; use a multiple of {split} or change config.mesh.")


# --- the command line ------------------------------------------------------------------------------------

def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a `--config.X=V` override that names no config field reported in one line.

    ml_collections reports `--config.optim.learning_rate=1` as three chained tracebacks ending in
    `AttributeError: 'learning_rate'`; this prints which override is wrong, the fields that exist where it
    points, and the closest name, then exits with status 1 before anything runs or is written.
    Other flag errors keep absl's own one-line report. Use as `app.run(main, flags_parser=parse_flags)`.
    """
    from absl import app
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        raise SystemExit(f"error: {_unknown_override(argv, e)}") from None


def _unknown_override(argv: list[str], error: Exception) -> str:
    """The message for an override of a field the config lacks (`error` is ml_collections' own)."""
    import difflib

    from absl import flags
    for arg in argv[1:]:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        flag, _, path = name.partition(".")
        if not path or flag not in flags.FLAGS:
            continue
        config = _config_of(flag, argv)
        if config is None:
            break
        node, where = config, flag
        for part in path.split("."):
            if not isinstance(node, (ml_collections.ConfigDict, dict)):
                return f"--{name}: {where} is a {type(node).__name__}, not a group of fields; drop '.{part}'."
            if part not in node:
                fields = sorted(node.keys())
                close = difflib.get_close_matches(part, fields, n=1)
                hint = f" Did you mean --{where}.{close[0]}?" if close else ""
                return f"--{name}: {where} has no field {part!r}.{hint} Its fields are {', '.join(fields)}."
            node, where = node[part], f"{where}.{part}"
    detail = str(error.args[0] if error.args else error).splitlines()[0]
    return f"a --config.X override names a field the config does not have ({detail}); check its spelling."


def _config_of(flag_name: str, argv: list[str]):
    """The config a config flag holds or would load (its --flag=FILE[:ARG]); None if it cannot be had."""
    from absl import flags
    flag = flags.FLAGS[flag_name]
    if flag.value is not None:  # DEFINE_config_dict: set when defined
        return flag.value
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag_name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{flag_name}" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        try:
            return flag.parser.parse(value)
        except Exception:  # noqa: BLE001 -- only a better message is at stake; the caller has a plain one
            return None
    return None


def check_guidance_interval(value, name: str) -> tuple[float, float]:
    """(lo, hi) of a guidance interval, checked: two numbers with 0 <= lo <= hi <= 1. `name` says where it came from.

    Raises:
      ConfigError: naming the value and the fix.
    """
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: give two numbers lo,hi with 0 <= lo <= hi <= 1, e.g. 0.5,1.") from None
    _require(0.0 <= lo <= hi <= 1.0, f"{name}=({lo}, {hi}) must satisfy 0 <= lo <= hi <= 1 (e.g. 0.5,1; 0,1: "
             "guidance at every step).")
    return lo, hi
