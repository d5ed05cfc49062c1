"""Fused CPU and GPU kernels for ConvMixer networks.

Public API: FusedDepthwiseBlock, FusedConvActBN, ConvMixer, convert, available_backends, and the
functional ops dw_block / conv_act_bn; set_backend, set_cross_layer, set_sync_bn.
"""
import torch  # noqa: F401  (_C links against libtorch: torch must be loaded first)

from . import _build_stamp

try:
    from . import _C
except ImportError:  # not built: only the reference path runs (backends.py says why)
    _C = None
else:
    _build_stamp.check_extension(_C)  # a stale build fails here, with how to rebuild

from .backends import available_backends
from .conv_act_bn import FusedConvActBN, conv_act_bn
from .convert import ConversionReport, convert
from .dw_block import FusedDepthwiseBlock, dw_block
from ._library import PendingBN
from .model import ConvMixer, FusedSequential, set_backend, set_cross_layer, set_sync_bn

__version__ = "0.1.0"

__all__ = ["FusedDepthwiseBlock", "FusedConvActBN", "ConvMixer", "FusedSequential", "convert",
           "ConversionReport", "available_backends", "dw_block", "conv_act_bn", "set_backend", "set_cross_layer",
           "set_sync_bn", "PendingBN"]
