"""Checks of the options shared by integrated_gradients and LayerIntegratedGradients (before any work)."""
import numbers

from fastml import _backend
from fastml.ops.integrated_gradients import quadrature


def is_adaptive(rtol, atol):
    """Adaptive mode: either tolerance turns it on (rtol None with atol > 0 means rtol = 0)."""
    return rtol is not None or atol > 0


def _is_int(value, low):
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


def check_options(*, n_steps, method, internal_batch_size, rtol, atol, max_steps, max_segments, backend):
    if method == "exact":
        if n_steps is not None:
            raise ValueError(f"n_steps must be None with method='exact' (it places one node per linear segment), "
                             f"got {n_steps!r}")
        if is_adaptive(rtol, atol):
            raise ValueError("rtol and atol must be left unset with method='exact' (it has no quadrature error)")
        if not _is_int(max_segments, 1):
            raise ValueError(f"max_segments must be an integer >= 1, got {max_segments!r}")
    else:
        quadrature.check_method(method, n_steps)
    if internal_batch_size is not None and not _is_int(internal_batch_size, 1):
        raise ValueError(f"internal_batch_size must be None or an integer >= 1, got {internal_batch_size!r}")
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not rtol >= 0):
        raise ValueError(f"rtol must be None or a number >= 0, got {rtol!r}")
    if isinstance(atol, bool) or not isinstance(atol, numbers.Real) or not atol >= 0:
        raise ValueError(f"atol must be a number >= 0, got {atol!r}")
    if is_adaptive(rtol, atol):
        if rtol == 0 and atol == 0:
            raise ValueError("rtol and atol cannot both be 0 (no rule meets a zero tolerance)")
        from fastml.ops.integrated_gradients.adaptive import first_pair_size

        first = first_pair_size(method, n_steps)
        if not _is_int(max_steps, first):
            raise ValueError(f"max_steps must be an integer >= {first} (the first rule and its nested extension "
                             f"for method={method!r}, n_steps={n_steps}), got {max_steps!r}")
    if not isinstance(backend, str) or backend not in _backend.BACKEND_NAMES + ("auto",):
        raise ValueError(f"backend must be 'auto' or one of {_backend.BACKEND_NAMES}, got {backend!r}")


def check_broadcast(baseline, x, bname, xname):
    """A baseline must sit on x's device and broadcast to x's shape exactly (x's shape unchanged)."""
    if baseline.device != x.device:
        raise ValueError(f"{bname} is on {baseline.device} but {xname} is on {x.device}")
    # Compared by hand: the first torch.broadcast_shapes call imports torch's symbolic-shape machinery (34 MB of
    # resident memory in a fresh process, more than IG itself needs on a small model).
    b, t = tuple(baseline.shape), tuple(x.shape)
    if len(b) > len(t) or any(m not in (1, n) for m, n in zip(reversed(b), reversed(t))):
        raise ValueError(f"{bname} of shape {list(baseline.shape)} does not broadcast to {xname} of shape "
                         f"{list(x.shape)}")
