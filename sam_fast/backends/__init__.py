"""Backend registrations. Importing this package registers every backend it can."""

from .. import dispatch
from . import torch_ops

dispatch.register_backend("torch", torch_ops.OPS)
