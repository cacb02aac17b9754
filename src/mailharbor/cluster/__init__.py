"""The cluster manager's sans-IO core: timings, heartbeats, the witness lease, fencing rules,
the decision function and the resource plan.

Nothing here does I/O or reads the clock: every method that needs the time takes ``now`` (the
monotonic clock, seconds), so heartbeat, lease and failover logic run in virtual time in tests.
The adapters (sockets, timers, subprocesses for fence agents) live in ``server/`` and the node
wiring; see docs/cluster.md.

The package re-exports nothing: import from the submodules (``cluster.decide``,
``cluster.heartbeat``, ``cluster.timing`` ...). config.py checks every configuration with
``cluster.timing`` (standard library only), and a CLI call must not load the decision
function, the witness and the replication state with it.
"""
