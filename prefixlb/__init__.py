"""prefixlb: a cache-aware, load-aware load balancer for self-hosted LLM inference."""

__version__ = "0.1.0"
__all__ = ["__version__"]
