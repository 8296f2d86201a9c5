import numpy as np

from configs import tiny
from data_pipelines import pipeline, procedural
from sora_jax import patching
from sora_jax.evaluation.color import detect_color
from sora_jax.models.text import build_tokenizer
from sora_jax.video_io import to_uint8
from tests.conftest import smoke_config


def test_world_is_index_deterministic_and_varied():
    world = procedural.ProceduralWorld(seed=3, sides=range(16, 65, 8), frames=range(1, 17))
    a, b = world[12345], world[12345]
    np.testing.assert_array_equal(a["video"], b["video"])
    assert a["caption"] == b["caption"] and a["params"] == b["params"]
    shapes = {world[i]["video"].shape for i in range(60)}
    assert len({s[0] for s in shapes}) > 5 and len({s[1:3] for s in shapes}) > 10
    assert any(s[0] == 1 for s in shapes)  # images are 1-frame videos


def test_held_out_prompts_never_appear_in_training():
    world = procedural.ProceduralWorld(seed=0, sides=[16], frames=[4])
    held = set(procedural.HELD_OUT_PROMPTS)
    assert len(held) == 14 and not any(world.params(i).caption in held for i in range(3000))
    heldout = procedural.ProceduralWorld(seed=0, sides=[16], frames=[4], split="heldout")
    assert all(heldout.params(i).caption in held for i in range(50))


def test_color_detector_reads_ground_truth():
    world = procedural.ProceduralWorld(seed=1, sides=range(16, 65, 8), frames=range(1, 17))
    hits = [detect_color(to_uint8(world[i]["video"])) == world[i]["params"].color for i in range(200)]
    assert np.mean(hits) >= 0.97


def test_padding_fraction_at_default_sequence_length():
    config = tiny.get_config()
    it = iter(pipeline.packed_dataset(config))
    fractions = [pipeline.padding_fraction(next(it)) for _ in range(60)]
    assert np.mean(fractions) <= 0.02, np.mean(fractions)


def test_packed_rows_hold_whole_samples_with_aligned_segments():
    config = smoke_config()
    world = pipeline.build_source(config.data, "train")
    tokenizer = build_tokenizer(config.text)
    batch = next(iter(pipeline.packed_dataset(config)))
    for r in range(batch["video"].shape[0]):
        for slot, (nt, nh, nw, n, index) in enumerate(batch["info"][r]):
            if n == 0:
                assert not np.any(batch["video_segment_ids"][r] == slot + 1)
                continue
            sel = batch["video_segment_ids"][r] == slot + 1
            assert sel.sum() == n == nt * nh * nw
            expected = patching.patchify(world[int(index)]["video"], tuple(config.model.patch))
            np.testing.assert_array_equal(batch["video"][r][sel], expected)
            np.testing.assert_array_equal(batch["video_pos"][r][sel], patching.positions((nt, nh, nw)))
            text = batch["text"][r][batch["text_segment_ids"][r] == slot + 1]
            np.testing.assert_array_equal(text, tokenizer.encode(world[int(index)]["caption"], config.text.max_len))


def test_iterator_state_restores_data_order():
    config = smoke_config()
    it = iter(pipeline.packed_dataset(config))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["info"] for _ in range(3)]
    fresh = iter(pipeline.packed_dataset(config))
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["info"], want)
