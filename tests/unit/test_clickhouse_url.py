"""Choosing and parsing the ClickHouse backend from FLYWHEEL_CLICKHOUSE_URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.runtime.clickhouse import open_clickhouse, parse_server_url
from services.runtime.errors import ConfigurationError

pytestmark = pytest.mark.unit


def test_full_url_is_parsed() -> None:
    address = parse_server_url("https://ops:s%3Acret@ch.internal:9443/flywheel_prod")
    assert (address.secure, address.host, address.port) == (True, "ch.internal", 9443)
    assert (address.username, address.password, address.database) == ("ops", "s:cret", "flywheel_prod")


@pytest.mark.parametrize(
    ("url", "port", "username", "database"),
    [
        ("http://localhost", 8123, "default", None),
        ("https://localhost/", 8443, "default", None),
        ("http://u@localhost:18123/db", 18123, "u", "db"),
    ],
)
def test_defaults(url: str, port: int, username: str, database: str | None) -> None:
    address = parse_server_url(url)
    assert (address.port, address.username, address.password, address.database) == (port, username, "", database)


def test_redacted_hides_the_password() -> None:
    address = parse_server_url("http://ops:hunter2@ch:8123/db")
    assert address.redacted == "http://ops:***@ch:8123/db"
    assert "hunter2" not in address.redacted


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("clickhouse://u:p@host:9000/db", "must use http or https"),
        ("tcp://host:9000", "must use http or https"),
        ("localhost:8123", "must use http or https"),
        ("http://host:notaport/db", "cannot be parsed"),
        ("http://host:99999/db", "cannot be parsed"),
        ("http:///db", "has no host"),
        ("http://host/db?secure=1", "no query string"),
        ("http://host/a/b", "one database name"),
        ("http://host/bad-name", "not a valid ClickHouse"),
    ],
)
def test_bad_urls_raise_one_actionable_line(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says) as caught:
        parse_server_url(url)
    assert "\n" not in str(caught.value)


def test_bad_url_message_never_shows_the_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_server_url("clickhouse://u:hunter2@host:9000/db")
    assert "hunter2" not in str(caught.value)


def test_unreachable_server_names_the_url_without_password(tmp_path: Path) -> None:
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    with pytest.raises(
        ConfigurationError, match=r"cannot reach ClickHouse at http://u:\*\*\*@127\.0\.0\.1:1/db"
    ) as caught:
        open_clickhouse("http://u:hunter2@127.0.0.1:1/db", tmp_path)
    assert "hunter2" not in str(caught.value)


def test_bad_database_name_is_refused_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a valid ClickHouse"):
        open_clickhouse(None, tmp_path, database="x; DROP TABLE y")
