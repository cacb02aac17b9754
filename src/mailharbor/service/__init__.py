"""Services between the protocol engines and the store: delivery, mailbox views, auth, quota."""
