"""Every use of a private Keras or TensorFlow API, in one place.

A Keras or TensorFlow upgrade that changes one of these breaks this file and nothing
else. Each function says which public API is missing.
"""

import contextlib
import threading
import types

import keras
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


class AfterBuild:
    """Mixin: calls `self.after_build()` once the layer is built, before Keras locks
    its state (after which no variable can be added).

    Keras has no public hook between `build` and the lock: `Layer._post_build` is it.
    Overriding `build` instead would change the signature Keras records for
    `get_build_config`.
    """

    def _post_build(self):
        super()._post_build()
        self.after_build()

    def after_build(self):
        pass


# -- keras.layers.MultiHeadAttention ---------------------------------------------------
_projection_lock = threading.RLock()


@contextlib.contextmanager
def attention_projection_class(factory):
    """Within the block, `keras.layers.MultiHeadAttention.build` creates its
    query/key/value/output projections with `factory` instead of
    `keras.layers.EinsumDense`.

    No public argument chooses the projections' class: Keras' `build` calls the
    `EinsumDense` name of its own module. The name is restored on exit, exception or
    not; the lock keeps two threads building attention layers from mixing classes.
    """
    from keras.src.layers.attention import multi_head_attention as module

    with _projection_lock:
        original = module.EinsumDense
        module.EinsumDense = factory
        try:
            yield
        finally:
            module.EinsumDense = original


class AttentionHooks:
    """Mixin for a `keras.layers.MultiHeadAttention` subclass that computes the
    attention itself, in a method `compute_attention(query, key, value,
    attention_mask, training)`.

    Keras' `call` hands the projected tensors to `_compute_attention`, the extension
    point its docstring offers subclasses under a private name; the einsum equations,
    the scale, the masked softmax, the causal mask and the dropout it uses are private
    attributes, read here by `attention_spec()`.
    """

    def _compute_attention(self, query, key, value, attention_mask=None, training=None,
                           return_attention_scores=False, use_causal_mask=False):
        # Keras' `call` folds the causal mask into attention_mask for a subclass, but a
        # direct call (Keras >= 3.15 takes use_causal_mask) may give both: apply both.
        if use_causal_mask:
            causal = self._compute_causal_mask(query, value)
            attention_mask = causal if attention_mask is None else keras.ops.logical_and(
                keras.ops.cast(attention_mask, "bool"), causal)
        return self.compute_attention(query, key, value, attention_mask, training)

    def attention_spec(self):
        """The pieces of Keras' attention: equations, scale, softmax and dropout."""
        rate = self._dropout
        return types.SimpleNamespace(
            scores_equation=self._dot_product_equation,
            combine_equation=self._combine_equation,
            scale=self._inverse_sqrt_key_dim,
            masked_softmax=self._masked_softmax,
            dropout=(lambda x, training: self._dropout_layer(x, training=training))
            if rate > 0 else (lambda x, training: x))


# -- layers and models -----------------------------------------------------------------
def is_graph_model(model):
    """True for a Sequential or Functional model (a graph of layers we can rebuild).

    Keras exports no name for the class of functional models
    (`keras.src.models.functional.Functional`); `keras.Model(inputs, outputs)` returns
    one, while a subclassed `keras.Model` is not one.
    """
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


def sublayers(layer):
    """Every layer inside `layer`, recursively (not `layer` itself).

    `model.layers` lists only a model's direct layers; layers that own layers (e.g.
    MultiHeadAttention's projections) have no public list of them.
    """
    return list(layer._flatten_layers(include_self=False))


def name_dtype_policy(policy, name):
    """Gives a `keras.DTypePolicy` (subclass) `policy` the name `name`.

    `keras.DTypePolicy` parses its name into its dtypes; a float32 policy with another
    name (a tfhfp8 preset) has no public constructor.
    """
    policy._name = name


def keras_home():
    """The folder Keras downloads into: `$KERAS_HOME` or `~/.keras`, as Keras computes it
    (no public function returns it); None if this Keras has none."""
    try:
        from keras.src.backend import config
    except ImportError:  # pragma: no cover - other Keras versions
        return None
    return getattr(config, "keras_home", lambda: None)()


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


# -- keras_hub.layers.TransformerEncoder ------------------------------------------------
def transformer_encoder_parts(block):
    """The sublayers of a KerasHub `TransformerEncoder` `block`: `attention` (a
    `keras.layers.MultiHeadAttention`), `attention_norm`, `intermediate`, `output` (the
    feed-forward Dense layers) and `output_norm`.

    KerasHub exposes them under no public name (only as `_self_attention_layer`,
    `_self_attention_layer_norm`, `_feedforward_intermediate_dense`,
    `_feedforward_output_dense`, `_feedforward_layer_norm`).
    """
    return {"attention": block._self_attention_layer,
            "attention_norm": block._self_attention_layer_norm,
            "intermediate": block._feedforward_intermediate_dense,
            "output": block._feedforward_output_dense,
            "output_norm": block._feedforward_layer_norm}


# -- the graph of a Functional model -----------------------------------------------------
def functional_graph(model):
    """The Functional graph `model` runs, or None (subclassed, or an unbuilt Sequential).

    A Functional model is its own graph; a built Sequential model keeps one in
    `Sequential._functional`, with no public accessor.
    """
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if isinstance(model, Functional) else None


def graph_nodes(graph):
    """The nodes of a Functional graph in topological order (inputs first).

    No public API lists them: `Functional._nodes_by_depth`. Each node has the public
    attributes `operation`, `is_input`, `input_tensors` and `output_tensors`.
    """
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        yield from graph._nodes_by_depth[depth]


def graph_inputs(graph):
    """The inputs of a Functional graph in the structure it was built with (a tensor, a
    list or a dict): `Functional._inputs_struct` (`graph.inputs` is flattened)."""
    return graph._inputs_struct


def producer(tensor):
    """The layer whose call produced the symbolic `tensor`, or None.

    `KerasTensor._keras_history`; no public API goes from a tensor to its layer.
    """
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def gradients_may_be_recorded():
    """True when a `tf.GradientTape` (or forward accumulator) is recording, so that
    the ops created now may be differentiated. No public API tells."""
    from tensorflow.python.eager import record

    return record.could_possibly_record()


# -- optimizers that wrap another -------------------------------------------------------
def own_optimizer_variables(optimizer):
    """The variables `optimizer` created itself (`add_variable`), without those of an
    optimizer it wraps: Keras keeps them in `Optimizer._variables`, and its public
    `variables` of a wrapper would list only these."""
    return list(optimizer._variables)


def set_untracked(obj, name, value):
    """Sets `obj.name = value` out of Keras' attribute tracking (a Keras layer or
    optimizer lists every variable held in a tracked attribute, so variables it already
    tracks would be listed twice). Keras has no public way to opt an attribute out."""
    object.__setattr__(obj, name, value)


# -- keras.optimizers.LossScaleOptimizer -------------------------------------------------
class LossScaleHooks:
    """Mixin for a `keras.optimizers.LossScaleOptimizer` subclass: calls
    `self.after_finite_step()` after Keras' update of the dynamic scale on a step with
    finite gradients, and `self.after_non_finite_step()` after a skipped step.

    Keras has no public hook into its dynamic scaling: it updates the scale in
    `_stateful_handle_finite_grads` and `_stateful_handle_non_finite_grads`.
    """

    def _stateful_handle_non_finite_grads(self):
        super()._stateful_handle_non_finite_grads()
        self.after_non_finite_step()

    def _stateful_handle_finite_grads(self, grads, trainable_variables):
        super()._stateful_handle_finite_grads(grads, trainable_variables)
        self.after_finite_step()

    def after_finite_step(self):
        pass

    def after_non_finite_step(self):
        pass


# -- the gradient all-reduce of Keras' TensorFlow optimizers -----------------------------
def replace_gradient_all_reduce(optimizer, all_reduce):
    """Makes `optimizer` sum its gradients across replicas with `all_reduce` (a function
    of the list of `(gradient, variable)` pairs, called in each replica's context,
    returning the pairs with the summed gradients) instead of TensorFlow's all-reduce.

    Keras' TensorFlow optimizer all-reduces in `_all_reduce_sum_gradients`, called by
    `apply` under `tf.distribute` just before the per-variable update; no public
    argument or hook replaces it (a custom `train_step` could reduce first, but the
    optimizer would then reduce again). Set on the instance, so the optimizer's class
    and its saved config stay Keras' own.
    """
    if not hasattr(optimizer, "_all_reduce_sum_gradients"):
        raise TypeError(f"{type(optimizer).__name__} has no TensorFlow gradient "
                        "all-reduce to replace (the Keras backend must be 'tensorflow')")
    object.__setattr__(optimizer, "_all_reduce_sum_gradients", all_reduce)


def build_from_first_replica(model):
    """Lets `model.fit` start under `tf.distribute.MultiWorkerMirroredStrategy`.

    Keras 3's TensorFlow trainer builds the model from the first batch in
    `_maybe_symbolic_build`, which passes the whole (x, y) structure of per-replica
    values to `strategy.reduce`; across workers that takes a single value only and
    fails ("Attempt to convert a value (PerReplica ...) to a Tensor",
    keras-team/keras#20585). This builds from the first local replica's batch instead
    (the shapes are the same; no collective is run). No public API builds a model
    before `fit` in its place. Set on the instance; a no-op where Keras has no such
    method.
    """
    original = getattr(model, "_maybe_symbolic_build", None)
    if original is None:
        return

    def build(iterator=None, data_batch=None):
        if iterator is not None and data_batch is None:
            # Keras >= 3.10's epoch iterator yields (begin, end, iterator), older ones
            # (step, iterator): the iterator is last in both.
            for item in iterator:
                batch = next(item[-1])
                strategy = model.distribute_strategy
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v, batch)
                break
        return original(data_batch=data_batch)

    object.__setattr__(model, "_maybe_symbolic_build", build)


def logs_with_replica_axis(model):
    """Lets `model.fit` / `evaluate` report their logs under
    `tf.distribute.MultiWorkerMirroredStrategy`.

    Keras 3's TensorFlow trainer averages each step's per-replica logs across workers
    with `strategy.reduce("MEAN", value, axis=0)`, which fails on scalar logs ("Invalid
    reduction dimension 0 for input with 0 dimensions", keras-team/keras#20585; the
    reduction is hard-coded, `distribute_reduction_method` is not read there). The
    model's `train_step` and `test_step` here return each scalar log with a length-1
    axis, so that the reduction averages the replicas' values into a scalar. The
    public alternative, a `train_step` override, needs a model subclass. Set on the
    instance.
    """
    def with_axis(step):
        def wrapped(data):
            logs = step(data)
            return tf.nest.map_structure(
                lambda v: tf.reshape(v, [1]) if tf.is_tensor(v) and v.shape.rank == 0 else v,
                logs)
        return wrapped

    for name in ("train_step", "test_step"):
        object.__setattr__(model, name, with_axis(getattr(model, name)))


# -- tensorflow-model-optimization (tfhfp8.tfmot only; imported on call) ---------------------
def tfmot_quantize_layer():
    """tfmot's `QuantizeLayer` (a tf-keras layer applying a tfmot `Quantizer` to its
    input), which tfhfp8.tfmot's layout transform puts before each GEMM layer for `Q_a`.
    tfmot uses it in its own default scheme but does not export it."""
    from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer

    return quantize_layer.QuantizeLayer
