"""Pieces shared by the kernel backends' autograd.Functions."""
import torch


def refuse_double_backward(what):
    """Raises when a kernel's backward is itself being differentiated (create_graph=True): the kernels have no
    backward of their backward; the reference backends do (plain torch)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"double backward (create_graph=True) through the fastml {what} is not supported; use "
                           "backend='reference' for higher-order gradients")


def scale_fused_grads(grads, grad_out):
    """Gradients a forward kernel wrote for an output gradient of 1, scaled in place to the actual `grad_out`
    (a one-element tensor). The usual case, a CPU loss backpropagated with 1, costs nothing; on a GPU the value is
    not read on the host (that would wait for the device), so the scaling is always done there."""
    if grad_out.device.type == "cpu" and float(grad_out) == 1.0:
        return grads
    return [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]
