"""`python -m app jobs ...` against a fake of the gateway's jobs API (httpx.MockTransport)."""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.__main__ import main
from app.jobs import cli
from tests.support.apps import make_settings

GATEWAY = "http://localhost:8000"
Handler = Callable[[httpx.Request], httpx.Response]


def job(status: str, done: int, total: int = 3, **extra: Any) -> dict[str, Any]:
    """A job as `GET /api/jobs/{id}` answers it."""
    body = {"job_id": "j1", "status": status, "total": total, "done": done, "found": done}
    return body | {"not_found": 0, "failed": 0, "upstream_calls": 1, "eta_s": 2.0} | extra


def api_error(status: int, detail: str) -> httpx.Response:
    return httpx.Response(status, json={"error": "not_found", "detail": detail})


class FakeGateway:
    """Answers with `handler` and records every request it was sent."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.handler(request)


@pytest.fixture(autouse=True)
def _no_poll_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "POLL_INTERVAL_S", 0.0)


def run(
    tmp_path: Path, argv: list[str], handler: Handler, **settings: Any
) -> tuple[int, FakeGateway]:
    """Parse `jobs <argv>` with the real sub-parser and run it against the fake."""
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["jobs", *argv])
    fake = FakeGateway(handler)
    config = make_settings(tmp_path, gateway_url=GATEWAY, **settings)
    return cli.run(args, config, transport=httpx.MockTransport(fake)), fake


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_submit_file_sends_the_ids_as_text_and_prints_the_job_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("# users to crawl\n1\n\n  2  \n#3\n4\n")
    accepted = httpx.Response(202, json={"job_id": "j1", "status": "pending", "total": 3})
    argv = ["submit", str(ids), "--label", "nightly", "--priority", "high", "--max-age", "60"]

    code, fake = run(tmp_path, argv, lambda _: accepted, gateway_api_key="secret")

    assert code == 0
    assert capsys.readouterr().out == "j1\n"
    [request] = fake.requests
    assert (request.method, request.url.path) == ("POST", "/api/jobs")
    assert request.headers["Content-Type"] == "text/plain"
    assert request.headers["X-API-Key"] == "secret"
    assert request.content == b"1\n2\n4\n"
    assert dict(request.url.params) == {"label": "nightly", "priority": "high", "max_age_s": "60.0"}


def test_submit_from_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("7\n8\n"))
    accepted = httpx.Response(202, json={"job_id": "j2", "status": "pending", "total": 2})
    code, fake = run(tmp_path, ["submit", "-"], lambda _: accepted)
    assert (code, capsys.readouterr().out) == (0, "j2\n")
    assert fake.requests[0].content == b"7\n8\n"
    assert "X-API-Key" not in fake.requests[0].headers


def test_submit_range_sends_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    accepted = httpx.Response(202, json={"job_id": "j3", "status": "pending", "total": 100})
    argv = ["submit", "--range", "1", "100", "--callback-url", "http://hook.test/done"]
    code, fake = run(tmp_path, argv, lambda _: accepted)
    assert (code, capsys.readouterr().out) == (0, "j3\n")
    [request] = fake.requests
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {
        "id_range": [1, 100],
        "callback_url": "http://hook.test/done",
    }


@pytest.mark.parametrize("argv", [["submit"], ["submit", "ids.txt", "--range", "1", "2"]])
def test_submit_needs_exactly_one_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, fake = run(tmp_path, argv, lambda _: httpx.Response(500))
    assert (code, fake.requests) == (2, [])
    assert error_lines(capsys.readouterr().err) == [
        "error: give exactly one of FILE or --range A B"
    ]


def test_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, fake = run(
        tmp_path, ["submit", str(tmp_path / "nope.txt")], lambda _: httpx.Response(500)
    )
    assert (code, fake.requests) == (2, [])
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: cannot read ") and "No such file" in err


def test_main_dispatches_jobs(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m app jobs ...` reaches cli.run (a missing file fails before any request)."""
    assert main(["jobs", "submit", "nope.txt"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read nope.txt")


def polls(*statuses: dict[str, Any]) -> Handler:
    """Answers the job's GETs with `statuses` in turn, the last one from then on."""
    remaining = list(statuses)

    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json={"job_id": "j1", "status": "pending", "total": 3})
        return httpx.Response(200, json=remaining.pop(0) if len(remaining) > 1 else remaining[0])

    return handle


def test_status_wait_polls_until_completed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = polls(job("pending", 0), job("running", 1), job("completed", 3, eta_s=None))
    code, fake = run(tmp_path, ["status", "j1", "--wait"], handler)
    out, err = capsys.readouterr()
    assert code == 0
    assert [r.url.path for r in fake.requests] == ["/api/jobs/j1"] * 3
    assert "job j1: completed" in out and "progress: 3/3" in out
    assert error_lines(err) == []


def test_submit_wait_exits_1_when_the_job_is_cancelled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = polls(job("running", 1), job("cancelled", 1))
    code, fake = run(tmp_path, ["submit", "--range", "1", "3", "--wait"], handler)
    out, err = capsys.readouterr()
    assert code == 1
    assert out == "j1\n"  # only the id, even with --wait
    assert error_lines(err) == ["error: job j1 cancelled"]
    assert len(fake.requests) == 3


def test_wait_is_bounded_by_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, fake = run(
        tmp_path, ["status", "j1", "--wait", "--timeout", "0"], polls(job("running", 1))
    )
    assert code == 1
    assert error_lines(capsys.readouterr().err) == ["error: timed out waiting for job"]
    assert len(fake.requests) == 1


def test_status_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run(tmp_path, ["status", "j1"], polls(job("running", 2)))
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines() == [
        "job j1: running",
        "progress: 2/3 (66.7%)",
        "found 2, not_found 0, failed 0",
        "upstream_calls 1, eta 2 s",
    ]


def test_an_api_error_prints_one_line_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = run(tmp_path, ["status", "x"], lambda _: api_error(404, "job 'x' not found"))
    out, err = capsys.readouterr()
    assert (code, out, err) == (1, "", "error: 404 job 'x' not found\n")


def test_an_unreachable_gateway_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    code, _ = run(tmp_path, ["list"], refuse)
    assert code == 3
    assert capsys.readouterr().err == (
        f"error: cannot reach the gateway at {GATEWAY} (ConnectError); check GATEWAY_URL\n"
    )


CSV = b"user_id,state,username\n1,found,user1\n2,not_found,\n3,found,user3\n"


def chunks(data: bytes, size: int = 7) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_results_streams_csv_to_a_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "results.csv"
    target.parent.mkdir()
    answer = httpx.Response(200, content=chunks(CSV), headers={"Content-Type": "text/csv"})
    argv = ["results", "j1", "-o", str(target), "--include-missing"]

    code, fake = run(tmp_path, argv, lambda _: answer)

    assert code == 0
    assert dict(fake.requests[0].url.params) == {"format": "csv", "include": "missing"}
    with target.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["user_id"], row["state"]) for row in rows] == [
        ("1", "found"),
        ("2", "not_found"),
        ("3", "found"),
    ]
    assert list(target.parent.iterdir()) == [target]  # no temp file left behind


def test_results_404_leaves_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out" / "results.csv"
    target.parent.mkdir()
    code, _ = run(tmp_path, ["results", "j9", "-o", str(target)], lambda _: api_error(404, "no j9"))
    assert code == 1
    assert capsys.readouterr().err == "error: 404 no j9\n"
    assert list(target.parent.iterdir()) == []


def test_a_broken_download_leaves_no_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "out" / "results.csv"
    target.parent.mkdir()

    def handle(request: httpx.Request) -> httpx.Response:
        def body() -> Iterator[bytes]:
            yield CSV[:20]
            raise httpx.ReadError("connection reset", request=request)

        return httpx.Response(200, content=body())

    code, _ = run(tmp_path, ["results", "j1", "-o", str(target)], handle)
    assert code == 1
    assert len(error_lines(capsys.readouterr().err)) == 1
    assert list(target.parent.iterdir()) == []


def test_results_json_is_one_array(tmp_path: Path) -> None:
    ndjson = b'{"user_id": 1, "state": "found"}\n\n{"user_id": 2, "state": "not_found"}\n'
    target = tmp_path / "results.json"
    code, fake = run(
        tmp_path,
        ["results", "j1", "--format", "json", "-o", str(target)],
        lambda _: httpx.Response(200, content=chunks(ndjson, 5)),
    )
    assert code == 0
    assert dict(fake.requests[0].url.params) == {"format": "ndjson"}
    assert [row["user_id"] for row in json.loads(target.read_text())] == [1, 2]


def test_results_ndjson_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ndjson = b'{"user_id": 1}\n{"user_id": 2}\n'
    answer = httpx.Response(200, content=ndjson)
    code, _ = run(tmp_path, ["results", "j1", "--format", "ndjson"], lambda _: answer)
    assert (code, capsys.readouterr().out) == (0, ndjson.decode())


def test_list_prints_a_table_of_the_first_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = {"jobs": [job("running", 1, label="nightly", created_at=0)], "next_cursor": "c2"}
    code, fake = run(tmp_path, ["list", "--status", "running", "--limit", "5"], polls(page))
    out = capsys.readouterr().out
    assert code == 0
    assert dict(fake.requests[0].url.params) == {"status": "running", "limit": "5"}
    assert len(fake.requests) == 1  # only the first page
    assert "j1" in out and "nightly" in out and "1/3" in out and "1970-01-01" in out


def test_cancel_prints_the_new_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    answer = httpx.Response(200, json=job("cancelled", 1))
    code, fake = run(tmp_path, ["cancel", "j1"], lambda _: answer)
    assert (code, capsys.readouterr().out) == (0, "cancelled\n")
    assert (fake.requests[0].method, fake.requests[0].url.path) == ("POST", "/api/jobs/j1/cancel")
