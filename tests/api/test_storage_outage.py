"""An object store that goes away: the API answers 503 with Retry-After where it needs the store,
keeps answering where it does not, and recovers by itself when the store is back. The store is a
real S3 server (moto) that is stopped and started again on the same port."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from cli.launcher import stop_process
from service.settings import Settings
from service.storage import open_storage
from tests.conftest import ApiClient, free_port, start_moto

LINES = [json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) for a in range(4)]


def test_a_storage_outage_answers_503_and_passes_by_itself(
    tmp_path: Path, migrated_postgres: str, redis_url: str
):
    port, log = free_port(), tmp_path / "moto.log"
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=migrated_postgres,
        broker_url=redis_url,
        storage_url=f"s3://outage-{uuid.uuid4().hex[:12]}",
        s3_endpoint_url=f"http://127.0.0.1:{port}",
        reaper_seconds=0,
    )
    store = open_storage(settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url)
    moto = start_moto(port, log)
    api = ApiClient(settings)
    try:
        store.prepare()
        stored = api.upload(LINES)
        assert stored.status_code == 200, stored.text
        file_id = stored.json()["id"]

        stop_process(moto, grace=5)
        for refused in (api.upload(LINES), api.http.get(f"/v1/files/{file_id}/content")):
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "5"
            assert refused.json()["error"]["code"] == "storage_unavailable"
        # What needs no object answers as before; the refused upload left no row behind.
        listed = api.http.get("/v1/files")
        assert listed.status_code == 200 and [f["id"] for f in listed.json()["data"]] == [file_id]
        deleted = api.http.delete(f"/v1/files/{file_id}")  # the row goes; the object outlives the outage
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True

        moto = start_moto(port, log)  # back, empty (moto keeps nothing): the bucket as S3 keeps it
        store.prepare()
        again = api.upload(LINES)
        assert again.status_code == 200, again.text
        content = api.http.get(f"/v1/files/{again.json()['id']}/content")
        assert content.status_code == 200 and content.text.splitlines() == LINES
    finally:
        stop_process(moto, grace=5)
        api.http.close()
