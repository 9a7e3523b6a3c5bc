"""What the jobs API takes and answers: the submission, a job's view, a page of results."""

from __future__ import annotations

import io
import itertools
import re
from typing import Annotated, Any, Literal, NoReturn

from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.config import Settings
from app.domain import UserRecord
from app.errors import InvalidRequest
from app.http.schemas.common import load_json, one_of
from app.http.schemas.users import MAX_AGE_S, MAX_USER_ID, UserId
from app.jobs.callback_url import CallbackRefused, parse
from app.jobs.model import Item, Priority

MAX_SEQ = MAX_USER_ID
"""The largest result cursor (an item's `seq`) a request may name: it fits every store's
64-bit integers (a larger one made SQLite raise OverflowError: a 500)."""
RESULT_COLUMNS = ("user_id", "status", "reason", *UserRecord._fields[1:])
"""The CSV header: the item, then the user as the store keeps it."""


# The text bodies, as the schema states them and the parser reads them: one id a line,
# blank lines and `#` comments skipped; a CSV's id is its first field, after an optional
# header row that starts with a letter.
ID = r"[1-9][0-9]{0,14}"
SKIP = re.compile(r"[ \t]*(?:#[^\r\n]*)?")
TEXT_ROW = re.compile(rf"[ \t]*{ID}[ \t]*")
CSV_ROW = re.compile(rf'[ \t]*(?:{ID}|"{ID}")[ \t]*(?:,[^\r\n]*)?')


def _lines(row: re.Pattern[str]) -> str:
    return rf"(?:{SKIP.pattern}\r?\n)*{row.pattern}(?:\r?\n(?:{row.pattern}|{SKIP.pattern}))*"


TEXT_PATTERN = rf"^{_lines(TEXT_ROW)}$"
CSV_PATTERN = rf"^(?:[A-Za-z_][^\r\n]*\r?\n)?{_lines(CSV_ROW)}$"
ONE_OF = "give either user_ids or id_range ([first, last]), not both"
CALLBACK_PATTERN = r"^https?://[A-Za-z0-9\[]"
"""An http(s) URL with a host: the schema says as much, the validator checks the rest."""


class JobOptions(BaseModel):
    """What every submission may add to its ids."""

    model_config = ConfigDict(extra="forbid")

    max_age_s: float | None = Field(
        None,
        ge=0,
        le=MAX_AGE_S,
        strict=True,
        description="Ids cached more recently than this count as done without a call "
        "(default CACHE_TTL_S; 0 fetches every id).",
    )
    callback_url: str | None = Field(
        None,
        max_length=2000,
        json_schema_extra={"pattern": CALLBACK_PATTERN},
        description="http(s) URL the final status is POSTed to, signed with WEBHOOK_SECRET. "
        "Its host must resolve to public addresses only (unless WEBHOOK_ALLOW_PRIVATE=true): "
        "a rule JSON Schema cannot state, answered 422.",
    )
    label: str | None = Field(None, max_length=200, strict=True)
    priority: Priority = "normal"

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        # As httpx will send it: `http://a\n/` or a port `abc` must not pass here and fail
        # in delivery. Where its host leads is checked at submission (app.jobs.service).
        if value is not None:
            try:
                parse(value)
            except CallbackRefused as exc:
                raise ValueError(str(exc)) from None
        return value


class JobRequest(JobOptions):
    """A job: a list of ids, or a range of ids (`[first, last]`, both included)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=one_of("user_ids", "id_range"))

    user_ids: list[UserId] | None = Field(None, min_length=1)
    id_range: Annotated[list[UserId], Field(min_length=2, max_length=2)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_given(cls, data: Any) -> Any:
        # Counted by key: {"user_ids": null, "id_range": [1, 2]} names both.
        if isinstance(data, dict):
            given = [name for name in ("user_ids", "id_range") if name in data]
            if len(given) != 1:
                raise ValueError(ONE_OF)
            if data[given[0]] is None:
                raise ValueError(f"{given[0]} must not be null")
        return data


class WebhookView(BaseModel):
    """Where the job's callback stands."""

    state: Literal["pending", "delivered", "failed"]
    attempts: int
    last_error: str | None = Field(
        None, description="Why the last attempt failed: shown to the job's own key and admins."
    )


class JobView(BaseModel):
    """A job as the API shows it."""

    job_id: str
    status: Literal["pending", "running", "completed", "failed", "cancelled"]
    label: str | None
    priority: Priority
    owner: str | None
    total: int
    done: int
    found: int
    not_found: int
    failed: int
    progress: float = Field(description="done / total, 0 to 1")
    upstream_calls: int = Field(description="Batched upstream calls its ids went out in.")
    eta_s: float | None = Field(
        description="Seconds until done, from the budget left (minute and hour) and its "
        "recent speed; null when it is not running."
    )
    max_age_s: float
    id_range: list[int] | None
    callback_url: str | None = Field(
        description="Shown to the job's own key and admins (null to others), with any "
        "credentials in it masked."
    )
    created_at: str
    started_at: str | None
    updated_at: str
    finished_at: str | None
    error: str | None
    webhook: WebhookView | None


class JobList(BaseModel):
    jobs: list[JobView]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page.")


class ResultItem(BaseModel):
    """One id of a job: `found` with its user, or `not_found` / `failed` with a reason."""

    user_id: int
    status: Literal["found", "not_found", "failed"]
    reason: str | None = None
    user: dict[str, Any] | None = Field(
        None, description="The user as POST /api/users shows it (null if since evicted)."
    )


class ResultPage(BaseModel):
    job_id: str
    items: list[ResultItem]
    next_cursor: str | None


class Deleted(BaseModel):
    job_id: str
    deleted: bool


def parse_json(body: bytes, settings: Settings) -> tuple[JobRequest, list[int] | range]:
    """A JSON submission and its ids (a list, or the range); InvalidRequest saying why."""
    data = load_json(body, status_code=422) if body else None
    if not isinstance(data, dict):
        raise InvalidRequest('the body must be a JSON object like {"user_ids": [1, 2, 3]}')
    listed = data.get("user_ids")
    if isinstance(listed, list) and len(listed) > settings.job_max_ids:
        too_many(len(listed), settings)  # before each of them is validated
    try:
        request = JobRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    if request.user_ids is not None:
        return request, check_ids(request.user_ids, settings)
    first, last = request.id_range or (0, 0)
    if first > last:
        raise InvalidRequest(f"id_range must be [first, last] with first <= last: {first} > {last}")
    if last - first + 1 > settings.job_max_range:
        raise InvalidRequest(
            f"id_range holds {last - first + 1} ids; at most JOB_MAX_RANGE={settings.job_max_range}"
        )
    return request, range(first, last + 1)


def parse_text(body: bytes, settings: Settings, *, csv: bool) -> list[int]:
    """Ids one per line, as TEXT_PATTERN / CSV_PATTERN say (the schema states the same).

    A byte-order mark (Excel and Notepad write one) is dropped. Reading stops at the id
    past JOB_MAX_IDS: two million lines of `1` are refused after the first 100 001.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidRequest("the body is not UTF-8 text") from None
    row = CSV_ROW if csv else TEXT_ROW
    # Line by line, never one list of them all: building that list of four million blank
    # lines is one C call that would hold the interpreter (and the event loop) for a while.
    lines = io.StringIO(text, newline="\n")
    first = lines.readline()
    header = csv and re.match("[A-Za-z_]", first) is not None
    ids: list[int] = []
    most = settings.job_max_ids
    rows = lines if header else itertools.chain([first], lines)
    for number, raw in enumerate(rows, 1 + header):
        line = raw.removesuffix("\n").removesuffix("\r")
        if row.fullmatch(line):
            ids.append(int(line.split(",", 1)[0].strip(' \t"')))
            if len(ids) > most:
                too_many(f"more than {most}", settings)
        elif not SKIP.fullmatch(line):
            raise InvalidRequest(
                f"line {number}: each line must be an id (1 to 15 digits, no leading zero)"
                f"{' and then other fields' if csv else ''}, not {line[:40]!r}"
            )
    if not ids:
        raise InvalidRequest("the body holds no ids: one id per line")
    return check_ids(ids, settings)


def check_ids(ids: list[int], settings: Settings) -> list[int]:
    """The ids without repeats, within JOB_MAX_IDS."""
    if len(ids) > settings.job_max_ids:
        too_many(len(ids), settings)
    return list(dict.fromkeys(ids))


def too_many(count: int | str, settings: Settings) -> NoReturn:
    raise InvalidRequest(
        f"a job holds at most JOB_MAX_IDS={settings.job_max_ids} ids (got {count}); "
        "use id_range for contiguous ids"
    )


def result_item(item: Item, user: UserRecord | None) -> dict[str, Any]:
    """One item of a job's results as JSON."""
    status = {1: "found", 2: "not_found"}.get(item.state, "failed")
    return {
        "user_id": item.user_id,
        "status": status,
        "reason": item.reason,
        "user": None if user is None else user.public(),
    }


def result_row(item: Item, user: UserRecord | None, *, guard: bool = True) -> list[Any]:
    """One item of a job's results as a CSV row (RESULT_COLUMNS); with `guard`, a text
    cell a spreadsheet would run as a formula starts with `'` (CSV_FORMULA_GUARD)."""
    data = result_item(item, None)
    public = user.public() if user is not None else {}
    row = [data["user_id"], data["status"], data["reason"] or ""] + [
        "" if public.get(name) is None else public[name] for name in RESULT_COLUMNS[3:]
    ]
    return [defused(cell) for cell in row] if guard else row


# OWASP's list: what Excel, LibreOffice and Google Sheets read as the start of a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def defused(cell: Any) -> Any:
    """A text cell that would start a formula, with a leading `'`; any other cell as is."""
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS):
        return "'" + cell
    return cell
