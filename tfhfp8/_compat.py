"""Every use of a private Keras or TensorFlow API, in one place.

A Keras or TensorFlow upgrade that changes one of these breaks this file and nothing
else. Each function says which public API is missing.
"""

import tensorflow as tf


def in_xla_context():
    """True inside a function being compiled by XLA (`jit_compile=True`).

    No public API tells whether the current graph is being XLA-compiled.
    """
    from tensorflow.python.framework import ops as framework_ops
    from tensorflow.python.ops import control_flow_util

    if tf.executing_eagerly():
        return False
    graph = framework_ops.get_default_graph()
    return control_flow_util.GraphOrParentsInXlaContext(graph)


def record_forward_gradient(op_type, outputs, inputs, backward_function):
    """Tells active `tf.autodiff.ForwardAccumulator`s how `outputs` depend on `inputs`.

    `tf.custom_gradient` feeds forward-mode differentiation in eager mode, but inside a
    function being traced an accumulator takes the tangents of the ops that compute the
    outputs instead (zero for non-differentiable ops) and ignores the custom gradient.
    The accumulator transposes `backward_function` (output gradients -> input
    gradients) into the JVP; tapes (`tf.GradientTape`) are not affected. No public API
    records an operation for forward accumulators only.
    """
    from tensorflow.python.eager import record

    record.record_operation_forwardprop_only(op_type, outputs, inputs, backward_function,
                                             None)
