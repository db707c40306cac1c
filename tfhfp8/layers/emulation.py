"""The one mechanism every emulated layer uses to quantize its GEMMs.

`EmulatedLayer` is a mixin placed before a Keras layer class. A layer computes each
of its GEMM-like products through `self._gemm(op, inputs, kernels)`:

    y = Q_e^backward( op(Q_a(inputs)..., Q_w(Q_g^backward(kernel))...) )

`Q_a` and `Q_w` round values in the forward pass (gradients pass straight through),
`Q_e^backward` and `Q_g^backward` are identities that round the gradient flowing
back (`tfhfp8.quantize_gradient`). Differentiating `op` itself then gives exactly
`dx = op_input_grad(Q_e(dy), Q_w(W))` and `dW = Q_g(op_kernel_grad(Q_a(x), Q_e(dy)))`.
"""

import keras

from tfhfp8 import policy as policy_lib
from tfhfp8.quantization import quantize, quantize_gradient


class MasterWeightRounding(keras.constraints.Constraint):
    """Rounds a variable to `fmt` after each optimizer step (then any user constraint)."""

    def __init__(self, fmt, rounding, inner=None):
        self.fmt, self.rounding, self.inner = fmt, rounding, inner

    def __call__(self, w):
        if self.inner is not None:
            w = self.inner(w)
        return quantize(w, self.fmt, rounding=self.rounding, saturate=True)


class EmulatedLayer:
    """Mixin for Keras layers whose GEMMs run in the formats of a `tfhfp8.Policy`."""

    def _init_policy(self, policy, kwargs):
        self.policy = policy_lib.get(policy)
        # Keep Keras' own dtype policy plain, so saved configs never depend on ours.
        if kwargs.get("dtype") is None and isinstance(keras.config.dtype_policy(),
                                                      policy_lib.Policy):
            kwargs["dtype"] = "float32"
        return kwargs

    # -- the quantizers -----------------------------------------------------------
    def _forward(self, x, role):
        fmt = self.policy.formats[role]
        if fmt is None:
            return x
        return quantize(x, fmt, rounding=self.policy.rounding[role],
                        saturate=self.policy.saturate)

    def _backward(self, x, role):
        fmt = self.policy.formats[role]
        if fmt is None:
            return x
        return quantize_gradient(x, fmt, rounding=self.policy.rounding[role],
                                 saturate=self.policy.saturate)

    def _gemm(self, op, inputs, kernels=()):
        """`op(*inputs, *kernels)` with activations, weights and errors quantized."""
        args = [self._forward(x, "activations") for x in inputs]
        args += [self._forward(self._backward(k, "weight_gradients"), "weights")
                 for k in kernels]
        return self._backward(op(*args), "errors")

    # -- master weights -------------------------------------------------------------
    def _post_build(self):
        super()._post_build()
        self._attach_master_weight_rounding()

    def _attach_master_weight_rounding(self):
        fmt = self.policy.master_weights
        if fmt is None:
            return
        for variable in self._trainable_variables:
            if not isinstance(variable.constraint, MasterWeightRounding):
                variable.constraint = MasterWeightRounding(
                    fmt, self.policy.rounding["master_weights"], variable.constraint)

    def get_config(self):
        config = super().get_config()
        config["policy"] = policy_lib.serialize(self.policy)
        return config
