"""The graph of a model as PTQ sees it: its BatchNormalization layers, their depths,
and the part of the model that runs them."""

import keras

from tfhfp8 import _compat
from tfhfp8.layers import walk

BN = keras.layers.BatchNormalization


def has_batchnorm(model):
    return any(isinstance(layer, BN) for layer in _flat_layers(model))


def is_model(layer):
    return isinstance(layer, keras.Model)


def _flat_layers(model):
    """Every layer, nested models (of any kind) flattened."""
    return walk(model, any_model=True)


def _analyse(model, input_depth, depths):
    """BatchNorm depths of `model` (in place into `depths`); returns its output depth.

    The depth of a tensor is the largest number of BatchNormalization layers on a path
    from the model inputs to it; a BatchNormalization layer's depth is that of its input.
    A layer's input therefore depends only on BatchNorm layers of smaller depth: all
    layers of one depth can be re-calibrated in one pass. Nested Functional and
    Sequential models are analysed recursively; a nested subclassed model is taken as a
    chain of its BatchNorm layers in tracking order.
    """
    graph = _compat.functional_graph(model)
    if graph is None:
        depth = input_depth
        for layer in _flat_layers(model):
            if isinstance(layer, BN):
                depths[id(layer)] = (layer, max(depths.get(id(layer), (None, -1))[1], depth))
                depth += 1
        return depth
    tensor_depth = {id(t): input_depth for t in graph.inputs}
    for node in _compat.graph_nodes(graph):
        if node.is_input or node.operation is None:
            continue
        operation = node.operation
        depth = max((tensor_depth.get(id(t), input_depth) for t in node.input_tensors),
                    default=input_depth)
        if isinstance(operation, BN):
            previous = depths.get(id(operation), (None, -1))[1]
            depths[id(operation)] = (operation, max(previous, depth))
            out = depth + 1
        elif is_model(operation):
            out = _analyse(operation, depth, depths)
        else:
            out = depth
        for t in node.output_tensors:
            tensor_depth[id(t)] = out
    return max((tensor_depth.get(id(t), input_depth) for t in graph.outputs),
               default=input_depth)


def contained_batchnorms(layer):
    if isinstance(layer, BN):
        return [layer]
    if is_model(layer):
        return [sub for sub in _flat_layers(layer) if isinstance(sub, BN)]
    return []


def batchnorm_layers(model):
    """[(layer, depth)] of every BatchNormalization layer the model runs."""
    depths = {}
    _analyse(model, 0, depths)
    return sorted(depths.values(), key=lambda item: item[1])


def pruned_model(model, layers):
    """A model from the inputs to the outputs of the top-level nodes that run `layers`.

    Calling it runs every layer of `layers` (inside nested models too) and skips what
    comes after. Falls back to the whole model when it has no Functional graph.
    """
    graph = _compat.functional_graph(model)
    if graph is None:
        return model
    wanted = {id(layer) for layer in layers}
    outputs = []
    for node in _compat.graph_nodes(graph):
        if node.is_input or node.operation is None:
            continue
        if any(id(bn) in wanted for bn in contained_batchnorms(node.operation)):
            outputs.extend(node.output_tensors)
    if not outputs:
        return model
    return keras.Model(inputs=_compat.graph_inputs(graph), outputs=outputs)
