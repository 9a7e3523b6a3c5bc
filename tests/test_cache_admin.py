"""Cache administration under /api/cache/, and the old paths kept (deprecated) for one release."""

from __future__ import annotations

import pytest

from tests.support.apps import StartApp
from tests.support.freelancer import FakeFreelancer

OLD_TO_NEW = {
    ("delete", "/api/users/{user_id}"): "/api/cache/users/{user_id}",
    ("post", "/api/users/revalidate"): "/api/cache/revalidate",
}


async def test_evict_revalidate_and_clear_live_under_api_cache(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    await running.lookup(21)
    assert await running.gateway.wait_idle(5)
    evicted = await running.client.delete("/api/cache/users/21")
    assert evicted.status_code == 200
    assert evicted.json() == {"user_id": 21, "evicted": True}
    assert "deprecation" not in evicted.headers
    assert await running.gateway.store.get_many([21]) == {}
    queued = await running.client.post("/api/cache/revalidate", json={"user_ids": [21, 22, 21]})
    assert (queued.status_code, queued.json()) == (202, {"queued": 2})
    assert "deprecation" not in queued.headers
    assert await running.gateway.wait_idle(5)
    assert freelancer.lookups == {21: 2, 22: 1}
    cleared = await running.client.post("/api/cache/clear-expired")
    assert (cleared.status_code, cleared.json()) == (200, {"removed": 0})


async def test_the_old_evict_path_still_evicts_and_says_it_is_deprecated(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    await running.lookup(31)
    assert await running.gateway.wait_idle(5)
    response = await running.client.delete("/api/users/31")
    assert response.status_code == 200
    assert response.json() == {"user_id": 31, "evicted": True}
    assert response.headers["deprecation"] == "true"
    assert response.headers["link"] == '</api/cache/users/31>; rel="successor-version"'
    assert await running.gateway.store.get_many([31]) == {}


async def test_the_old_revalidate_path_still_queues_and_says_it_is_deprecated(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    response = await running.client.post("/api/users/revalidate", json={"user_ids": [41]})
    assert response.status_code == 202
    assert response.json() == {"queued": 1}
    assert response.headers["deprecation"] == "true"
    assert response.headers["link"] == '</api/cache/revalidate>; rel="successor-version"'
    assert await running.gateway.wait_idle(5)
    assert freelancer.lookups == {41: 1}


@pytest.mark.parametrize(
    ("method", "path", "body", "successor"),
    [
        ("DELETE", "/api/users/abc", None, "/api/cache/users/abc"),
        ("POST", "/api/users/revalidate", {}, "/api/cache/revalidate"),
    ],
)
async def test_old_paths_say_they_are_deprecated_when_refusing_too(
    start_app: StartApp,
    freelancer: FakeFreelancer,
    method: str,
    path: str,
    body: object,
    successor: str,
) -> None:
    running = await start_app()
    response = await running.client.request(method, path, json=body)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"
    assert response.headers["deprecation"] == "true"
    assert response.headers["link"] == f'<{successor}>; rel="successor-version"'


async def test_the_schema_marks_old_paths_deprecated_and_documents_their_headers(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    paths = (await running.client.get("/openapi.json")).json()["paths"]
    for (method, old), new in OLD_TO_NEW.items():
        operation = paths[old][method]
        assert operation["deprecated"] is True
        assert new in operation["summary"]
        success = next(v for k, v in operation["responses"].items() if k.startswith("2"))
        assert set(success["headers"]) == {"Deprecation", "Link"}
        assert "deprecated" not in paths[new][method]
    assert "deprecated" not in paths["/api/users/{user_id}"]["get"]
    assert "deprecated" not in paths["/api/cache/clear-expired"]["post"]


async def test_the_schema_links_a_lookup_to_the_users_own_operations(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    schema = (await running.client.get("/openapi.json")).json()
    operation_ids = {op["operationId"] for ops in schema["paths"].values() for op in ops.values()}
    links = schema["paths"]["/api/users"]["post"]["responses"]["200"]["links"]
    assert {link["operationId"] for link in links.values()} == {"lookup_user", "evict_user"}
    assert {link["operationId"] for link in links.values()} <= operation_ids
    for link in links.values():
        assert link["parameters"] == {"user_id": "$response.body#/users/0/user_id"}
