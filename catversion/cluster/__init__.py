"""The library's Ray code, kept apart: joining Ray with filtered output (`output`), checking that the
cluster can hold a request (`resources`), Ray metric objects for the telemetry specs (`metrics`), and the
one module that touches Ray's private internals (`ray_internals`). The rest of catversion/ imports no Ray.

`pipelines/` and `serve/` use it; Ray itself is imported inside the functions, so importing this package
is cheap.
"""

from .metrics import ray_metric
from .output import connect, forward_line
from .resources import Request, autoscaler_node_types, check_resources, fits

__all__ = ["Request", "autoscaler_node_types", "check_resources", "connect", "fits", "forward_line", "ray_metric"]
