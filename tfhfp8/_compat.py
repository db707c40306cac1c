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
