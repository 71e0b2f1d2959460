"""Patch order, kept counts and the shuffle/restore permutations with absent planes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from whmae.model.config import MAEConfig, kept_count
from whmae.model.masking import gather_tokens, kept_counts, restore_order, shuffle_ids
from whmae.model.patches import patchify, unpatchify

PATCH = (2, 3, 4)


@pytest.fixture(scope="module")
def stack():
    """[B=2, S=3, T=4, H=6, W=8] with distinct values."""
    return jax.random.normal(jax.random.key(0), (2, 3, 4, 6, 8))


def test_patchify_round_trip(stack):
    patches = patchify(stack, PATCH)
    assert patches.shape == (2, 3 * 2 * 2 * 2, 24)
    np.testing.assert_array_equal(unpatchify(patches, (3, 2, 2, 2), PATCH), stack)


def test_patch_order_is_conv3d_weight_flattening(stack):
    """patchify(x) @ W.reshape(D, P).T equals a Conv3d (kernel = stride = patch) per plane."""
    d = 5
    weight = jax.random.normal(
        jax.random.key(1), (d, 1, *PATCH)
    )  # torch layout (out, in, pt, ph, pw)
    b, s = stack.shape[:2]
    conv = jax.lax.conv_general_dilated(
        stack.reshape(b * s, 1, *stack.shape[2:]),
        weight,
        window_strides=PATCH,
        padding="VALID",
        dimension_numbers=("NCDHW", "OIDHW", "NCDHW"),
        precision="highest",
    )  # [B*S, D, t, h, w]
    # The reference flattens (t, h, w), moves D last, then folds planes into tokens.
    conv_tokens = conv.reshape(b * s, d, -1).transpose(0, 2, 1).reshape(b, -1, d)
    ours = jnp.matmul(patchify(stack, PATCH), weight.reshape(d, -1).T, precision="highest")
    np.testing.assert_allclose(ours, conv_tokens, rtol=1e-5, atol=1e-5)
    # And one token by hand: plane 2, t 1, h 0, w 1 is token ((2 * 2 + 1) * 2 + 0) * 2 + 1.
    manual = stack[1, 2, 2:4, 0:3, 4:8].reshape(-1)
    np.testing.assert_array_equal(patchify(stack, PATCH)[1, 21], manual)


@pytest.mark.parametrize("ratio", [0.7, 0.75, 0.9, 0.3, 0.0])
def test_kept_counts_round_like_python(ratio):
    tokens_per_plane = 512
    counts = kept_counts(jnp.arange(10), tokens_per_plane, 9, ratio)
    expected = [int(a * tokens_per_plane * (1 - ratio)) for a in range(10)]
    np.testing.assert_array_equal(counts, expected)


def test_reference_kept_count():
    config = MAEConfig()
    assert config.num_tokens == 4608 and config.num_kept == 1382 == kept_count(4608, 0.7)
    assert int(kept_counts(jnp.array([9]), 512, 9, 0.7)[0]) == config.num_kept


def test_shuffle_is_a_permutation_that_restore_inverts():
    available = jnp.ones((3, 40), bool)
    ids = shuffle_ids(available, jax.random.key(2))
    np.testing.assert_array_equal(jnp.sort(ids, axis=1), jnp.broadcast_to(jnp.arange(40), (3, 40)))
    assert not np.array_equal(ids[0], ids[1])  # each exam draws its own order
    x = jax.random.normal(jax.random.key(3), (3, 40, 2))
    np.testing.assert_array_equal(restore_order(gather_tokens(x, ids), ids), x)


def test_absent_tokens_sort_last():
    plane_available = jnp.array([[True, False, True, False], [False, True, True, True]])
    available = jnp.repeat(plane_available, 10, axis=1)
    ids = shuffle_ids(available, jax.random.key(4))
    for b, n_avail in enumerate((20, 30)):
        front = np.asarray(ids[b, :n_avail])
        assert np.asarray(available[b])[front].all()
        assert not np.asarray(available[b])[np.asarray(ids[b, n_avail:])].any()


def test_given_order_moves_absent_tokens_last_keeping_the_rest():
    available = jnp.array([[True, False, True, True, False, True]])
    given = jnp.array([[4, 0, 1, 5, 3, 2]])
    ids = shuffle_ids(available, ids_shuffle=given)
    np.testing.assert_array_equal(ids, [[0, 5, 3, 2, 4, 1]])
    # All present: the given order is used unchanged.
    ids = shuffle_ids(jnp.ones((1, 6), bool), ids_shuffle=given)
    np.testing.assert_array_equal(ids, given)


def test_no_key_means_identity_order():
    ids = shuffle_ids(jnp.ones((2, 7), bool))
    np.testing.assert_array_equal(ids, jnp.broadcast_to(jnp.arange(7), (2, 7)))


def test_drop_planes_removes_one_to_max_present_planes_and_keeps_one():
    from whmae.model.masking import drop_planes

    mask = np.ones((4000, 9), bool)
    mask[:1000, 2:] = False  # 2 planes present: at most 1 may go
    mask[1000:1500, 1:] = False  # 1 plane present: never dropped
    out = np.asarray(drop_planes(jax.random.key(0), jnp.asarray(mask), 0.5, 2))
    assert not (out & ~mask).any()  # only present planes are removed
    removed = mask.sum(1) - out.sum(1)
    assert out.sum(1).min() >= 1
    assert set(removed[:1000]) == {0, 1} and set(removed[1000:1500]) == {0}
    full = removed[1500:]
    assert set(full) == {0, 1, 2}
    # Half the exams keep every plane; the others lose 1 or 2 equally often.
    assert abs(np.mean(full == 0) - 0.5) < 0.05 and abs(np.mean(full == 1) - 0.25) < 0.05
    # Which planes go is uniform over the present ones (no plane is favoured).
    per_plane = (mask[1500:] & ~out[1500:]).mean(0)
    assert per_plane.max() - per_plane.min() < 0.05
    # Rate 0 is the identity; a different key drops different planes.
    assert (np.asarray(drop_planes(jax.random.key(0), jnp.asarray(mask), 0.0, 2)) == mask).all()
    assert (np.asarray(drop_planes(jax.random.key(1), jnp.asarray(mask), 0.5, 2)) != out).any()
