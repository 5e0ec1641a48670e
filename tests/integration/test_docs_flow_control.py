"""docs/flow-control.md runs as written: its python blocks, in order, in one namespace,
with the environment the text names (what they publish is recorded instead of sent)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.integration.support import Recorder

DOC = Path(__file__).resolve().parents[2] / "docs" / "flow-control.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_flow_control_doc_runs_as_written(database_url, redis_url, clean_db, monkeypatch,
                                              capsys):
    monkeypatch.setenv("DURABLE_CELERY_DATABASE_URL", database_url)
    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)
    found = blocks()
    assert len(found) == 7
    namespace: dict[str, object] = {"__name__": "flow_control_doc"}
    exec(compile(found[0], f"{DOC}:block1", "exec"), namespace)
    durable = namespace["durable"]
    Recorder().install(durable, monkeypatch)
    try:
        for n, block in enumerate(found[1:], start=2):
            exec(compile(block, f"{DOC}:block{n}", "exec"), namespace)
    finally:
        durable.close()
        namespace["app"].close()
    out = capsys.readouterr().out
    assert "waiting for a rate-limit token of card-provider-tenant[acme]" in out
    assert "try again in 3600 s" in out
    assert "queued behind live run" in out
