"""Integrated gradients (Sundararajan et al. 2017), Captum-compatible, streamed and optionally adaptive.

integrated_gradients / IntegratedGradients attribute to the inputs, LayerIntegratedGradients (layer.py) to a
layer's output or input. The path kernels ig_scale_inputs / ig_accumulate (path.py) have reference, cpp, triton
and cuda backends. The maths and the decisions are in README.md beside this file.
"""
import torch

from fastml.ops.integrated_gradients import _args, driver
from fastml.ops.integrated_gradients._validate import check_options
from fastml.ops.integrated_gradients.layer import LayerIntegratedGradients
from fastml.ops.integrated_gradients.path import ig_accumulate, ig_scale_inputs


class IGProblem:
    """IG with respect to the model's inputs (see driver.py for the protocol)."""

    def __init__(self, forward_func, inputs, baselines, target, additional):
        self.forward_func = forward_func
        self.inputs = inputs
        self.baselines = baselines
        self.target = target
        self.additional = additional
        self.batch = inputs[0].shape[0]

    def grads(self, scaled, idx, steps):
        args = _args.expand_additional(_args.subset_additional(self.additional, idx, self.batch), steps)
        target = _args.expand_target(_args.subset_target(self.target, idx), steps)
        with torch.enable_grad():
            selected = _args.select(self.forward_func(*scaled, *args), target)
            return torch.autograd.grad(selected.sum(), scaled)

    def _evaluate(self, points):
        out = _args.select(self.forward_func(*points, *self.additional), self.target)
        return out.reshape(self.batch, -1).sum(1)

    def endpoint_outputs(self):
        with torch.no_grad():
            return self._evaluate(self.inputs), self._evaluate(self.baselines)


def integrated_gradients(forward_func, inputs, baselines=None, target=None, *, additional_forward_args=None,
                         n_steps=50, method="gausslegendre", internal_batch_size=None,
                         return_convergence_delta=False, multiply_by_inputs=True, rtol=None, atol=0.0,
                         max_steps=512, progress=False, backend="auto"):
    """Integrated gradients of forward_func's selected output along the straight path from baselines to inputs.

    inputs: a floating tensor [B, ...] or a tuple of them (first dim the batch). baselines: None (zeros), a
    number, a tensor broadcastable to the input, or a tuple of those (one per input). target: None, int, tuple,
    list or tensor, selecting one scalar per example from forward_func's output (Captum's rules).
    additional_forward_args: passed to forward_func after the inputs; tensors with a dim are repeated per step.

        attr_i = (x_i - x'_i) * sum_s w_s dF/dx_i(x' + a_s (x - x'))     (without the factor if not
                                                                          multiply_by_inputs)

    with the nodes a_s and weights w_s of `method` ("riemann_left", "riemann_right", "riemann_middle",
    "riemann_trapezoid", "gausslegendre") with n_steps nodes. Steps go through the model in chunks of at most
    internal_batch_size rows (None: fastml sizes the chunks), so memory does not grow with n_steps.

    rtol, atol (adaptive mode, turned on by either; rtol None counts as 0): refine each example's rule, reusing
    every evaluation, until |sum(attr) - (F(x) - F(x'))| <= max(rtol * |F(x) - F(x')|, atol) or max_steps nodes
    (then a warning).

    Returns the attributions (float32, float64 for float64 inputs; a tuple for tuple inputs), and with
    return_convergence_delta=True also delta [B] = sum(attr) - (F(x) - F(x')).
    """
    inputs, is_tuple = _args.as_tuple(inputs)
    batch = _args.check_inputs(inputs, floating=True)
    check_options(n_steps=n_steps, method=method, internal_batch_size=internal_batch_size, rtol=rtol, atol=atol,
                  max_steps=max_steps, backend=backend)
    # Dense once here (O(size of inputs)), rather than a copy of a broadcast baseline in every kernel call.
    baselines = tuple(b.contiguous() for b in _args.format_baselines(baselines, inputs))
    _args.check_target(target, batch)
    additional = _args.format_additional(additional_forward_args)
    problem = IGProblem(forward_func, tuple(x.detach().contiguous() for x in inputs), baselines, target, additional)
    attrs, delta = driver.run(problem, method=method, n_steps=n_steps, internal_batch_size=internal_batch_size,
                              multiply_by_inputs=multiply_by_inputs, want_delta=return_convergence_delta,
                              rtol=rtol, atol=atol, max_steps=max_steps, progress=progress, backend=backend)
    out = attrs if is_tuple else attrs[0]
    return (out, delta) if return_convergence_delta else out


class IntegratedGradients(_args.CaptumAttribution):
    """Drop-in for captum.attr.IntegratedGradients: the same constructor and `attribute` with Captum's positional
    order; fastml's keyword options (rtol, atol, max_steps, progress, backend) may follow."""

    def attribute(self, inputs, baselines=None, target=None, additional_forward_args=None, n_steps=50,
                  method="gausslegendre", internal_batch_size=None, return_convergence_delta=False,
                  **fastml_options):
        return integrated_gradients(self.forward_func, inputs, baselines, target,
                                    additional_forward_args=additional_forward_args, n_steps=n_steps, method=method,
                                    internal_batch_size=internal_batch_size,
                                    return_convergence_delta=return_convergence_delta,
                                    multiply_by_inputs=self._multiply_by_inputs, **fastml_options)


__all__ = ["integrated_gradients", "IntegratedGradients", "LayerIntegratedGradients", "ig_scale_inputs",
           "ig_accumulate"]
