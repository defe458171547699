"""What the IG engines (driver.py, adaptive.py, exact.py) need from "IG of what": one base class, two kinds.

A problem has the path's end points `inputs` and `baselines` (tuples of [B, ...] tensors, in the space IG
integrates over: the model's inputs, or a layer's activations) and can run the model with points of that space
substituted, one row per point. `idx` lists, per row, the example it belongs to (repeats allowed), so that the
target and every per-example additional argument follow the rows whatever their order.
"""
import torch

from fastml.ops.integrated_gradients import _args


class Problem:
    """Shared part: targets, additional arguments, the end-point outputs and the gradients.

    Subclasses set `inputs`, `baselines`, `model_inputs`, `model_baselines` (what forward_func is called with at
    the two ends) and implement `forward(points, idx)`."""

    grad_kwargs = {}

    def __init__(self, forward_func, target, additional, batch):
        self.forward_func = forward_func
        self.target = target
        self.additional = additional
        self.batch = batch

    def forward(self, points, idx):
        """forward_func's output with the rows `points` (a tuple like `inputs`, row r from example idx[r])."""
        raise NotImplementedError

    def grads(self, points, idx, steps=1):
        """Gradients (a tuple like `points`) of the selected output at `points`. The rows are step-major over
        the examples `idx`: row s * len(idx) + j belongs to example idx[j]."""
        rows = list(idx) * steps
        with torch.enable_grad():
            selected = _args.select(self.forward(points, rows), _args.subset_target(self.target, rows))
            return torch.autograd.grad(selected.sum(), points, **self.grad_kwargs)

    def _evaluate(self, model_args):
        out = _args.select(self.forward_func(*model_args, *self.additional), self.target)
        return out.reshape(self.batch, -1).sum(1)

    def endpoint_outputs(self):
        """(F(inputs), F(baselines)): the selected output summed per example, [B] each."""
        with torch.no_grad():
            return self._evaluate(self.model_inputs), self._evaluate(self.model_baselines)


class IGProblem(Problem):
    """IG with respect to the model's inputs."""

    def __init__(self, forward_func, inputs, baselines, target, additional):
        super().__init__(forward_func, target, additional, inputs[0].shape[0])
        self.inputs = self.model_inputs = inputs
        self.baselines = self.model_baselines = baselines

    def forward(self, points, idx):
        return self.forward_func(*points, *_args.subset_additional(self.additional, idx, self.batch))
