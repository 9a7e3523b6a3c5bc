"""`python -m app jobs ...`: submit, watch, list, download and cancel crawl jobs over HTTP."""

from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx

from app.config import Settings
from app.jobs.model import FINISHED, STATUSES

POLL_INTERVAL_S = 1.0  # between two polls of `--wait` (tests set it to 0)
UNREACHABLE: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout)
UNREACHABLE += (httpx.UnsupportedProtocol, httpx.InvalidURL)  # a malformed GATEWAY_URL


class CliError(Exception):
    """A failure to report as one `error:` line: CliError(message, exit code)."""


def client(settings: Settings, transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """The HTTP client for the gateway at GATEWAY_URL, with GATEWAY_API_KEY when set."""
    key, url = settings.gateway_api_key, settings.gateway_url
    headers = {} if key is None else {"X-API-Key": key.get_secret_value()}
    return httpx.Client(base_url=url, headers=headers, timeout=30.0, transport=transport)


def add_parser(commands: Any) -> None:
    """Add `jobs` and its sub-commands to the `python -m app` sub-parsers."""
    jobs = commands.add_parser("jobs", help="submit, watch and fetch crawl jobs on a gateway")
    sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")
    submit = sub.add_parser("submit", help="submit a job; prints its id")
    submit.add_argument("file", nargs="?", metavar="FILE", help="ids, one a line ('-': stdin)")
    submit.add_argument("--range", nargs=2, type=int, metavar=("A", "B"), help="an id range")
    submit.add_argument("--label")
    submit.add_argument("--priority", choices=("high", "normal", "low"))
    submit.add_argument("--max-age", dest="max_age_s", type=float, metavar="SECONDS")
    submit.add_argument("--callback-url", metavar="U")
    status = sub.add_parser("status", help="show a job's progress")
    for waiter in (submit, status):
        waiter.add_argument("--wait", action="store_true", help="wait until the job ends")
        waiter.add_argument("--timeout", type=float, default=86400.0, metavar="S")
    listing = sub.add_parser("list", help="list jobs (the first page)")
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--limit", type=int, metavar="N")
    results = sub.add_parser("results", help="download a job's results")
    results.add_argument("--format", choices=("csv", "ndjson", "json"), default="csv")
    results.add_argument("-o", "--output", metavar="FILE", help="default: stdout")
    results.add_argument("--include-missing", action="store_true")
    cancel = sub.add_parser("cancel", help="cancel a job")
    for command in (status, results, cancel):
        command.add_argument("job", metavar="JOB")


def run(
    args: argparse.Namespace, settings: Settings, transport: httpx.BaseTransport | None = None
) -> int:
    """Run `jobs <command>`; every failure becomes one `error:` line on stderr and an exit code."""
    try:
        with client(settings, transport) as http:
            return int(COMMANDS[args.jobs_command](http, args))
    except CliError as exc:
        message, code = exc.args
    except UNREACHABLE as exc:
        where, kind = settings.gateway_url, type(exc).__name__
        message, code = f"cannot reach the gateway at {where} ({kind}); check GATEWAY_URL", 3
    except httpx.HTTPError as exc:
        message, code = f"request to the gateway failed ({type(exc).__name__}: {exc})", 1
    except OSError as exc:
        message, code = str(exc), 1
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return int(code)


def _path(job: str, tail: str = "") -> str:
    return f"/api/jobs/{quote(job, safe='')}{tail}"


def _json(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object; unless it is a 2xx, the API's `detail` as an error (exit 1)."""
    try:
        body = json.loads(response.read())
    except ValueError:
        body = None
    if not response.is_success:
        detail = body.get("detail") if isinstance(body, dict) else None
        detail = detail or response.reason_phrase or "request failed"
        text = detail if isinstance(detail, str) else json.dumps(detail)
        raise CliError(f"{response.status_code} {text}", 1)
    if not isinstance(body, dict):
        raise CliError(f"unexpected answer from the gateway ({response.status_code})", 1)
    return body


def _read_ids(name: str) -> bytes:
    """FILE's ids, one a line, without blank lines and `#` comments."""
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {name}: {getattr(exc, 'strerror', None) or exc}", 2) from exc
    ids = [id_ for line in text.splitlines() if (id_ := line.strip()) and id_[0] != "#"]
    if not ids:
        raise CliError(f"no ids in {name}", 2)
    return ("\n".join(ids) + "\n").encode()


def _submit(http: httpx.Client, args: argparse.Namespace) -> int:
    if (args.file is None) == (args.range is None):
        raise CliError("give exactly one of FILE or --range A B", 2)
    keys = ("label", "priority", "max_age_s", "callback_url")
    options = {key: value for key in keys if (value := getattr(args, key)) is not None}
    if args.range is not None:
        response = http.post("/api/jobs", json={"id_range": list(args.range), **options})
    else:
        body, headers = _read_ids(args.file), {"Content-Type": "text/plain"}
        response = http.post("/api/jobs", content=body, params=options, headers=headers)
    job_id = str(_json(response).get("job_id"))
    print(job_id, flush=True)
    return _wait(http, job_id, args.timeout) if args.wait else 0


def _summary(job: dict[str, Any]) -> str:
    done, total = job.get("done", 0), job.get("total", 0)
    share = f" ({100 * done / total:.1f}%)" if isinstance(total, int) and total > 0 else ""
    eta = "-" if job.get("eta_s") is None else f"{job['eta_s']:.0f} s"
    counts = ", ".join(f"{key} {job.get(key, 0)}" for key in ("found", "not_found", "failed"))
    return (
        f"job {job.get('job_id')}: {job.get('status')}\nprogress: {done}/{total}{share}\n"
        f"{counts}\nupstream_calls {job.get('upstream_calls', 0)}, eta {eta}"
    )


def _status(http: httpx.Client, args: argparse.Namespace) -> int:
    if args.wait:
        return _wait(http, args.job, args.timeout, summary=True)
    print(_summary(_json(http.get(_path(args.job)))))
    return 0


def _wait(http: httpx.Client, job_id: str, timeout_s: float, summary: bool = False) -> int:
    """Poll every POLL_INTERVAL_S, a progress bar on stderr, until the job ends; 0 if completed."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    deadline = time.monotonic() + timeout_s
    samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=10)
    rate_column, eta_column = TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[eta]}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, rate_column, eta_column, console=Console(stderr=True)) as progress:
        task = progress.add_task(f"job {job_id}", total=None, rate="", eta="")
        while True:
            job = _json(http.get(_path(job_id)))
            now, done = time.monotonic(), int(job.get("done") or 0)
            samples.append((now, done))
            (t0, done0), (t1, done1) = samples[0], samples[-1]
            rate = f"{(done1 - done0) / (t1 - t0):.1f} ids/s" if t1 > t0 else ""
            eta_s = job.get("eta_s")
            eta = f"ETA {timedelta(seconds=int(eta_s))}" if isinstance(eta_s, int | float) else ""
            progress.update(task, total=job.get("total"), completed=done, rate=rate, eta=eta)
            progress.update(task, description=f"job {job_id} {job.get('status')}")
            if job.get("status") in FINISHED:
                break
            if now >= deadline:
                raise CliError("timed out waiting for job", 1)
            time.sleep(max(0.0, min(POLL_INTERVAL_S, deadline - now)))
    if summary:
        print(_summary(job))
    if job.get("status") != "completed":
        reason = f": {job['error']}" if job.get("error") else ""
        raise CliError(f"job {job_id} {job.get('status')}{reason}", 1)
    return 0


def _list(http: httpx.Client, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Column, Table

    params = {k: v for k, v in (("status", args.status), ("limit", args.limit)) if v is not None}
    page = _json(http.get("/api/jobs", params=params))
    table = Table(Column("job_id", no_wrap=True), "status", "label", "done/total", "created_at")
    for job in page.get("jobs") or []:
        created = job.get("created_at")
        if isinstance(created, int | float):
            created = datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        done_total = f"{job.get('done', 0)}/{job.get('total', 0)}"
        row = (job.get("job_id"), job.get("status"), job.get("label"), done_total, created)
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    Console().print(table)
    return 0


@contextmanager
def _output(name: str | None) -> Iterator[IO[bytes]]:
    """stdout, or a temp file beside FILE renamed onto it on success (removed on failure)."""
    if name is None or name == "-":
        sys.stdout.flush()
        yield sys.stdout.buffer
        return
    temp = Path(name).with_name(f".{Path(name).name}.{secrets.token_hex(4)}.part")
    try:
        out = open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")  # noqa: SIM115
    except OSError as exc:
        raise CliError(f"cannot write {name}: {exc.strerror}", 2) from exc
    try:
        with out:
            yield out
        os.replace(temp, name)
    finally:
        temp.unlink(missing_ok=True)


def _results(http: httpx.Client, args: argparse.Namespace) -> int:
    params = {"format": "csv" if args.format == "csv" else "ndjson"}
    params |= {"include": "missing"} if args.include_missing else {}
    with http.stream("GET", _path(args.job, "/results"), params=params) as response:
        if not response.is_success:
            _json(response)  # raises the API's error before any file is created
        with _output(args.output) as out:
            if args.format != "json":
                out.writelines(response.iter_bytes())  # chunk by chunk, never all at once
                return 0
            out.write(b"[")  # one JSON array of the NDJSON stream's documents
            for n, line in enumerate(filter(None, map(str.strip, response.iter_lines()))):
                out.write((b",\n" if n else b"\n") + line.encode())
            out.write(b"\n]\n")
    return 0


def _cancel(http: httpx.Client, args: argparse.Namespace) -> int:
    print(_json(http.post(_path(args.job, "/cancel"))).get("status"))
    return 0


COMMANDS = dict(submit=_submit, status=_status, list=_list, results=_results, cancel=_cancel)
