"""Sans-IO protocol engines: bytes in, events out, replies to bytes.

Nothing in this package does I/O, reads a clock or touches the store: engines get bytes from an
adapter (``mailharbor.server``), hand back frozen-dataclass events, and turn the application's
replies into bytes. Only the standard library may be imported here (``tests/test_import_rules.py``).
"""
