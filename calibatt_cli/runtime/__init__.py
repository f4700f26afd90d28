"""The attention seam at run time: the sparse plan, the controllers that route each attention call, and
the fast path a family's processor takes on sparse steps."""

from .controllers import (
    AttentionController,
    Controller,
    DenseController,
    MassRecorder,
    RecordController,
    SparseController,
)
from .plan import SparsePlan, group_configs, plan_index, plan_tensors, record_tensors
from .processor import SparseLayer

__all__ = [
    "AttentionController",
    "Controller",
    "DenseController",
    "MassRecorder",
    "RecordController",
    "SparseController",
    "SparseLayer",
    "SparsePlan",
    "group_configs",
    "plan_index",
    "plan_tensors",
    "record_tensors",
]
