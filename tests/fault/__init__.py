"""Disk-fault test harness: power loss (FUSE), ENOSPC (small file systems), EIO (strace).

A crash test, in short::

    from fault.powerloss_fs import History, PowerLossMount   # or: from .powerloss_fs import ...

    with PowerLossMount(backing_dir) as m:                    # needs root and /dev/fuse
        run_workload(m.mountpoint)                            # fsyncs happen here
        m.power_cut(dest, history_dir=hist)                   # dest: the state at the cut
    history = History(hist)
    for event in history.events:                              # k = 0 (mount), 1, 2, ...
        with history.materialized(event.k) as tree:           # state after sync event k
            reopen_and_check(tree)

See powerloss_fs.py for the crash model and disks.py for ENOSPC/EIO helpers.
"""
