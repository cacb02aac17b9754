"""The message store: an append-only log of whole transactions with derived indexes.

See `mailharbor.store.store` for the theory of operation and docs/store.md for the formats.
"""

from mailharbor.store.ops import (
    AlreadyExists,
    Change,
    Conflict,
    Delivery,
    InvalidArgument,
    NotFound,
    StoreError,
)
from mailharbor.store.store import (
    BlobWriter,
    CommitEvent,
    CompactReport,
    CorruptLog,
    DurabilityBarrier,
    RecoveryReport,
    Store,
    StoreIOError,
    StoreLocked,
    StoreOptions,
    StoreReadOnly,
    StoreState,
    Transaction,
    blob_hash,
    check_mailbox_name,
    normalize_address,
    normalize_domain,
    open_store,
)

__all__ = [
    "AlreadyExists",
    "BlobWriter",
    "Change",
    "CommitEvent",
    "CompactReport",
    "Conflict",
    "CorruptLog",
    "Delivery",
    "DurabilityBarrier",
    "InvalidArgument",
    "NotFound",
    "RecoveryReport",
    "Store",
    "StoreError",
    "StoreIOError",
    "StoreLocked",
    "StoreOptions",
    "StoreReadOnly",
    "StoreState",
    "Transaction",
    "blob_hash",
    "check_mailbox_name",
    "normalize_address",
    "normalize_domain",
    "open_store",
]
