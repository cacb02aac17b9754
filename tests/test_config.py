"""mailharbor.config: what a user writing mailharbor.toml sees."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailharbor.config import (
    ConfigError,
    GiB,
    KiB,
    MiB,
    default_config_text,
    format_size,
    load_config,
    new_node_id,
    parse_config_text,
    parse_duration,
    parse_size,
    render_template,
    schema_keys,
)

REPO = Path(__file__).resolve().parent.parent
NODE_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
MINIMAL = """
[node]
name = "mx1"
node_id = "00112233445566778899aabbccddeeff"
hostname = "mail.example.org"
"""
ACTIVE_NODE = {
    "node": {"name": "mx1", "node_id": NODE_ID.hex(), "hostname": "mail.example.org"},
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mailharbor.toml"
    path.write_text(text)
    return path


def template() -> str:
    return default_config_text(name="mx1", hostname="mail.example.org", node_id=NODE_ID)


def load_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value


# -- the template written by init -------------------------------------------------------------


def test_template_round_trips_through_load_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, template()))
    assert cfg.path == tmp_path / "mailharbor.toml"
    assert cfg.node.name == "mx1"
    assert cfg.node.node_id == NODE_ID
    assert cfg.node.node_id_hex == NODE_ID.hex()
    assert cfg.node.hostname == "mail.example.org"
    assert cfg.node.data_dir == tmp_path / "data"
    assert cfg.store.segment_bytes == 64 * MiB
    assert cfg.store.cache_bytes == 64 * MiB
    assert cfg.store.checkpoint_every_bytes == 64 * MiB
    assert cfg.store.chunk_bytes == 256 * KiB
    assert cfg.store.sync is True
    assert cfg.admin.socket == tmp_path / "data" / "admin.sock"
    assert cfg.tls.cert == tmp_path / "tls" / "cert.pem"
    assert cfg.tls.key == tmp_path / "tls" / "key.pem"
    assert cfg.auth.max_concurrent_checks == 2 * (os.cpu_count() or 1)
    assert cfg.auth.cache_seconds == 60.0
    assert cfg.log.level == "info"
    assert cfg.log.mail_log == tmp_path / "mail.log"


def test_template_equals_minimal_config(tmp_path: Path) -> None:
    a = load_config(write(tmp_path, template()))
    b = load_config(write(tmp_path, MINIMAL))
    assert a == b


def test_uncommenting_every_default_in_template_changes_nothing(tmp_path: Path) -> None:
    text = template()
    uncommented = re.sub(r"^# (\w+ = .*)$", r"\1", text, flags=re.MULTILINE)
    assert uncommented.count("\n") == text.count("\n")
    # every key of the schema is now written out explicitly
    keys_written = set(re.findall(r"^(\w+) = ", uncommented, flags=re.MULTILINE))
    assert {k.split(".")[1] for k in schema_keys()} <= keys_written
    assert load_config(write(tmp_path, uncommented)) == load_config(write(tmp_path, text))


def test_template_explains_every_key() -> None:
    text = template()
    blocks = text.split("\n\n")
    for key in schema_keys():
        name = key.split(".")[1]
        block = next(b for b in blocks if re.search(rf"^(# )?{name} = ", b, re.MULTILINE))
        comment = [line for line in block.splitlines() if line.startswith("# ")]
        assert len(" ".join(comment)) > 40, f"{key} is not explained"
        assert "Default:" in block or "Required." in block, key


def test_readme_documents_every_key() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [key for key in schema_keys() if f"`{key}`" not in readme]
    assert not missing, f"README.md configuration reference lacks {missing}"


# -- errors name the key ----------------------------------------------------------------------


def test_negative_size_names_key_expectation_and_value(tmp_path: Path) -> None:
    e = load_error(tmp_path, MINIMAL + "[store]\ncache_bytes = -5\n")
    assert str(e) == (
        f"{tmp_path / 'mailharbor.toml'}: store.cache_bytes: "
        "expected a size >= 1048576 (1MiB), got -5"
    )
    assert e.key == "store.cache_bytes"
    assert e.source == str(tmp_path / "mailharbor.toml")


def test_unknown_key_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    e = load_error(tmp_path, MINIMAL + "[store]\ncache_byte = 5\n")
    assert e.key == "store.cache_byte"
    assert "unknown key (did you mean cache_bytes?)" in str(e)


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    e = load_error(tmp_path, MINIMAL + "[smpt]\nlisten = []\n")
    assert e.key == "smpt"
    assert "unknown section" in e.problem


def test_unknown_top_level_key_lists_sections(tmp_path: Path) -> None:
    e = load_error(tmp_path, "debug = true\n" + MINIMAL)
    assert e.key == "debug"
    assert "known: node, store, admin, tls, auth, log" in e.problem


def test_missing_required_key(tmp_path: Path) -> None:
    e = load_error(tmp_path, MINIMAL.replace('name = "mx1"\n', ""))
    assert (e.key, e.problem) == ("node.name", "required key is missing")


def test_missing_node_section(tmp_path: Path) -> None:
    e = load_error(tmp_path, "[store]\nsync = true\n")
    assert e.key.startswith("node.")


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    e = load_error(tmp_path, "store = 5\n" + MINIMAL)
    assert e.key == "store"
    assert "expected a table" in e.problem


@pytest.mark.parametrize(
    ("section", "line", "key", "fragment"),
    [
        ("store", "sync = 1", "store.sync", "expected a boolean (true or false), got 1"),
        ("store", 'sync = "yes"', "store.sync", 'got "yes"'),
        ("store", "segment_bytes = true", "store.segment_bytes", "expected a size"),
        ("store", "segment_bytes = 1.5", "store.segment_bytes", "expected a size"),
        ("store", 'segment_bytes = "64MB"', "store.segment_bytes", "KiB, MiB, GiB"),
        ("store", 'segment_bytes = "8TiB"', "store.segment_bytes", "between"),
        ("store", "segment_bytes = 1000", "store.segment_bytes", "between 1048576 (1MiB)"),
        ("store", 'chunk_bytes = "1KiB"', "store.chunk_bytes", "between 4096 (4KiB)"),
        ("store", "cache_bytes = []", "store.cache_bytes", "got []"),
        ("auth", "max_concurrent_checks = 0", "auth.max_concurrent_checks", "between 1 and"),
        ("auth", 'max_concurrent_checks = "4"', "auth.max_concurrent_checks", "an integer"),
        ("auth", "cache_seconds = -1", "auth.cache_seconds", "between 0s and 86400s"),
        ("auth", 'cache_seconds = "5"', "auth.cache_seconds", 'like "250ms"'),
        ("auth", 'cache_seconds = "5 sec"', "auth.cache_seconds", "expected a duration"),
        ("auth", "cache_seconds = nan", "auth.cache_seconds", "expected a duration"),
        ("auth", "cache_seconds = inf", "auth.cache_seconds", "expected a duration"),
        ("log", 'level = "verbose"', "log.level", 'one of "debug", "info"'),
        ("log", "mail_log = 3", "log.mail_log", 'or "-" for standard error'),
        ("tls", 'cert = ""', "tls.cert", "a path"),
        ("admin", "socket = 5", "admin.socket", "a path"),
    ],
)
def test_wrong_type_or_impossible_value_names_key(
    tmp_path: Path, section: str, line: str, key: str, fragment: str
) -> None:
    e = load_error(tmp_path, f"{MINIMAL}\n[{section}]\n{line}\n")
    assert e.key == key
    assert fragment in str(e)
    assert "\n" not in str(e)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('name = "Mx1"', "node.name"),
        ('name = "-mx"', "node.name"),
        ('name = "mx_1"', "node.name"),
        (f'name = "{"a" * 64}"', "node.name"),
        ('hostname = "mail example.org"', "node.hostname"),
        ('hostname = "mail..example.org"', "node.hostname"),
        ('hostname = ""', "node.hostname"),
        ('node_id = "0011"', "node.node_id"),
        ('node_id = "zz112233445566778899aabbccddeeff"', "node.node_id"),
        ("node_id = 5", "node.node_id"),
    ],
)
def test_bad_node_identity_is_refused(tmp_path: Path, line: str, key: str) -> None:
    field = line.split(" = ")[0]
    text = re.sub(rf"^{field} = .*$", line, MINIMAL, flags=re.MULTILINE)
    assert load_error(tmp_path, text).key == key


def test_chunk_must_be_smaller_than_segment(tmp_path: Path) -> None:
    e = load_error(tmp_path, MINIMAL + '[store]\nsegment_bytes = "1MiB"\nchunk_bytes = "1MiB"\n')
    assert e.key == "store.chunk_bytes"
    assert "smaller than store.segment_bytes (1MiB)" in e.problem


def test_admin_socket_path_longer_than_unix_limit_is_refused(tmp_path: Path) -> None:
    long = "/tmp/" + "x" * 120 + ".sock"
    e = load_error(tmp_path, MINIMAL + f'[admin]\nsocket = "{long}"\n')
    assert e.key == "admin.socket"
    assert "107" in e.problem


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    e = load_error(tmp_path, MINIMAL + "[store\n")
    assert "invalid TOML" in str(e)
    assert str(tmp_path) in str(e)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: No such file"):
        load_config(tmp_path / "nope.toml")


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.store.sync = False  # type: ignore[misc]


# -- values -----------------------------------------------------------------------------------


def test_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    text = MINIMAL.replace('hostname = "mail.example.org"', 'hostname = "h"\ndata_dir = "../var"')
    text += '[tls]\ncert = "/etc/ssl/mail.pem"\n[log]\nmail_log = "-"\n'
    cfg = load_config(write(sub, text))
    assert cfg.node.data_dir == sub / ".." / "var"
    assert cfg.admin.socket == sub / ".." / "var" / "admin.sock"
    assert cfg.tls.cert == Path("/etc/ssl/mail.pem")
    assert cfg.tls.key == sub / "tls" / "key.pem"
    assert cfg.log.mail_log is None


def test_relative_config_path_gives_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("mailharbor.toml")
    assert cfg.node.data_dir == tmp_path / "data"
    assert cfg.path.is_absolute()


def test_sizes_and_durations_in_the_file(tmp_path: Path) -> None:
    text = MINIMAL + (
        '[store]\nsegment_bytes = "1GiB"\ncache_bytes = 2097152\nchunk_bytes = "64 KiB"\n'
        'sync = false\n[auth]\ncache_seconds = "250ms"\nmax_concurrent_checks = 3\n'
    )
    cfg = parse_config_text(text, path=tmp_path / "m.toml")
    assert cfg.store.segment_bytes == GiB
    assert cfg.store.cache_bytes == 2 * MiB
    assert cfg.store.chunk_bytes == 64 * KiB
    assert cfg.store.sync is False
    assert cfg.auth.cache_seconds == 0.25
    assert cfg.auth.max_concurrent_checks == 3


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("512", 512),
        ("512B", 512),
        ("256KiB", 256 * KiB),
        ("64MiB", 64 * MiB),
        ("64mib", 64 * MiB),
        ("1GiB", GiB),
        ("2TiB", 2 * 1024 * GiB),
        (" 3 MiB ", 3 * MiB),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "MiB", "-1MiB", "1.5MiB", "64MB", "64M", "1 0KiB", "0x10"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@given(st.integers(min_value=0, max_value=2**50))
def test_format_size_round_trips(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["B", "KiB", "MiB", "GiB"]))
def test_size_units_multiply(n: int, unit: str) -> None:
    factor = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB}[unit]
    assert parse_size(f"{n}{unit}") == n * factor


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (1.5, 1.5),
        ("250ms", 0.25),
        ("5s", 5.0),
        ("0.5s", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
    ],
)
def test_parse_duration(value: int | float | str, seconds: float) -> None:
    assert math.isclose(parse_duration(value), seconds)


@pytest.mark.parametrize("value", ["5", "5sec", "ms", "-1s", "1d", math.nan, math.inf])
def test_parse_duration_refuses(value: float | str) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_new_node_ids_are_16_random_bytes() -> None:
    ids = {new_node_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 16 for i in ids)


def test_template_refuses_wrong_node_id_length() -> None:
    with pytest.raises(ValueError):
        default_config_text(name="a", hostname="h", node_id=b"short")


@given(st.text(min_size=1, max_size=40).filter(lambda s: "\0" not in s and s[0] != "~"))
def test_any_path_text_survives_the_template(value: str) -> None:
    text = render_template({**ACTIVE_NODE, "tls": {"cert": value}})
    cfg = parse_config_text(text, path=Path("/srv/mh/mailharbor.toml"))
    assert cfg.tls.cert == Path("/srv/mh") / value
