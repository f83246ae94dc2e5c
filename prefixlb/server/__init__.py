"""The balancer's HTTP server: the request path (``http/``), the proxy (``balancer``), metrics."""

from .balancer import Balancer

__all__ = ["Balancer"]
