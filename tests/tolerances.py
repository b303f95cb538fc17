"""The one shared tolerance table: (rtol, atol) per dtype for comparing an implementation with its reference."""

import torch

TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def assert_close(actual, expected, dtype=None, scale: float = 1.0, msg: str = ""):
    """torch.testing.assert_close with the table's tolerance for ``dtype`` (default: actual's), times ``scale``."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual, expected.to(actual.dtype), rtol=rtol * scale, atol=atol * scale, msg=(lambda m: f"{msg}\n{m}")
    )
