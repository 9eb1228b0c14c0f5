"""Training pairs as TensorFlow input: deterministic pair samplers and the ``tf.data`` pipeline.

A *sampler* maps a step number to one global batch ``{"fixed", "moving"}`` (arrays
``[B, *spatial, C]``, 2-D or 3-D), deterministically from ``(seed, step)``, so a resumed run
continues the exact data stream:

* :func:`same_group_pair_sampler` draws random pairs of distinct images that share a group (a
  digit class, the frames of one MRI slice);
* :func:`pair_list_sampler` draws from a pair plan of :mod:`dirnet_tf.pair_plans`
  (:func:`~dirnet_tf.pair_plans.pair_candidates`);
* :func:`random_pair_sampler` draws any two different images (``--pairs=random``).

:func:`make_input_iterator` turns any sampler into a ``tf.data`` pipeline split across the
replicas of a ``tf.distribute`` strategy; :func:`validation_batches` batches fixed validation
pairs in order.  Which pairs a collection allows (modes, splits, pair lists) is decided in
:mod:`dirnet_tf.pair_plans`.
"""

import numpy as np
import tensorflow as tf

from dirnet_tf.pair_plans import PairingError, pair_index_array, require_two_images

__all__ = [
    "same_group_pair_sampler", "pair_list_sampler", "random_pair_sampler", "make_input_iterator",
    "validation_batches",
]


def same_group_pair_sampler(images, groups, batch_size, seed=0):
    """Sampler of random (fixed, moving) pairs of distinct images with the same group.

    The fixed image is uniform over all images whose group has at least two
    members; the moving image is uniform over the *other* members of its group.
    Batch ``step`` depends only on ``(seed, step)``.

    Parameters
    ----------
    images : array ``[N, *spatial, C]``
        All candidate images (kept as one constant tensor).
    groups : array of int ``[N]``
        Group of each image (e.g. digit label, or slice id for time frames).
    batch_size : int
        Pairs per batch (the global batch).
    seed : int
        Stream seed.

    Returns
    -------
    callable
        ``sample(step) -> {"fixed": [B, *spatial, C], "moving": [B, *spatial, C]}``
        usable inside ``tf.data`` (``step`` an int64 scalar tensor).
    """
    images = np.asarray(images, dtype=np.float32)
    groups = np.asarray(groups).reshape(-1)
    if images.shape[0] != groups.shape[0]:
        raise ValueError(f"images {images.shape} and groups {groups.shape} differ in length")
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    uniq, start, count = np.unique(sorted_groups, return_index=True, return_counts=True)
    group_of_pos = np.searchsorted(uniq, sorted_groups)
    eligible = np.flatnonzero(count[group_of_pos] >= 2)
    if eligible.size == 0:
        raise ValueError(f"no group has two images to pair (groups {uniq.tolist()}, sizes {count.tolist()})")
    images_t = tf.constant(images[order])
    eligible_t = tf.constant(eligible, tf.int64)
    group_t = tf.constant(group_of_pos, tf.int64)
    start_t = tf.constant(start, tf.int64)
    count_t = tf.constant(count, tf.int64)
    seed = int(seed)
    batch_size = int(batch_size)

    def sample(step):
        key = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
        keys = tf.random.experimental.stateless_split(key, 2)
        pick = tf.random.stateless_uniform([batch_size], keys[0], minval=0,
                                           maxval=tf.size(eligible_t, out_type=tf.int64), dtype=tf.int64)
        fixed_pos = tf.gather(eligible_t, pick)
        g = tf.gather(group_t, fixed_pos)
        n = tf.gather(count_t, g)
        s = tf.gather(start_t, g)
        u = tf.random.stateless_uniform([batch_size], keys[1], dtype=tf.float64)
        other = tf.minimum(tf.cast(u * tf.cast(n - 1, tf.float64), tf.int64), n - 2)
        moving_pos = s + (fixed_pos - s + 1 + other) % n
        return {"fixed": tf.gather(images_t, fixed_pos), "moving": tf.gather(images_t, moving_pos)}

    return sample


def make_input_iterator(sampler, global_batch_size, start_step=0, strategy=None, prefetch=2):
    """Iterator over training batches ``start_step, start_step + 1, ...``.

    Parameters
    ----------
    sampler : callable
        ``sample(step) -> dict`` of global-batch tensors (deterministic in ``step``).
    global_batch_size : int
        Leading size of the sampler's tensors.
    start_step : int
        First step (a resumed run passes its restored step count).
    strategy : tf.distribute.Strategy or None
        With several replicas, every replica gets its consecutive slice of the
        same global batch, so the union over replicas equals the single-device
        batch.
    prefetch : int
        Batches prepared ahead.

    Returns
    -------
    iterator
        Of dicts (or per-replica values of dicts under a multi-replica strategy).
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ValueError(
            f"--batch_size={global_batch_size} is not divisible by the {replicas} replicas of the strategy"
        )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True

    def steps():
        return tf.data.Dataset.range(int(start_step), 2**62)

    if replicas == 1 and not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        ds = steps().map(sampler, num_parallel_calls=2).prefetch(prefetch).with_options(options)
        return iter(strategy.experimental_distribute_dataset(ds))

    def dataset_fn(ctx):
        per_replica = ctx.get_per_replica_batch_size(global_batch_size)
        local = per_replica * (ctx.num_replicas_in_sync // ctx.num_input_pipelines)
        first = ctx.input_pipeline_id * local

        def local_slice(batch):
            return {k: v[first:first + local] for k, v in batch.items()}

        ds = steps().map(sampler, num_parallel_calls=2).map(local_slice)
        ds = ds.unbatch().batch(per_replica, drop_remainder=True)
        return ds.prefetch(prefetch).with_options(options)

    return iter(strategy.distribute_datasets_from_function(dataset_fn))


def validation_batches(fixed, moving, batch_size=256):
    """A ``tf.data.Dataset`` of fixed validation pairs (in order, batched).

    Parameters
    ----------
    fixed, moving : arrays ``[N, *spatial, C]``.
    batch_size : int
    """
    return tf.data.Dataset.from_tensor_slices(
        {"fixed": np.asarray(fixed, np.float32), "moving": np.asarray(moving, np.float32)}
    ).batch(batch_size)


def _as_batch_size(batch_size):
    if int(batch_size) != batch_size or batch_size < 1:
        raise PairingError(f"--batch_size={batch_size}: give a whole number >= 1")
    return int(batch_size)


def pair_list_sampler(images, pairs, batch_size, seed=0):
    """Sampler drawing (fixed, moving) pairs uniformly (with replacement) from a pair list.

    Batch ``step`` depends only on ``(seed, step)`` (``tf.random.stateless_uniform``),
    like :func:`same_group_pair_sampler`.  Only the images named by ``pairs``
    are kept in the sampler's constant tensor.

    Parameters
    ----------
    images : array ``[N, *spatial, C]``
        The whole collection, 2-D ``[N, H, W, C]`` or 3-D ``[N, D, H, W, C]``.
    pairs : array ``[P, 2]`` of int
        (fixed, moving) indices into ``images`` (:func:`dirnet_tf.pair_plans.pair_candidates`).
        A repeated row is drawn proportionally more often.
    batch_size : int
        Pairs per batch (the global batch).
    seed : int
        Stream seed.

    Returns
    -------
    callable
        ``sample(step) -> {"fixed": [B, *spatial, C], "moving": [B, *spatial, C]}``
        usable inside ``tf.data``.
    """
    images = np.asarray(images, dtype=np.float32)
    pairs = pair_index_array(pairs, images.shape[0])
    if pairs.shape[0] == 0:
        raise PairingError("the pair list is empty; nothing to sample")
    batch_size = _as_batch_size(batch_size)
    used, inverse = np.unique(pairs, return_inverse=True)
    local = np.asarray(inverse).reshape(-1).reshape(pairs.shape)
    images_t = tf.constant(images[used])
    fixed_t = tf.constant(local[:, 0], tf.int64)
    moving_t = tf.constant(local[:, 1], tf.int64)
    n_pairs = int(pairs.shape[0])
    seed = int(seed)

    def sample(step):
        key = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
        pick = tf.random.stateless_uniform([batch_size], key, minval=0, maxval=n_pairs, dtype=tf.int64)
        return {"fixed": tf.gather(images_t, tf.gather(fixed_t, pick)),
                "moving": tf.gather(images_t, tf.gather(moving_t, pick))}

    return sample


def random_pair_sampler(images, batch_size, seed=0):
    """Sampler of uniformly random ordered pairs of two different images (``--pairs=random``).

    The fixed image is uniform over the ``N`` images, the moving image uniform
    over the other ``N - 1``; batch ``step`` depends only on ``(seed, step)``.
    Pass one split's images (``images[split["train"]]``) to pair inside it.

    Parameters
    ----------
    images : array ``[N, *spatial, C]``
        2-D ``[N, H, W, C]`` or 3-D ``[N, D, H, W, C]``, ``N >= 2``.
    batch_size : int
    seed : int

    Returns
    -------
    callable
        ``sample(step) -> {"fixed", "moving"}`` usable inside ``tf.data``.
    """
    images = np.asarray(images, dtype=np.float32)
    n = int(images.shape[0])
    require_two_images(np.arange(n), None, "random")
    batch_size = _as_batch_size(batch_size)
    images_t = tf.constant(images)
    seed = int(seed)

    def sample(step):
        key = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
        keys = tf.random.experimental.stateless_split(key, 2)
        fixed = tf.random.stateless_uniform([batch_size], keys[0], minval=0, maxval=n, dtype=tf.int64)
        offset = tf.random.stateless_uniform([batch_size], keys[1], minval=0, maxval=n - 1, dtype=tf.int64)
        moving = (fixed + 1 + offset) % n
        return {"fixed": tf.gather(images_t, fixed), "moving": tf.gather(images_t, moving)}

    return sample
