"""Fixtures of the store's unit tests (helpers and constants are in `__init__.py`).

* `data_dir`: a fresh data directory under `tmp_path`;
* `open_store`: a factory `open_store(path=data_dir, options=small_options(), node=NODE)` that
  opens a real store and closes every store it opened at teardown (closing twice is a no-op);
* `store`: an open store (small options) with the domain `example.org`;
* `alice`: the GUID of account alice@example.org in `store`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mailharbor.store import Store, StoreOptions

from . import DOMAIN, NODE, PWHASH, OpenStore, small_options


@pytest.fixture
def data_dir(tmp_path: Path) -> str:
    d = tmp_path / "data"
    d.mkdir()
    return str(d)


@pytest.fixture
def open_store(data_dir: str) -> Iterator[OpenStore]:
    opened: list[Store] = []

    def _open(
        path: str | None = None, options: StoreOptions | None = None, node: bytes = NODE
    ) -> Store:
        st = Store.open(
            path or data_dir, node_id=node, options=options if options else small_options()
        )
        opened.append(st)
        return st

    yield _open
    for st in reversed(opened):
        st.close()


@pytest.fixture
def store(open_store: OpenStore) -> Store:
    st = open_store()
    with st.transaction() as t:
        t.add_domain(DOMAIN)
    return st


@pytest.fixture
def alice(store: Store) -> bytes:
    with store.transaction() as t:
        g = t.add_account(f"alice@{DOMAIN}", PWHASH)
    return g
