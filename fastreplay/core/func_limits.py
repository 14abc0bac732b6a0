"""Tell a limitation of torch.func apart from a bug.

vmap and forward-mode AD (jvp) do not cover every operation: an op without a batching rule, a
channels_last clone of a batched tensor, a custom autograd.Function without a ``vmap`` or
``jvp`` rule, an op without a forward-mode formula. Such a failure says "this model cannot be
transformed this way", and the replay and the multi-model training then take a slower path that
computes the same numbers (double backward, one model at a time). Anything else is a bug and
must surface, so the tests below match torch's own wording, not every RuntimeError.

The wording, as torch raises it (RuntimeError unless noted):

* ``NYI: Tensor.clone(memory_format) inside vmap is only supported with ...`` and
  ``NYI: querying is_contiguous inside of vmap for memory_format other than ...``
* ``Batching rule not implemented for aten::...``, ``... does not yet have a batching rule``
* ``You tried to vmap over F, but it does not have vmap support`` (custom Function)
* ``vmap: We do not (yet) support ...``, ``vmap: ... We don't support vmap over calling .item()``
* NotImplementedError: ``Trying to use forward AD with OP that does not support it ...``,
  ``You must implement the jvp function for custom autograd.Function to use it with forward
  mode AD``
* ``In order to use an autograd.Function with functorch transforms (vmap, grad, jvp, ...), it
  must override the setup_context staticmethod``
"""
from __future__ import annotations

_GAP_WORDS = ("nyi", "not supported", "not implemented", "do not support", "do not yet support",
              "don't support", "does not support", "vmap support")
# Not a bare "jvp": messages quote the names of the user's functions and classes.
_FORWARD_AD_WORDS = ("forward ad", "forward mode ad", "forward-mode ad")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (torch appends advice and links below it)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _says_unsupported(message: str) -> bool:
    return any(word in message for word in _GAP_WORDS)


def _needs_functorch_support(message: str) -> bool:
    """A custom autograd.Function that was not written for torch.func (any transform)."""
    return "functorch transforms" in message


def vmap_unsupported(exc: BaseException) -> bool:
    """True when ``exc``, raised inside torch.func.vmap, says vmap cannot batch an operation of
    the function (NotImplementedError, or torch's vmap wording above), not that the code is
    wrong (a shape mismatch, a device error, out of memory)."""
    if isinstance(exc, NotImplementedError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc).lower()
    return ("batching rule" in message or _needs_functorch_support(message)
            or ("vmap" in message and _says_unsupported(message)))


def forward_ad_unsupported(exc: BaseException) -> bool:
    """True when ``exc``, raised inside torch.func.jvp, says forward-mode AD has no formula for
    an operation of the function (NotImplementedError, or torch's forward-AD wording above)."""
    if isinstance(exc, NotImplementedError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc).lower()
    names_it = any(word in message for word in _FORWARD_AD_WORDS)
    return _needs_functorch_support(message) or (names_it and _says_unsupported(message))


def names_forward_ad(exc: BaseException) -> bool:
    """Whether ``exc`` is about forward-mode AD itself (then no vmapping of a jvp can help)."""
    message = str(exc).lower()
    return (_needs_functorch_support(message)
            or any(word in message for word in _FORWARD_AD_WORDS))
