"""Job callbacks, received by real HTTP servers on loopback: signed, retried, not redirected;
only to public addresses (loopback receivers here with WEBHOOK_ALLOW_PRIVATE=true), checked
again at each attempt and connected to as checked; shown to their owner only."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from app.jobs import callback_url
from app.jobs.model import Job
from app.jobs.webhook import Webhooks, sign
from tests.support.apps import Running, StartApp, until
from tests.support.freelancer import FakeFreelancer, error_response
from tests.support.jobs import submit, wait_for
from tests.support.receiver import SECRET, Receiver, verify


async def test_a_finished_job_calls_back_signed_and_retries_until_it_is_taken(
    start_app: StartApp, freelancer: FakeFreelancer, receiver: Receiver
) -> None:
    receiver.answers = [302, 500]  # a redirect is not followed; a 500 is retried
    running = await start_app(webhook_secret=SECRET, webhook_allow_private=True)
    job = await submit(running, {"user_ids": [1, 2, 3], "callback_url": receiver.url})
    await wait_for(running, job["job_id"])
    deadline = time.monotonic() + 15
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = (await running.client.get(f"/api/jobs/{job['job_id']}")).json()
        if state["webhook"]["state"] != "pending":
            break
        await asyncio.sleep(0.05)
    assert state["webhook"] == {"state": "delivered", "attempts": 3, "last_error": None}
    assert len(receiver.received) == 3, "nothing went to /elsewhere"
    for headers, body in receiver.received:
        assert verify(headers, body)
        assert headers["X-Job-Id"] == job["job_id"]
        sent = orjson.loads(body)
        assert (sent["job_id"], sent["status"], sent["found"]) == (job["job_id"], "completed", 3)
    headers, body = receiver.received[-1]
    assert not verify(headers, body.replace(b'"found":3', b'"found":4')), "tampering shows"


def test_the_signature_is_stripes_scheme() -> None:
    body = b'{"job_id":"x"}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k", body, 1_700_000_000) == f"t=1700000000,v1={expected}"


# --- Where callbacks may go, and what they show -----------------------------------------

PUBLIC = "93.184.216.34"  # a public address; no test connects to it
KEYS = (
    "crawler:crawler-key-0123456789abcdef:crawl,reader:reader-key-0123456789abcdef,"
    "boss:admin-key-0123456789abcdef:admin"
)


@dataclass
class Names:
    """A resolver for the tests: each name answers its list of addresses in turn (the last
    one from then on); addresses and localhost resolve as the system does."""

    answers: dict[str, list[list[str]]] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> Names:
    state = Names()
    real = callback_url.resolve

    async def resolve(host: str, port: int) -> list[str]:
        state.asked.append(host)
        queue = state.answers.get(host)
        if queue is None:
            return await real(host, port)
        return queue.pop(0) if len(queue) > 1 else queue[0]

    monkeypatch.setattr(callback_url, "resolve", resolve)
    return state


async def webhook_of(running: Running, job_id: str, **headers: str) -> dict[str, Any]:
    """The job once its callback has been tried at least once (bounded)."""
    deadline = time.monotonic() + 15
    while True:
        job: dict[str, Any] = (
            await running.client.get(f"/api/jobs/{job_id}", headers=headers)
        ).json()
        if job["webhook"] is not None and job["webhook"]["attempts"] >= 1:
            return job
        assert time.monotonic() < deadline, f"no callback attempt: {job}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://172.16.5.4/",
        "http://192.168.1.1/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://240.0.0.1/",
        "http://2130706433/",  # 127.0.0.1 written as one number
        "http://[::ffff:127.0.0.1]/",
        "http://[fe80::1]/",
        "http://[fd00::1]/",
        "http://[2002:7f00:1::]/",  # 6to4 around 127.0.0.1
        "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",  # Teredo around 127.0.0.1
        "http://[64:ff9b::a00:1]/",  # NAT64 around 10.0.0.1
        "https://inside.test/hook",  # a name that resolves to a private address
        "https://half.test/hook",  # one public address and one private
    ],
)
async def test_callbacks_to_addresses_that_are_not_public_are_refused(
    start_app: StartApp, freelancer: FakeFreelancer, names: Names, url: str
) -> None:
    names.answers = {"inside.test": [["10.1.2.3"]], "half.test": [[PUBLIC, "127.0.0.1"]]}
    running = await start_app(webhook_secret=SECRET)
    for options in ({"json": {"user_ids": [1], "callback_url": url}},
                    {"params": {"callback_url": url}, "content": b"1\n",
                     "headers": {"content-type": "text/plain"}}):  # fmt: skip
        response = await running.client.post("/api/jobs", **options)
        assert response.status_code == 422, response.text
        assert "WEBHOOK_ALLOW_PRIVATE" in response.json()["detail"]
    assert (await running.client.get("/api/jobs")).json()["jobs"] == []


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://a\n/", "non-printable"),
        ("http://example.com:abc/", "port"),
        ("http://nowhere.test/", "does not resolve"),
        ("ftp://example.com/", "http or https"),
        ("http://93.184.216.34:0/", "port"),
        ("http://93.184.216.34:65536/", "port"),
    ],
)
async def test_callback_urls_that_cannot_be_sent_are_refused(
    start_app: StartApp, freelancer: FakeFreelancer, names: Names, url: str, says: str
) -> None:
    names.answers = {"nowhere.test": [[]]}
    running = await start_app(webhook_secret=SECRET)
    response = await running.client.post("/api/jobs", json={"user_ids": [1], "callback_url": url})
    assert response.status_code == 422, response.text
    assert says in response.json()["detail"]


async def test_a_public_callback_is_taken(
    start_app: StartApp, freelancer: FakeFreelancer, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_deliveries(self: Webhooks) -> None:  # nothing leaves this machine
        return None

    monkeypatch.setattr(Webhooks, "run", no_deliveries)
    names.answers = {"hooks.example": [[PUBLIC, "2606:2800:220:1:248:1893:25c8:1946"]]}
    running = await start_app(webhook_secret=SECRET)
    for url in (f"http://{PUBLIC}/hook", "https://hooks.example/hook"):
        job = await submit(running, {"user_ids": [1], "callback_url": url})
        assert job["callback_url"] == url


async def test_a_name_that_turns_private_after_submission_is_refused_at_send_time(
    start_app: StartApp, freelancer: FakeFreelancer, names: Names, receiver: Receiver
) -> None:
    """DNS rebinding: the name resolved to a public address when the job was submitted,
    then to the loopback receiver. The attempt checks again and does not connect."""
    port = receiver.url.split(":")[2].split("/")[0]
    names.answers = {"rebind.test": [[PUBLIC], ["127.0.0.1"]]}
    running = await start_app(webhook_secret=SECRET)
    job = await submit(
        running, {"user_ids": [1], "callback_url": f"http://rebind.test:{port}/hook"}
    )
    state = await webhook_of(running, job["job_id"])
    assert state["webhook"]["state"] == "pending"
    assert "127.0.0.1" in state["webhook"]["last_error"]
    assert "not a public address" in state["webhook"]["last_error"]
    assert receiver.received == []


async def test_an_attempt_connects_to_the_address_it_checked_under_the_urls_name(
    start_app: StartApp, freelancer: FakeFreelancer, names: Names, receiver: Receiver
) -> None:
    """The name resolves once per attempt, and the request goes to that address with the
    URL's own name as Host (the system resolver does not know `hooks.test` at all)."""
    port = receiver.url.split(":")[2].split("/")[0]
    names.answers = {"hooks.test": [["127.0.0.1"]]}
    running = await start_app(webhook_secret=SECRET, webhook_allow_private=True)
    job = await submit(running, {"user_ids": [1], "callback_url": f"http://hooks.test:{port}/h"})
    state = await webhook_of(running, job["job_id"])
    assert state["webhook"] == {"state": "delivered", "attempts": 1, "last_error": None}
    (headers, body), = receiver.received  # fmt: skip
    assert headers["Host"] == f"hooks.test:{port}"
    assert verify(headers, body)
    assert names.asked == ["hooks.test", "hooks.test"], "once at submission, once to send"


async def test_one_bad_callback_does_not_hold_up_the_others(
    start_app: StartApp, freelancer: FakeFreelancer, receiver: Receiver
) -> None:
    """Two jobs' callbacks are due, the one first in line with a URL httpx cannot send (a
    job stored before URLs were checked) and one whose attempt raises something no one
    expected: each is a failed attempt, saved, and the good callback still goes out."""
    running = await start_app(webhook_secret=SECRET, webhook_allow_private=True)
    now = time.time()
    for n, url in enumerate(("http://a\n/", "http://[::1:80/", receiver.url)):
        job = Job(
            job_id=f"{n:012x}{'0' * 16}",
            status="completed",
            priority="normal",
            total=0,
            materialised=0,
            owner="ip:127.0.0.1",
            callback_url=url,
            created_at=now,
            updated_at=now,
            finished_at=now,
            webhook="pending",
            webhook_next_at=now - 10 + n,
        )
        await running.runner.store.create(job, [])
    running.runner.webhooks.wake()
    good = await webhook_of(running, f"{2:012x}{'0' * 16}")
    assert good["webhook"]["state"] == "delivered"
    assert len(receiver.received) == 1
    for n in (0, 1):
        bad = await webhook_of(running, f"{n:012x}{'0' * 16}")
        assert bad["webhook"]["state"] == "pending", "it is tried again later"
        assert bad["webhook"]["last_error"]


async def test_callback_url_and_errors_show_to_the_owner_and_admins_with_credentials_masked(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """A read key that could see another key's callback errors would have a port scanner
    ("connection refused" here, an SSH banner there); credentials show to no one."""
    running = await start_app(webhook_secret=SECRET, webhook_allow_private=True, api_keys=KEYS)
    crawler = {"X-API-Key": "crawler-key-0123456789abcdef"}
    reader = {"X-API-Key": "reader-key-0123456789abcdef"}
    boss = {"X-API-Key": "admin-key-0123456789abcdef"}
    url = "http://hook-user:s3cret-pass@127.0.0.1:9/hook"  # nothing listens on port 9
    submitted = await submit(running, {"user_ids": [1], "callback_url": url}, headers=crawler)
    assert submitted["callback_url"] == "http://***@127.0.0.1:9/hook"
    job_id = submitted["job_id"]
    own = await webhook_of(running, job_id, **crawler)
    assert own["callback_url"] == "http://***@127.0.0.1:9/hook"
    assert own["webhook"]["last_error"]
    admin = (await running.client.get(f"/api/jobs/{job_id}", headers=boss)).json()
    assert admin["callback_url"] == own["callback_url"] and admin["webhook"]["last_error"]
    other = (await running.client.get(f"/api/jobs/{job_id}", headers=reader)).json()
    assert other["callback_url"] is None
    assert other["webhook"]["last_error"] is None and other["webhook"]["attempts"] >= 1
    listed = (await running.client.get("/api/jobs", headers=reader)).json()["jobs"]
    assert [j["callback_url"] for j in listed] == [None]
    for headers in (crawler, reader, boss):
        for path in (f"/api/jobs/{job_id}", "/api/jobs"):
            assert "s3cret" not in (await running.client.get(path, headers=headers)).text


@contextlib.asynccontextmanager
async def serve_raw(handler: Any) -> AsyncIterator[str]:
    """A loopback TCP server answering each connection with `handler`; its URL. Handlers
    still running at the end are cancelled and awaited (their sockets closed)."""
    running: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        running.add(task)
        try:
            await handler(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        server.close()
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await server.wait_closed()


async def test_an_attempt_has_one_deadline_and_reads_no_body(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """A receiver that trickles its answer a byte at a time never trips a per-read timeout,
    and one that answers with an endless body would be read for ever: an attempt ends at
    WEBHOOK_TIMEOUT_S all told, and only the status is read."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(100_000):  # bounded: about 6 GB if anyone read it all
                writer.write(b"10000\r\n" + b"x" * 65536 + b"\r\n")
                await writer.drain()

    async with serve_raw(trickle) as slow_url, serve_raw(endless) as big_url:
        running = await start_app(
            webhook_secret=SECRET, webhook_allow_private=True, webhook_timeout_s=1
        )
        started = time.monotonic()
        job = await submit(running, {"user_ids": [1], "callback_url": slow_url})
        state = await webhook_of(running, job["job_id"])
        assert "WEBHOOK_TIMEOUT_S=1" in state["webhook"]["last_error"]
        assert time.monotonic() - started < 3.5, "one deadline for the whole attempt"
        job = await submit(running, {"user_ids": [2], "callback_url": big_url})
        state = await webhook_of(running, job["job_id"])
        assert state["webhook"]["state"] == "delivered"


async def test_without_a_secret_the_schema_says_a_job_takes_no_callback(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """A request the schema allows is never refused for a reason it does not state."""
    running = await start_app()
    schema = (await running.client.get("/openapi.json")).json()
    submit_op = schema["paths"]["/api/jobs"]["post"]
    assert "callback_url" not in {p["name"] for p in submit_op["parameters"]}
    body = submit_op["requestBody"]["content"]["application/json"]["schema"]
    for branch in body["oneOf"]:
        assert branch["properties"]["callback_url"]["type"] == "null"
    refused = await running.client.post(
        "/api/jobs", json={"user_ids": [1], "callback_url": "http://93.184.216.34/"}
    )
    assert refused.status_code == 422 and "WEBHOOK_SECRET" in refused.json()["detail"]
    taken = await running.client.post("/api/jobs", json={"user_ids": [1], "callback_url": None})
    assert taken.status_code == 202
    with_secret = await start_app(webhook_secret=SECRET)
    schema = (await with_secret.client.get("/openapi.json")).json()
    names = {p["name"] for p in schema["paths"]["/api/jobs"]["post"]["parameters"]}
    assert "callback_url" in names


async def test_a_callback_outcome_does_not_undo_a_retry_that_reset_it(
    start_app: StartApp,
    freelancer: FakeFreelancer,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job's callback is on its way when its failed ids are retried (which resets the
    callback): the attempt's outcome, saved after, must not write the old state back."""
    running = await start_app(
        webhook_secret=SECRET, webhook_allow_private=True, job_max_attempts=1,
        error_ttl_s=0, breaker_failures=100, upstream_max_attempts=1,
    )  # fmt: skip
    store = running.runner.store
    saved: list[bool] = []
    update = store.update

    async def watched(job_id: str, changes: Any, **kwargs: Any) -> bool:
        changed = await update(job_id, changes, **kwargs)
        if changes.get("webhook_attempts"):  # an attempt's outcome
            saved.append(changed)
        return changed

    monkeypatch.setattr(store, "update", watched)
    receiver.hold = threading.Event()
    freelancer.always = error_response(500)
    job = await submit(running, {"user_ids": [1, 2, 3], "callback_url": receiver.url})
    url = f"/api/jobs/{job['job_id']}"
    assert (await wait_for(running, job["job_id"]))["failed"] == 3
    await until(lambda: len(receiver.received) == 1)  # the attempt is waiting for its answer
    freelancer.always = None
    freelancer.gate = asyncio.Event()  # the retried ids stay in flight meanwhile
    retried = await running.client.post(f"{url}/retry-failed")
    assert retried.status_code == 202 and retried.json()["webhook"] is None
    receiver.hold.set()  # the old attempt gets its 200 and saves its outcome
    await until(lambda: len(saved) == 1)
    assert saved == [False], "the outcome was not written over the reset"
    reset = (await running.client.get(url)).json()
    assert reset["webhook"] is None and reset["status"] in ("pending", "running")
    freelancer.gate.set()
    done = await wait_for(running, job["job_id"])
    assert (done["status"], done["found"]) == ("completed", 3)
    delivered = await webhook_of(running, job["job_id"])
    assert delivered["webhook"]["attempts"] == 1
    await until(lambda: len(receiver.received) == 2)
    assert orjson.loads(receiver.received[-1][1])["found"] == 3


@pytest.fixture
def tls_names(tmp_path: Any) -> dict[str, Any]:
    """Self-signed certificates for `hooks.test` and `other.test` (openssl's command line)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    made: dict[str, Any] = {}
    for name in ("hooks.test", "other.test"):
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
             "-addext", f"subjectAltName=DNS:{name}"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        made[name] = (cert, key)
    return made


async def test_an_https_callback_checks_the_urls_name_while_connecting_to_the_checked_address(
    start_app: StartApp,
    freelancer: FakeFreelancer,
    names: Names,
    tls_names: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The attempt connects to the address it resolved, and TLS still names the URL's
    host (SNI) and checks the certificate against it: a receiver whose certificate is
    for another name is a failed attempt."""
    trusted = ssl.create_default_context()
    for cert, _ in tls_names.values():
        trusted.load_verify_locations(cafile=str(cert))
    client = httpx.AsyncClient

    def trusting(*args: Any, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("verify", trusted)
        return client(*args, **kwargs)

    monkeypatch.setattr(httpx, "AsyncClient", trusting)
    seen: list[str | None] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        length = int(request.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    results = {}
    for served in ("hooks.test", "other.test"):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*map(str, tls_names[served]))
        context.sni_callback = lambda _sock, name, _context: seen.append(name)
        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        async with server:
            names.answers = {"hooks.test": [["127.0.0.1"]]}
            running = await start_app(webhook_secret=SECRET, webhook_allow_private=True)
            job = await submit(
                running, {"user_ids": [1], "callback_url": f"https://hooks.test:{port}/h"}
            )
            results[served] = (await webhook_of(running, job["job_id"]))["webhook"]
    assert results["hooks.test"] == {"state": "delivered", "attempts": 1, "last_error": None}
    assert seen[0] == "hooks.test", "the TLS server name is the URL's, not the address"
    assert results["other.test"]["state"] == "pending"
    assert "CERTIFICATE_VERIFY_FAILED" in results["other.test"]["last_error"]
