"""`tf.distribute` helpers: every replica's value, gathered or reduced.

Used by the per-layer loss scaling (replicas agree on one scale) and the emulated
gradient all-reduce (every replica computes the same sum from all the gradients).
"""

import tensorflow as tf


def _all_replicas_local(context):
    """True when every replica of the strategy runs in this process."""
    try:  # MirroredStrategy: every device; MultiWorkerMirroredStrategy: this worker's
        devices = context.strategy.extended.worker_devices
    except (AttributeError, NotImplementedError):  # other strategies: assume not
        return False
    return len(devices) == context.num_replicas_in_sync


def gather_replicas(value):
    """`value` of every replica, stacked along a new first axis in replica order.

    Identical on every replica. With every replica on this machine, a `merge_call` on
    the replicas' values (no collective op, see `reduce_over_replicas`); across
    workers, `ReplicaContext.all_gather`. Outside a strategy (or with one replica):
    `value[None]`.
    """
    value = tf.convert_to_tensor(value)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value[None]
    if _all_replicas_local(context):
        def merge(strategy, per_replica):
            return tf.stack([tf.identity(v)
                             for v in strategy.experimental_local_results(per_replica)])
        return context.merge_call(merge, args=(value,))
    gathered = context.all_gather(value[None], axis=0)
    return tf.ensure_shape(gathered, [context.num_replicas_in_sync, *value.shape])


def reduce_over_replicas(value, reduce):
    """`reduce` (tf.reduce_min/max) of the scalar `value` over the replicas.

    On one machine, computed in a `merge_call` from the replicas' values, with no
    collective op: the collective instance keys of `tf.distribute` restart with every
    strategy while TF's collective executor keeps what each key was first used for, so
    an `all_gather` under a second strategy in the same process collided with the first
    strategy's gradient all-reduce ("Collective ops is aborted ... expected type 0 and
    data_type 1 but got type 2 and data_type 3"). A merge call has no key: the same
    answer whatever ran before. Across workers (`MultiWorkerMirroredStrategy`, one
    strategy per process) a merge call sees only this worker's replicas: there the
    values come from `ReplicaContext.all_gather` (`gather_replicas`).
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return reduce(gather_replicas(value), axis=0)
