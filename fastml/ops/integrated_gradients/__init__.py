"""Integrated gradients (Sundararajan et al. 2017), Captum-compatible, streamed and optionally adaptive.

integrated_gradients / IntegratedGradients attribute to the inputs, LayerIntegratedGradients (layer.py) to a
layer's output or input. The path kernels ig_scale_inputs / ig_accumulate (path.py) have reference, cpp, triton
and cuda backends. The maths and the decisions are in README.md beside this file.
"""
from fastml.ops.integrated_gradients import _args, driver
from fastml.ops.integrated_gradients._problem import IGProblem
from fastml.ops.integrated_gradients._validate import check_options
from fastml.ops.integrated_gradients.layer import LayerIntegratedGradients
from fastml.ops.integrated_gradients.path import ig_accumulate, ig_scale_inputs


def integrated_gradients(forward_func, inputs, baselines=None, target=None, *, additional_forward_args=None,
                         n_steps=None, method="gausslegendre", internal_batch_size=None,
                         return_convergence_delta=False, multiply_by_inputs=True, rtol=None, atol=0.0,
                         max_steps=512, max_segments=10000, progress=False, backend="auto"):
    """Integrated gradients of forward_func's selected output along the straight path from baselines to inputs.

    inputs: a floating tensor [B, ...] or a tuple of them (first dim the batch). baselines: None (zeros), a
    number, a tensor broadcastable to the input, or a tuple of those (one per input). target: None, int, tuple,
    list or tensor, selecting one scalar per example from forward_func's output (Captum's rules).
    additional_forward_args: passed to forward_func after the inputs; tensors with a dim (the batch first) follow
    their examples through every model call.

        attr_i = (x_i - x'_i) * integral_0^1 dF/dx_i(x' + a (x - x')) da      (without the factor if not
                                                                               multiply_by_inputs)

    method: a quadrature rule ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
    "gausslegendre") with n_steps nodes (None: 50, Captum's default), or "exact" for models that are piecewise
    linear along the path (ReLU networks): the path is walked from kink to kink and each linear segment gets one
    gradient, so the integral is exact up to rounding (max_segments caps the segments per example). Steps go
    through the model in chunks of at most internal_batch_size rows (None: fastml sizes the chunks), so memory
    does not grow with the number of nodes.

    rtol, atol (adaptive mode, turned on by either; rtol None counts as 0): [0, 1] is subdivided per example
    where the integrand is not smooth until the estimated error of the attributions (a norm over all features)
    is <= max(rtol * ||attr||, atol) and |sum(attr) - (F(x) - F(x'))| is within the same tolerance, or
    max_steps nodes per example are spent (then a warning names the examples). Subintervals carry Gauss-Kronrod
    pairs (gausslegendre; Riemann rules: the rule and its refinement), best for smooth models, or with
    method="riemann_trapezoid" the trapezoid rule on their ends and midpoint, two new gradients per split, best
    for ReLU networks (the Gauss-Kronrod scheme switches to it at the kinks it finds). n_steps None starts from the 5-node Gauss-Kronrod pair (riemann_trapezoid: 3 nodes) on
    [0, 1], so that a smooth model costs few evaluations; a given n_steps starts from `method` with n_steps
    nodes and its nested extension.

    Returns the attributions (float32, float64 for float64 inputs; a tuple for tuple inputs), and with
    return_convergence_delta=True also delta [B] = sum(attr) - (F(x) - F(x')).
    """
    inputs, is_tuple = _args.as_tuple(inputs)
    batch = _args.check_inputs(inputs, floating=True)
    check_options(n_steps=n_steps, method=method, internal_batch_size=internal_batch_size, rtol=rtol, atol=atol,
                  max_steps=max_steps, max_segments=max_segments, backend=backend)
    # Dense once here (O(size of inputs)), rather than a copy of a broadcast baseline in every kernel call.
    baselines = tuple(b.contiguous() for b in _args.format_baselines(baselines, inputs))
    _args.check_target(target, batch)
    additional = _args.format_additional(additional_forward_args, batch)
    problem = IGProblem(forward_func, tuple(x.detach().contiguous() for x in inputs), baselines, target, additional)
    attrs, delta = driver.run(problem, method=method, n_steps=n_steps, internal_batch_size=internal_batch_size,
                              multiply_by_inputs=multiply_by_inputs, want_delta=return_convergence_delta,
                              rtol=rtol, atol=atol, max_steps=max_steps, max_segments=max_segments,
                              progress=progress, backend=backend)
    out = attrs if is_tuple else attrs[0]
    return (out, delta) if return_convergence_delta else out


class IntegratedGradients(_args.CaptumAttribution):
    """Drop-in for captum.attr.IntegratedGradients: the same constructor and `attribute` with Captum's positional
    order; fastml's keyword options (rtol, atol, max_steps, max_segments, progress, backend) may follow."""

    def attribute(self, inputs, baselines=None, target=None, additional_forward_args=None, n_steps=None,
                  method="gausslegendre", internal_batch_size=None, return_convergence_delta=False,
                  **fastml_options):
        return integrated_gradients(self.forward_func, inputs, baselines, target,
                                    additional_forward_args=additional_forward_args, n_steps=n_steps, method=method,
                                    internal_batch_size=internal_batch_size,
                                    return_convergence_delta=return_convergence_delta,
                                    multiply_by_inputs=self._multiply_by_inputs, **fastml_options)


__all__ = ["integrated_gradients", "IntegratedGradients", "LayerIntegratedGradients", "ig_scale_inputs",
           "ig_accumulate"]
