"""mailharbor: a high-availability mail server on a replicated log-structured store."""

__version__ = "0.1.0"
