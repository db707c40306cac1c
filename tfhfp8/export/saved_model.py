"""A tfhfp8 model as a TensorFlow SavedModel that serves without tfhfp8.

Keras' own export (`model.export(format="tf_saved_model")`) traces the model with
the quantizer's TensorFlow-ops backend (`tfhfp8.ops.forced_backend("tf")`): the
graph holds standard TensorFlow ops only, which compute the same bits as tfhfp8's
C++ kernels, so a process with plain TensorFlow loads and runs it.
"""

from tensorflow.core.protobuf import saved_model_pb2

from tfhfp8 import ops

_CUSTOM_OP_PREFIX = "Hfp8"  # the ops of tfhfp8's C++ library (custom_ops/)


def to_saved_model(model, directory):
    """Writes `model` (inference) as a SavedModel into the new `directory`."""
    with ops.forced_backend("tf"):
        model.export(directory, format="tf_saved_model", verbose=False)
    custom = custom_ops(directory)
    if custom:
        raise RuntimeError(f"the SavedModel still calls tfhfp8's C++ ops {sorted(custom)}: "
                           "a layer computes outside tfhfp8.quantize (please report it)")


def custom_ops(directory):
    """The names of tfhfp8 C++ ops that the SavedModel in `directory` calls."""
    saved = saved_model_pb2.SavedModel()
    with open(f"{directory}/saved_model.pb", "rb") as file:
        saved.ParseFromString(file.read())
    names = set()
    for meta in saved.meta_graphs:
        nodes = list(meta.graph_def.node)
        for function in meta.graph_def.library.function:
            nodes.extend(function.node_def)
        names.update(node.op for node in nodes if node.op.startswith(_CUSTOM_OP_PREFIX))
    return names
