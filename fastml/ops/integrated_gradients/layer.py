"""LayerIntegratedGradients: IG with respect to one layer's output (or input), e.g. the embeddings of a text model
whose inputs are token ids. Captum's semantics: the path runs from the layer's activations at the baselines to its
activations at the inputs; the model is run on the inputs and a hook replaces the layer's activations with the
scaled ones."""
import torch
from torch import nn

from fastml.ops.integrated_gradients import _args, driver
from fastml.ops.integrated_gradients._problem import Problem
from fastml.ops.integrated_gradients._validate import check_options


def _as_acts(value, where):
    acts, is_tuple = (value, True) if isinstance(value, tuple) else ((value,), False)
    for i, a in enumerate(acts):
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            raise TypeError(f"layer: its {where} [{i}] must be a floating tensor to attribute to it, got "
                            f"{getattr(a, 'dtype', type(a).__name__)}")
    return acts, is_tuple


class LayerProblem(Problem):
    """IG with respect to a layer's activations: the model runs on its inputs while a hook replaces the layer's
    output (input) with the points of the path."""

    def __init__(self, forward_func, layer, to_input, model_inputs, model_baselines, target, additional, grad_kwargs):
        super().__init__(forward_func, target, additional, model_inputs[0].shape[0])
        self.layer = layer
        self.to_input = to_input
        self.model_inputs = model_inputs
        self.model_baselines = model_baselines
        self.grad_kwargs = grad_kwargs or {}
        self.inputs, self.is_tuple = self._capture(model_inputs)
        self.baselines, _ = self._capture(model_baselines)
        for i, (a, b) in enumerate(zip(self.inputs, self.baselines)):
            if a.dim() < 1 or a.shape[0] != self.batch or b.shape != a.shape:
                raise ValueError(f"layer: its {self._where()} [{i}] must have the batch ({self.batch}) as first dim "
                                 f"and the same shape at inputs and baselines, got {list(a.shape)} and "
                                 f"{list(b.shape)}")

    def _where(self):
        return "input" if self.to_input else "output"

    def _hooked(self, hook):
        return self.layer.register_forward_pre_hook(hook) if self.to_input else self.layer.register_forward_hook(hook)

    def _capture(self, model_inputs):
        """The layer's activations when the model runs on `model_inputs` (no gradients)."""
        seen = []

        def hook(module, args, output=None):
            seen.append(args if self.to_input else output)

        handle = self._hooked(hook)
        try:
            with torch.no_grad():
                self.forward_func(*model_inputs, *self.additional)
        finally:
            handle.remove()
        if not seen:
            raise ValueError("layer: it was not called by forward_func")
        # As Captum: a layer called more than once is represented by its last call (every call is replaced below).
        acts, is_tuple = _as_acts(seen[-1], self._where())
        return tuple(a.detach() for a in acts), is_tuple

    def forward(self, points, idx):
        model_args = _args.subset_additional(self.model_inputs + self.additional, idx, self.batch)
        replacement = points if self.to_input or self.is_tuple else points[0]

        def hook(module, args, output=None):
            return replacement

        handle = self._hooked(hook)
        try:
            return self.forward_func(*model_args)
        finally:
            handle.remove()


class LayerIntegratedGradients(_args.CaptumAttribution):
    """Drop-in for captum.attr.LayerIntegratedGradients with one layer (an nn.Module): the same constructor and
    `attribute` with Captum's positional order; fastml's keyword options (rtol, atol, max_steps, max_segments,
    progress, backend) may follow. device_ids is accepted for compatibility; the model runs where its inputs are."""

    def __init__(self, forward_func, layer, device_ids=None, multiply_by_inputs=True):
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be one torch.nn.Module, got {type(layer).__name__}")
        super().__init__(forward_func, multiply_by_inputs)
        self.layer = layer
        self.device_ids = device_ids

    def attribute(self, inputs, baselines=None, target=None, additional_forward_args=None, n_steps=None,
                  method="gausslegendre", internal_batch_size=None, return_convergence_delta=False,
                  attribute_to_layer_input=False, grad_kwargs=None, *, rtol=None, atol=0.0, max_steps=512,
                  max_segments=10000, progress=False, backend="auto"):
        """Attributions to the layer's output (its input with attribute_to_layer_input=True): a tensor, or a
        tuple when the layer gives several. inputs may be token ids; baselines as in integrated_gradients, in the
        inputs' dtype (e.g. a padding id). delta [B] = sum(attr) - (F(inputs) - F(baselines))."""
        inputs, _ = _args.as_tuple(inputs)
        batch = _args.check_inputs(inputs, floating=False)
        check_options(n_steps=n_steps, method=method, internal_batch_size=internal_batch_size, rtol=rtol,
                      atol=atol, max_steps=max_steps, max_segments=max_segments, backend=backend)
        baselines = tuple(b.contiguous() for b in _args.format_baselines(baselines, inputs))
        _args.check_target(target, batch)
        if grad_kwargs is not None and not isinstance(grad_kwargs, dict):
            raise TypeError(f"grad_kwargs must be None or a dict, got {type(grad_kwargs).__name__}")
        additional = _args.format_additional(additional_forward_args, batch)
        problem = LayerProblem(self.forward_func, self.layer, attribute_to_layer_input, inputs, baselines, target,
                               additional, grad_kwargs)
        attrs, delta = driver.run(problem, method=method, n_steps=n_steps, internal_batch_size=internal_batch_size,
                                  multiply_by_inputs=self._multiply_by_inputs,
                                  want_delta=return_convergence_delta, rtol=rtol, atol=atol, max_steps=max_steps,
                                  max_segments=max_segments, progress=progress, backend=backend)
        out = attrs if len(attrs) > 1 else attrs[0]
        return (out, delta) if return_convergence_delta else out
