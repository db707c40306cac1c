"""The one mechanism every emulated layer uses to quantize its GEMMs.

`EmulatedLayer` is a mixin placed before a Keras layer class. A layer computes each
of its GEMM-like products through `self.emulated_gemm(op, inputs, kernels)`:

    y = Q_e^backward( op(Q_a(inputs)..., Q_w(Q_g^backward(kernel))...) )

`Q_a` and `Q_w` round values in the forward pass (gradients pass straight through),
`Q_e^backward` and `Q_g^backward` are identities that round the gradient flowing
back. Differentiating `op` itself then gives exactly
`dx = op_input_grad(Q_e(dy), Q_w(W))` and `dW = Q_g(op_kernel_grad(Q_a(x), Q_e(dy)))`.

With loss scaling on the policy, `Q_e(dy)` becomes `Q_e(s * dy) / s` with a per-GEMM
power-of-two `s` kept in a state variable.

Block-scaled formats depend on the axis their blocks run along. When a role of the
policy has one and the layer describes its product by an einsum equation
(`emulated_gemm(..., equation=...)`), each GEMM quantizes its own operands along its
own reduction axis (`tfhfp8.gemm.axes`): `x` and `W` along the forward reduction,
`dy` and `W` again along the `dx` GEMM's, `x` and `dy` again along the `dW` GEMM's.

Per-tensor scaled formats with delayed scaling (`BlockScaled(..., block_size=None,
amax_history=H)`) keep, per GEMM operand, an amax history and the scale in the
layer's state (saved with the model), updated as Keras' float8 layers update theirs.
When statistics are switched on (`tfhfp8.callbacks.QuantizationStats`), each GEMM
also records the fraction of its
errors that underflowed to zero or saturated in `Q_e`.
"""

import dataclasses
import functools

import keras
import numpy as np
import tensorflow as tf

from tfhfp8 import _compat, gemm
from tfhfp8 import policy as policy_lib
from tfhfp8.formats import roundings
from tfhfp8.gemm import axes as gemm_axes
from tfhfp8.layers.emulation_state import EmulationState, record_error_stats
from tfhfp8.quantization import quantize, quantize_gradient
from tfhfp8.rounding import stochastic_seed


def _in_float32(op):
    """`op` on float32 operands, its result in the first operand's dtype: the emulated
    sums take float32 (a float16 or bfloat16 value is exact in it), while a layer may
    compute in float16 (Keras' "mixed_float16")."""
    def cast_around(*operands):
        dtype = operands[0].dtype
        return tf.cast(op(*(tf.cast(x, tf.float32) for x in operands)), dtype)
    return cast_around


class EmulatedLayer(EmulationState, _compat.AfterBuild):
    """Mixin for Keras layers whose GEMMs run in the formats of a `tfhfp8.Policy`.

    Placed before the Keras layer class, it adds the `policy` argument (a
    `tfhfp8.Policy`, a preset name, a config dict or None for the global policy) to
    that layer's own arguments.
    """

    # Names of the layer's GEMMs (each gets its own error scale and statistics).
    GEMMS = ("gemm",)
    # Per GEMM: how many activation inputs and kernels it quantizes (delayed scaling
    # keeps an amax history for each).
    OPERANDS = (1, 1)
    # The kernel axis that meets the GEMM's input channels (Keras' Dense, Conv*D,
    # DepthwiseConv2D and SeparableConv2D kernels end in (..., input, output)).
    KERNEL_INPUT_AXIS = -2
    # Set by QuantizationStats: record error statistics in the backward pass.
    collect_stats = False

    def __init__(self, *args, policy=None, **kwargs):
        self.policy = policy_lib.get(policy)
        # Keep Keras' own dtype policy plain, so saved configs never depend on ours.
        if kwargs.get("dtype") is None and isinstance(keras.config.dtype_policy(),
                                                      policy_lib.Policy):
            kwargs["dtype"] = "float32"
        super().__init__(*args, **kwargs)
        self._check_accumulation()

    # -- the quantizers -----------------------------------------------------------
    # Stochastic rounding draws its seeds from checkpointed state, not from TF's global
    # random state: a per-layer step counter (saved with the layer, tracked by
    # tf.train.Checkpoint) advanced at every GEMM, mixed with a constant per layer (its
    # name), GEMM, role and operand. A run resumed from a saved model or a checkpoint
    # therefore rounds exactly as the uninterrupted run would have.
    def _forward(self, x, role, step=None, *key):
        return self._rounded(x, role, step, *key)[0]

    def _rounded(self, x, role, step=None, *key):
        """`(x in role's format, the format its GEMMs take)`: a per-tensor scaled one as
        a `gemm.TensorScaled` with the scale used (a fused accumulator needs it)."""
        fmt = self.policy.formats[role]
        if fmt is None:
            return x, None
        scale = self._tensor_scale(x, role, *key[:2])
        q = quantize(x, fmt, rounding=self.policy.rounding[role],
                     saturate=self.policy.saturate, seed=self._role_seed(step, role, *key),
                     scale=scale)
        return q, (fmt if scale is None else gemm.TensorScaled(fmt, scale))

    def _quantize_along(self, x, role, step, axes, key, update=True):
        """`x` in `role`'s format with blocks along `axes` (a GEMM's reduction axes);
        `key`: (gemm, operand index, ...) for the seed and the scaling state."""
        fmt = self.policy.formats[role]
        if fmt is None:
            return x
        seed = self._role_seed(step, role, *key)
        scale = self._delayed_scale(x, role, *key[:2], update=update)
        if gemm_axes.tiled(fmt):
            return gemm_axes.quantize_tiled(x, axes, lambda t: quantize(
                t, fmt, rounding=self.policy.rounding[role], saturate=self.policy.saturate,
                seed=seed))
        if not gemm_axes.axis_dependent(fmt):
            return quantize(x, fmt, rounding=self.policy.rounding[role],
                            saturate=self.policy.saturate, seed=seed, scale=scale)
        along = dataclasses.replace(fmt, axis=-1)
        return gemm_axes.quantize_along(x, axes, lambda t: quantize(
            t, along, rounding=self.policy.rounding[role], saturate=self.policy.saturate,
            seed=seed))

    def _backward(self, x, role, step=None, *key):
        fmt = self.policy.formats[role]
        if fmt is None:
            return x
        return quantize_gradient(x, fmt, rounding=self.policy.rounding[role],
                                 saturate=self.policy.saturate,
                                 seed=self._role_seed(step, role, *key))

    def _role_seed(self, step, role, *key):
        if step is None or not roundings.is_stochastic(self.policy.rounding[role]):
            return None
        return stochastic_seed(step, self.name, role, *key)

    def _rounding_step(self):
        """The next step of the counter (an int64 tensor) when this pass rounds
        stochastically: a forward role or a stochastic accumulator does, or a backward
        role may (gradients are being recorded: a training step). None otherwise, so
        inference (`predict`, `evaluate`) leaves the counter, hence the rounding of later
        training, alone."""
        holder = getattr(self, "_rounding_step_holder", None)
        if holder is None:
            return None
        forward = self._sums_stochastically() or any(
            self.policy.formats[role] is not None
            and roundings.is_stochastic(self.policy.rounding[role])
            for role in ("activations", "weights"))
        if not (forward or _compat.gradients_may_be_recorded()):
            return None
        return holder.advance()

    def _blocks_per_gemm(self):
        """True when a GEMM role's format depends on the axis its blocks run along or the
        layout its tiles cover."""
        return any(gemm_axes.axis_dependent(self.policy.formats[role])
                   or gemm_axes.tiled(self.policy.formats[role])
                   for role in ("activations", "weights", "errors"))

    def emulated_gemm(self, op, inputs, kernels=(), name="gemm", equation=None):
        """`op(*inputs, *kernels)` with activations, weights and errors quantized: how
        an emulated layer (tfhfp8's, or one of yours built on `EmulatedLayer`) computes
        each of its GEMM-like products.

        `equation`: the einsum equation `op` computes (two operands), if any; with a
        block-scaled role, each GEMM then blocks its operands along its own reduction
        axes (`_gemm_per_axis`)."""
        step = self._rounding_step()
        if equation is not None and self._blocks_per_gemm():
            return self._gemm_per_axis(op, equation, inputs, kernels, name, step)
        rounded = [self._rounded(x, "activations", step, name, i) for i, x in enumerate(inputs)]
        rounded += [self._rounded(self._backward(k, "weight_gradients", step, name, i),
                                  "weights", step, name, i)
                    for i, k in enumerate(kernels)]
        operands = [x for x, _ in rounded]
        fan_in = self.backward_fan_in(kernels[0]) if kernels else 1
        errors = self.policy.errors
        if gemm.is_tensor_scaled(errors):
            errors = gemm.TensorScaled(errors)  # its scale: set by `_errors`, backward
        if self.policy.accumulates:
            op = self._accumulating(name, step, [fmt for _, fmt in rounded] + [errors])
        return self._errors(op(*operands), name, operands[len(inputs)] if kernels else None,
                            step, fan_in, errors)

    def backward_fan_in(self, kernel):
        """How many products of the output gradient and `kernel` each element of the
        input gradient sums: the kernel's size over its input channels (Dense: units;
        Conv2D: filters * kh * kw). Per-layer loss scaling bounds its scale with it."""
        shape = tuple(kernel.shape)
        return max(1, int(np.prod(shape)) // max(1, int(shape[self.KERNEL_INPUT_AXIS])))

    def _gemm_per_axis(self, op, equation, inputs, kernels, name, step):
        """The forward and both backward GEMMs of a bilinear `op`, each with its
        operands quantized along its own reduction axes (see `gemm_axes`).

        Forward: `y = op(Q_a(A), Q_w(B))` along the forward reduction; backward, with
        `dy` scaled and quantized as `Q_e`: `dA = einsum(Q_e(dy), Q(B))` and
        `dB = Q_g(einsum(Q(A), Q_e(dy)))`, each operand quantized again along that
        GEMM's reduction axes. Stochastic rounding draws a separate seed for each.
        """
        roles = ["activations"] * len(inputs) + ["weights"] * len(kernels)
        keys = [(name, i) for i in range(len(inputs))] + [(name, i) for i in range(len(kernels))]
        operands = [tf.convert_to_tensor(x) for x in inputs] + [
            tf.convert_to_tensor(self._backward(k, "weight_gradients", step, name, i))
            for i, k in enumerate(kernels)]
        if len(operands) != 2:
            raise ValueError(f"a per-axis GEMM has two operands, got {len(operands)}")
        a, b = operands
        spec = gemm_axes.GemmAxes(equation, a.shape.rank, b.shape.rank)
        (role_a, role_b), (key_a, key_b) = roles, keys
        fmt_e = self.policy.errors
        scaling, state = self.loss_scaling_rule, self.error_state[name]
        collect = self.collect_stats
        fan_in = self.backward_fan_in(kernels[0]) if kernels else 1

        def dependent(role):
            return gemm_axes.axis_dependent(self.policy.formats[role])

        # The forward operands are quantized outside the custom gradient (which must
        # not read the scaling state's variables); their own gradients are not used.
        a_f = self._quantize_along(a, role_a, step, spec.forward[0], key_a)
        b_f = self._quantize_along(b, role_b, step, spec.forward[1], key_b)
        forward_op, input_grad, kernel_grad = (
            op, functools.partial(tf.einsum, spec.input_grad_equation),
            functools.partial(tf.einsum, spec.kernel_grad_equation))
        if self.policy.accumulates:
            forward_op, input_grad, kernel_grad = self._accumulating_per_axis(
                spec, name, step, (self.policy.formats[role_a], self.policy.formats[role_b]))

        @tf.custom_gradient
        def product(a, b, a_f, b_f):
            def grad(dy):
                scale = None
                if fmt_e is not None and scaling is not None:
                    scale = scaling.scale(dy, b_f if role_b == "weights" else None, fmt_e,
                                          state, fan_in)

                def errors(axes, *tag, update=True):
                    scaled = dy if scale is None else dy * tf.cast(scale, dy.dtype)
                    q = self._quantize_along(scaled, "errors", step, axes, (name, 0) + tag,
                                             update=update)
                    return scaled, q

                scaled, dy_a = errors(spec.input_grad[0])
                if collect and fmt_e is not None:
                    record_error_stats(state, scaled, dy_a, fmt_e)
                dy_b = (errors(spec.kernel_grad[1], "dW", update=False)[1]
                        if dependent("errors") else dy_a)
                if scale is not None:
                    dy_a, dy_b = (t / tf.cast(scale, dy.dtype) for t in (dy_a, dy_b))
                b_a = (self._quantize_along(b, role_b, step, spec.input_grad[1],
                                            key_b + ("dx",), update=False)
                       if dependent(role_b) else b_f)
                a_b = (self._quantize_along(a, role_a, step, spec.kernel_grad[0],
                                            key_a + ("dW",), update=False)
                       if dependent(role_a) else a_f)
                da = input_grad(dy_a, b_a)
                db = kernel_grad(a_b, dy_b)
                return da, db, None, None

            return tf.identity(forward_op(a_f, b_f)), grad

        return product(a, b, a_f, b_f)

    # -- emulated accumulation ---------------------------------------------------------
    # Layers whose GEMMs can sum as `policy.accumulation` says define
    # `_accumulating_op(name)`: a function (operands already rounded, the formats,
    # accumulators, seed and statistics as keywords) -> the op's output.
    _accumulating_op = None
    # With block-scaled roles, each GEMM is one einsum whose operands are blocked along
    # its reduction (`_gemm_per_axis`): true of Dense, EinsumDense and attention. A
    # convolution's blocked GEMMs leave part of a dot product (the kernel window of
    # `dx`, of a transposed convolution) to an FP32 scatter-add, so they cannot
    # emulate its sums.
    _BLOCKED_GEMMS_ACCUMULATE = False

    def _check_accumulation(self):
        if not self.policy.accumulates:
            return
        if self._accumulating_op is None:
            raise NotImplementedError(
                f"{type(self).__name__}: the policy {self.policy.name!r} emulates "
                "accumulation (accumulation=...), which is implemented for Dense, "
                "EinsumDense, Conv1D, Conv2D, Conv3D, DepthwiseConv2D, SeparableConv2D, "
                "Conv2DTranspose and MultiHeadAttention; use accumulation=None (FP32 "
                "sums) for this layer")
        if self._blocks_per_gemm() and not self._BLOCKED_GEMMS_ACCUMULATE:
            raise NotImplementedError(
                f"{type(self).__name__}: emulated accumulation (accumulation=...) with "
                "block-scaled formats is implemented for Dense, EinsumDense and "
                "MultiHeadAttention only (a blocked convolution sums part of its dot "
                "products in FP32); use accumulation=None or a format without blocks")

    def _accumulation_setup(self, name, step):
        """(accumulators, seed, statistics) of GEMM `name`."""
        accs = self.policy.accumulation
        if self._sums_stochastically():  # the layer's counter (see _rounding_step)
            seed = stochastic_seed(step, self.name, "accumulation", name)
        else:
            seed = tf.zeros([], tf.int64)
        return accs, seed, gemm.Stats(getattr(self, "accumulation_state", {}).get(name))

    def _accumulating(self, name, step, operand_formats):
        """The layer's op for GEMM `name` with the policy's accumulators;
        `operand_formats`: those of its two operands and of the output gradient (a
        per-tensor scaled one as a `gemm.TensorScaled`)."""
        accs, seed, stats = self._accumulation_setup(name, step)
        return _in_float32(functools.partial(
            self._accumulating_op(name), accumulators=accs, formats=tuple(operand_formats),
            seed=seed, stats=stats))

    def _accumulating_per_axis(self, spec, name, step, operand_formats):
        """The forward, input-gradient and kernel-gradient einsums of `spec` (a
        `GemmAxes`) with the policy's accumulators, for `_gemm_per_axis`."""
        accs, seed, stats = self._accumulation_setup(name, step)
        fmt_a, fmt_b = operand_formats
        ta, tb, tc = spec.terms

        def einsum(kind, terms, fmts, offset):
            @_in_float32
            def product(x, y):
                c, swamped, overflows, additions = gemm.einsum_product(
                    x, y, terms, accs[kind], *fmts, seed + offset)
                stats.record(kind, swamped, overflows, additions)
                return c
            return product

        return (einsum("forward", (ta, tb, tc), (fmt_a, fmt_b), 0),
                einsum("input_gradient", (tc, tb, ta), (self.policy.errors, fmt_b), 1),
                einsum("weight_gradient", (ta, tc, tb), (fmt_a, self.policy.errors), 2))

    def _errors(self, y, name, weights, step=None, fan_in=1, operand=None):
        """Identity forward; `Q_e(s * dy) / s` backward, with optional statistics.
        `operand`: the errors' `gemm.TensorScaled`, given the scale of the values
        passed back (`Q_e`'s over `s`), or None."""
        fmt = self.policy.errors
        if fmt is None:
            return y
        scaling, state = self.loss_scaling_rule, self.error_state[name]
        rounding, saturate = self.policy.rounding["errors"], self.policy.saturate
        collect = self.collect_stats
        seed = self._role_seed(step, "errors", name)

        @tf.custom_gradient
        def _quantize_errors(y):
            def grad(dy):
                scale = None if scaling is None else scaling.scale(dy, weights, fmt, state,
                                                                   fan_in)
                scaled = dy if scale is None else dy * tf.cast(scale, dy.dtype)
                tensor_scale = self._tensor_scale(scaled, "errors", name)
                quantized = quantize(scaled, fmt, rounding=rounding, saturate=saturate,
                                     seed=seed, scale=tensor_scale)
                if isinstance(operand, gemm.TensorScaled):  # read by the gradient GEMMs
                    operand.scale = (tensor_scale if scale is None
                                     else tensor_scale / tf.cast(scale, tf.float32))
                if collect:
                    record_error_stats(state, scaled, quantized, fmt)
                return quantized if scale is None else quantized / tf.cast(scale, dy.dtype)
            return tf.identity(y), grad

        return _quantize_errors(y)

    def _bias_and_activation(self, outputs):
        """Adds the bias in FP32 and applies the activation, as the Keras layer does.

        Not with `keras.ops.add`: Keras 3's TensorFlow `add` takes a `(1, C, 1, ...)`
        bias for a channels-last one whenever the output's last axis also has length C,
        and adds it along the wrong axis."""
        bias = getattr(self, "bias", None)
        if bias is not None:
            bias = tf.convert_to_tensor(bias)
            first = getattr(self, "data_format", "channels_last") == "channels_first"
            if bias.shape.rank == 1 and outputs.shape.rank >= 2:
                # BiasAdd, as Keras' own layers add it (its gradient sums as theirs).
                outputs = tf.nn.bias_add(outputs, bias,
                                         data_format="NC..." if first else "N...C")
            else:  # EinsumDense's bias of several axes, broadcast from the right
                outputs = tf.add(outputs, bias)
        return outputs if self.activation is None else self.activation(outputs)

    def get_config(self):
        config = super().get_config()
        config["policy"] = policy_lib.serialize(self.policy)
        return config
