"""Deployment settings: production refuses the embedded defaults and weak secrets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings, weak_secrets

STRONG = "k3-Vq9pL2xw7Zr"
URLS = {
    "database_url": f"postgresql+psycopg://app:{STRONG}@db:5432/prefix_rft",
    "broker_url": f"redis://:{STRONG}@redis:6379/0",
    "storage_url": "s3://bucket",
}


@pytest.fixture(autouse=True)
def s3_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", STRONG)


def test_production_starts_with_its_own_secrets(tmp_path):
    settings = Settings(environment="production", data_dir=tmp_path, **URLS)
    assert settings.database_url == URLS["database_url"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (
            {"database_url": "postgresql+psycopg://prefix:prefix@postgres:5432/x"},
            "PREFIX_RFT_DATABASE_URL has a development password",
        ),
        ({"database_url": "postgresql+psycopg://app@db:5432/x"}, "PREFIX_RFT_DATABASE_URL has no password"),
        ({"broker_url": "redis://redis:6379/0"}, "PREFIX_RFT_BROKER_URL has no password"),
        (
            {"broker_url": "amqp://guest:guest@rabbit:5672//"},
            "PREFIX_RFT_BROKER_URL has a development password",
        ),
        (
            {"broker_url": "redis://:prefix-rft-dev-secret@redis:6379/0"},
            "PREFIX_RFT_BROKER_URL has a development",
        ),
    ],
)
def test_production_refuses_a_weak_password(tmp_path, override, named):
    with pytest.raises(ValidationError, match=named):
        Settings(environment="production", data_dir=tmp_path, **{**URLS, **override})


def test_the_s3_key_is_needed_where_an_endpoint_is_named(monkeypatch: pytest.MonkeyPatch):
    urls = (URLS["database_url"], URLS["broker_url"], "s3://bucket")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "prefix-rft-dev-secret")
    assert weak_secrets(*urls, None) == ["AWS_SECRET_ACCESS_KEY is a development secret"]
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert weak_secrets(*urls, "http://minio:9000") == ["AWS_SECRET_ACCESS_KEY is empty"]
    assert weak_secrets(*urls, None) == []  # AWS itself: an instance role signs the requests
    assert weak_secrets("sqlite:////tmp/x.db", "filesystem://", "file:///tmp/objects", None) == []


def test_one_machine_keeps_its_embedded_defaults(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0")  # local: no checks
    assert settings.database_url.startswith("sqlite:///") and settings.storage_url.startswith("file://")
