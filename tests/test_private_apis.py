"""Private APIs of other libraries that lightsheet still uses: each must be there, or fail here.

Each use has a one-line comment at its call with the measured reason. When a library
release removes or changes one, the code falls back (or breaks) quietly; these tests make
the change loud instead, so the fallback's cost is a decision, not a surprise.
"""

from __future__ import annotations

import numpy as np
import pytest


def test_scipy_pocketfft_binding_with_out_buffers():
    """`lightsheet.deconvolve.kernel` writes transforms into reused buffers through it."""
    from lightsheet.deconvolve.kernel import _pocketfft

    _pocketfft.cache_clear()
    pp = _pocketfft()
    assert pp is not None, (
        "scipy.fft._pocketfft.pypocketfft is gone or changed: deconvolution falls back to "
        "the public scipy.fft (about a third slower per transform on large blocks)"
    )
    for name in ("r2c", "c2c", "c2r"):
        assert callable(getattr(pp, name))


def test_torch_mkldnn_fused_convolution():
    """`lightsheet.unet.CpuUNet` runs each conv + ReLU as one oneDNN call."""
    torch = pytest.importorskip("torch")
    from lightsheet.unet import CpuUNet, UNet

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN: CpuUNet is not used")
    assert CpuUNet.available(), (
        "torch.ops.mkldnn._convolution_pointwise is gone: featurize falls back to the eager "
        "UNet (~1.7x slower on the CPU)"
    )
    net = UNet(depth=2, width=4, features=6).eval()
    x = torch.rand(1, 1, 24, 20)
    with torch.no_grad():
        np.testing.assert_allclose(CpuUNet(net)(x).numpy(), net(x).numpy(), atol=1e-5)


def test_zarr_wrapper_store_keeps_the_wrapped_store(tmp_path):
    """`lightsheet.io.omezarr.CompleteStore` names the wrapped local store in its errors."""
    from zarr.storage import LocalStore

    from lightsheet.io.omezarr import CompleteStore

    inner = LocalStore(tmp_path)
    store = CompleteStore(inner)
    assert store._store is inner, "zarr's WrapperStore no longer keeps `_store`"
    assert str(tmp_path) in str(store)


def test_dask_array_meta():
    """Stages build output metas from ``image._meta`` (NumPy or CuPy), as dask-image does."""
    import dask.array as da

    image = da.zeros((4, 4, 4), chunks=2, dtype=np.uint16)
    assert isinstance(image._meta, np.ndarray) and image._meta.dtype == np.uint16
