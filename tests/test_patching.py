import numpy as np
import pytest

from sora_jax import patching


@pytest.mark.parametrize("shape,patch", [((1, 16, 24, 3), (1, 8, 8)), ((6, 8, 40, 4), (2, 4, 8)),
                                         ((5, 32, 16, 16), (1, 2, 2)), ((4, 12, 12, 3), (4, 6, 3))])
def test_unpatchify_inverts_patchify(shape, patch):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    tokens = patching.patchify(x, patch)
    grid = patching.check_divisible(shape, patch)
    assert tokens.shape == (np.prod(grid), np.prod(patch) * shape[-1])
    np.testing.assert_array_equal(patching.unpatchify(tokens, grid, patch, shape[-1]), x)


def test_positions_follow_token_order():
    x = np.arange(2 * 16 * 24 * 1, dtype=np.float32).reshape(2, 16, 24, 1)
    tokens = patching.patchify(x, (1, 8, 8))
    pos = patching.positions((2, 2, 3))
    for (t, h, w), tok in zip(pos, tokens):
        np.testing.assert_array_equal(tok, x[t, h * 8:(h + 1) * 8, w * 8:(w + 1) * 8].ravel())


def test_indivisible_size_names_the_dimension():
    with pytest.raises(ValueError, match="width 20 is not divisible by the patch size 8"):
        patching.patchify(np.zeros((1, 16, 20, 3)), (1, 8, 8))
