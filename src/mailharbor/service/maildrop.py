"""The POP3 maildrop: an account's INBOX as RFC 1939 sees it.

Theory of operation
-------------------
:meth:`Maildrop.open` takes the mailbox's in-use lock (:class:`MaildropLocks`, node-local, in
memory) and snapshots the INBOX from the store's index: per message its UID, size, body hash and
message GUID, in UID order. Message numbers are positions in that snapshot and never change
during the session; messages delivered later are not seen until the next login. The index only
shows durable transactions ("visibility follows durability"), so a snapshot never names a
message a failover could lose.

:meth:`Maildrop.update` is RFC 1939's UPDATE state: one store transaction expunges the UIDs of
the messages marked deleted, committed with group commit (durable on this node and, with
replication, on the peer) before it returns — the adapter sends ``+OK`` to QUIT only after that.

Invariants
----------
- At most one open maildrop per mailbox on this node: a second :meth:`Maildrop.open` raises
  :class:`MaildropInUse` until :meth:`Maildrop.close`. The lock is released exactly once, by
  ``close`` (adapters call it in ``finally``). IMAP sessions do not take it.
- The unique id (UIDL) of a message is its message GUID in lower-case hex: the same in every
  session, across restarts, failover and split-brain merge (the GUID travels with the message;
  UIDs may not).
- A message's size is the stored byte count. Delivery stores bodies with CRLF line ends (trace
  headers included), so that is the octet count a RETR sends before byte-stuffing.
- Nothing is removed except in :meth:`update`, and only the snapshot's UIDs that were marked.
  Messages expunged meanwhile by another session (IMAP) are handled: :meth:`message` raises
  :class:`MessageGone` for them and :meth:`update` ignores them (the store skips UIDs that no
  longer exist); a mailbox deleted meanwhile makes ``update`` a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mailharbor.store import NotFound, Store

__all__ = [
    "Maildrop",
    "MaildropError",
    "MaildropInUse",
    "MaildropLocks",
    "MaildropMessage",
    "MessageGone",
]


class MaildropError(Exception):
    """Base class of the maildrop's refusals (messages are for logs)."""


class MaildropInUse(MaildropError):
    """Another POP3 session on this node has the mailbox open (``-ERR [IN-USE]``)."""


class MessageGone(MaildropError):
    """The message was expunged by another session after the snapshot."""


class MaildropLocks:
    """The node-local in-use locks, by mailbox GUID."""

    def __init__(self) -> None:
        self._held: set[bytes] = set()

    def acquire(self, mailbox: bytes) -> bool:
        if mailbox in self._held:
            return False
        self._held.add(mailbox)
        return True

    def release(self, mailbox: bytes) -> None:
        self._held.discard(mailbox)

    def held(self, mailbox: bytes) -> bool:
        return mailbox in self._held

    def __len__(self) -> int:
        return len(self._held)


@dataclass(frozen=True, slots=True)
class MaildropMessage:
    """One message of the snapshot."""

    uid: int
    size: int
    blob: bytes  # body hash
    guid: bytes  # message GUID (16 bytes)

    @property
    def unique_id(self) -> str:
        return self.guid.hex()


class Maildrop:
    """An open maildrop (see the module docstring). Use :meth:`open`, then :meth:`close`."""

    def __init__(
        self,
        store: Store,
        locks: MaildropLocks,
        account: str,
        mailbox: bytes,
        messages: tuple[MaildropMessage, ...],
    ) -> None:
        self.store = store
        self.account = account
        self.mailbox = mailbox
        self.messages = messages
        self._locks = locks
        self._closed = False

    @classmethod
    def open(cls, store: Store, locks: MaildropLocks, account: str) -> Maildrop:
        """Lock and snapshot the INBOX of ``account`` (a canonical address).

        Raises :class:`MaildropInUse` when another session holds it, :class:`NotFound` when the
        account or its INBOX does not exist.
        """
        index = store.index
        acct = index.account_by_address(account)
        if acct is None:
            raise NotFound("no such account")
        mb = index.mailbox_by_name(acct.guid, "INBOX")
        if mb is None:
            raise NotFound("the account has no INBOX")
        if not locks.acquire(mb.guid):
            raise MaildropInUse(f"the INBOX of {account} is in use")
        try:
            hash_at = index.blobs.hash_at
            messages = tuple(
                MaildropMessage(mb.uids[i], mb.sizes[i], hash_at(mb.blobs[i]), mb.msg_guid(i))
                for i in range(len(mb))
            )
        except BaseException:
            locks.release(mb.guid)
            raise
        return cls(store, locks, acct.address, mb.guid, messages)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(m.size for m in self.messages)

    @property
    def unique_ids(self) -> tuple[str, ...]:
        return tuple(m.unique_id for m in self.messages)

    def message(self, index: int) -> bytes:
        """The stored message at 0-based ``index`` of the snapshot.

        Raises :class:`MessageGone` if another session expunged it meanwhile, IndexError for a
        bad index and the store's errors (StoreIOError for a body damaged on disk).
        """
        m = self.messages[index]
        mb = self.store.index.mailboxes.get(self.mailbox)
        if mb is None or mb.position(m.uid) is None:
            raise MessageGone(f"UID {m.uid} was expunged")
        try:
            return self.store.read_blob(m.blob)
        except NotFound:
            raise MessageGone(f"the body of UID {m.uid} is gone") from None

    async def update(self, deleted: Sequence[int]) -> int:
        """Expunge the messages at ``deleted`` (0-based snapshot indexes) in one transaction,
        durable before this returns. Returns how many were still there and are now removed.

        Raises the store's errors (StoreReadOnly, StoreIOError, …) when the commit fails; then
        nothing was removed.
        """
        uids = sorted({self.messages[i].uid for i in deleted})
        if not uids:
            return 0
        if self.store.index.mailboxes.get(self.mailbox) is None:
            return 0  # the mailbox was deleted meanwhile: its messages are gone already
        txn = self.store.transaction()
        change = txn.expunge(self.mailbox, uids)
        try:
            await txn.commit_async()
        except NotFound:
            return 0  # deleted between the check and the commit
        return len(change.uids)

    def close(self) -> None:
        """Release the in-use lock (idempotent)."""
        if not self._closed:
            self._closed = True
            self._locks.release(self.mailbox)
