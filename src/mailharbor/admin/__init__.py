"""The admin interface: how the ``mailharbor`` CLI operates a node.

Theory of operation
-------------------
A running node listens on a Unix socket (``admin.socket``, default ``<data_dir>/admin.sock``) and
takes JSON-line commands (:mod:`.protocol`): domains, accounts, aliases, store figures,
compaction, status. The CLI (:mod:`mailharbor.cli.admin_cmds`) sends every command there while a
node runs. When no node answers, the CLI opens the store itself and runs *the same* handlers
(:func:`.server.execute`) in-process, so both paths validate, change and answer identically.

Invariants
----------
- **One writer per data directory.** The store's lock decides who may write; the admin socket is
  only created by the process that holds the lock (the node binds it after opening the store and
  removes it before closing the store), so an answering socket means a node owns the store, and
  a direct open is only attempted when nothing answers. A locked directory whose socket does not
  answer is reported as such, never forced.
- **Only the owner may talk to a node.** The socket is created mode 0600 and the server also
  checks the peer's uid (SO_PEERCRED): the node's own uid or root.
- **Bounded input, one-line errors.** Requests are size-limited and validated against a table of
  commands with typed argument schemas before any handler runs; every failure is answered with
  ``ok: false`` and one line (a store error's own message, or "internal error" for a bug, which
  is logged with its traceback in the node's log); no traceback ever crosses the socket.
- **Changes are serialized and durable.** Changing commands run one at a time in an ``async with
  store.transaction()`` (group commit) and are answered only after the commit is durable and
  visible; each is logged by the node (passwords never are).
- **The event loop never blocks on a password hash.** Argon2 runs in a worker thread, a bounded
  number at a time.
"""

from mailharbor.admin.protocol import COMMANDS, Request, RequestError, Response

__all__ = ["COMMANDS", "Request", "RequestError", "Response"]
