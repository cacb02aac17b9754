"""Acceptance tests: two nodes and a witness in network namespaces (see rig.py)."""
