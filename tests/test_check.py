"""`python -m app check`: one call to Freelancer, one verdict per kind of failure."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import respx

from app.__main__ import check
from tests.support.apps import make_settings
from tests.support.freelancer import API, error_response, freelancer_user


@pytest.mark.parametrize(
    ("answer", "code", "verdict"),
    [
        (httpx.Response(200, json={"status": "success", "result": freelancer_user(1)}), 0, "OK"),
        (error_response(404), 0, "OK Freelancer answered (user 1 does not exist)"),
        (error_response(401), 1, "FAIL 401: the token is invalid or expired"),
        (error_response(403), 1, "FAIL 403: the token lacks permissions or is rate limited"),
        (error_response(429, headers={"Retry-After": "30"}), 1, "FAIL 429"),
        (error_response(500), 1, "FAIL upstream"),
    ],
)
async def test_check_prints_one_verdict(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    answer: httpx.Response,
    code: int,
    verdict: str,
) -> None:
    with respx.mock() as mock:
        route = mock.get(f"{API}/1/").mock(return_value=answer)
        assert await check(make_settings(tmp_path), 1) == code
    assert route.calls.last.request.headers["Freelancer-OAuth-V1"] == "test-token"
    out = capsys.readouterr().out
    assert verdict in out
    assert "test-token" not in out
