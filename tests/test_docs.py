"""The documentation: `/docs` and `/redoc` work offline, and every setting is documented."""

from __future__ import annotations

import re
import tomllib
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import SecretStr

from app.config import Settings
from app.http.docs import STATIC_URL
from app.main import create_app
from tests.support.apps import StartApp

ROOT = Path(__file__).resolve().parents[1]
BASE = "http://localhost:8000"

CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
}


class _AssetURLs(HTMLParser):
    """Collects every URL a page names in a src or href attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


def asset_urls(html: str) -> list[str]:
    parser = _AssetURLs()
    parser.feed(html)
    return parser.urls


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app without its lifespan: the docs pages need neither store nor Freelancer."""
    app = create_app(Settings(_env_file=None, sqlite_path=tmp_path / "users.db"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        yield client


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_page_loads_every_asset_from_the_app_itself(
    client: httpx.AsyncClient, page: str
) -> None:
    response = await client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text

    # Nothing the browser is told to load, or to link to, lives on another host.
    for absolute in re.findall(r"(?:https?:)?//[^\s\"'<>)]+", html):
        assert urlsplit(absolute).netloc in ("", "localhost:8000"), f"{page} names {absolute}"

    urls = asset_urls(html)
    suffixes = {Path(urlsplit(url).path).suffix for url in urls}
    assert ".js" in suffixes, f"{page} loads no script: {urls}"
    assert ".png" in suffixes, f"{page} names no favicon: {urls}"
    if page == "/docs":
        assert ".css" in suffixes, f"{page} loads no stylesheet: {urls}"
    for url in urls:
        absolute = urljoin(f"{BASE}{page}", url)
        assert urlsplit(absolute).netloc == "localhost:8000", f"{page} names {url}"
        asset = await client.get(absolute)
        assert asset.status_code == 200, f"{url}: {asset.status_code}"
        assert asset.content, f"{url} is empty"
        expected = CONTENT_TYPES[Path(urlsplit(url).path).suffix]
        assert asset.headers["content-type"].split(";")[0] in expected, (
            f"{url}: {asset.headers['content-type']}"
        )


async def test_swagger_ui_points_at_the_local_schema_and_redirect(
    client: httpx.AsyncClient,
) -> None:
    html = (await client.get("/docs")).text
    assert "url: '/openapi.json'" in html
    assert "'/docs/oauth2-redirect'" in html
    # No badge fetched from validator.swagger.io (it would send the schema's URL away).
    assert '"validatorUrl": null' in html
    redirect = await client.get("/docs/oauth2-redirect")
    assert redirect.status_code == 200
    assert "oauth2" in redirect.text.lower()
    assert (await client.get("/openapi.json")).status_code == 200


async def test_docs_routes_are_not_in_the_schema(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert not [p for p in paths if p.startswith(("/docs", "/redoc", "/static"))], paths


async def test_asset_requests_share_one_route_label_in_metrics(start_app: StartApp) -> None:
    running = await start_app()
    client = running.client
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "nope.js"):
        await client.get(f"{STATIC_URL}/{name}")
    metrics = (await client.get("/metrics")).text
    routes = set(re.findall(r'route="([^"]*)"', metrics))
    assert STATIC_URL in routes
    assert not [r for r in routes if r.startswith(STATIC_URL + "/")], routes


# --- Settings: every one in .env.template and in the README's Configuration table ------

SETTING_NAME = r"[A-Z][A-Z0-9_]*"


def template_settings() -> set[str]:
    """Names assigned in .env.template, commented out (unset by default) or not."""
    text = (ROOT / ".env.template").read_text()
    return set(re.findall(rf"^#?\s*({SETTING_NAME})=", text, flags=re.MULTILINE))


def readme_configuration_rows() -> list[tuple[list[str], list[str]]]:
    """(names, defaults) of each row of the README's Configuration table."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Configuration\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "README.md has no '## Configuration' section"
    rows = []
    for line in section.group(1).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3:
            continue
        names = re.findall(rf"`({SETTING_NAME})`", cells[0])
        if names:
            defaults = [d.strip().strip("`").strip() for d in cells[1].split(" / ")]
            rows.append((names, defaults))
    return rows


def documented_default(value: object) -> str:
    """A default as the README writes it."""
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, Path):
        return value.as_posix() if value.is_absolute() else f"./{value.as_posix()}"
    return str(value)


def test_every_setting_is_in_the_env_template_and_nothing_else() -> None:
    settings = {name.upper() for name in Settings.model_fields}
    documented = template_settings()
    assert not settings - documented, f"missing from .env.template: {sorted(settings - documented)}"
    assert not documented - settings, f"not settings: {sorted(documented - settings)}"


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    settings = {name.upper() for name in Settings.model_fields}
    rows = readme_configuration_rows()
    documented = {name for names, _ in rows for name in names}
    assert not settings - documented, (
        f"missing from README.md's Configuration table: {sorted(settings - documented)}"
    )
    assert not documented - settings, f"not settings: {sorted(documented - settings)}"
    defaults = Settings.model_construct()
    for names, cells in rows:
        assert len(names) == len(cells), f"README: one default per setting in {names}: {cells}"
        for name, cell in zip(names, cells, strict=True):
            expected = documented_default(getattr(defaults, name.lower()))
            # "unset" may be followed by what that means, e.g. "unset (Freelancer's API)".
            assert cell == expected or cell.startswith(f"{expected} "), (
                f"README says {name} defaults to {cell!r}; it is {expected!r}"
            )


# --- The locks: requirements.txt and requirements-dev.txt cover pyproject.toml -----------


def locked(path: Path) -> dict[str, str]:
    """Package name to pinned version; each pin must carry its hashes."""
    text = path.read_text()
    pins: dict[str, str] = {}
    for entry in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", entry)
        if match:
            name, version = canonicalize_name(match[1]), match[2]
            assert "--hash=sha256:" in entry, f"{path.name}: {name} has no hash"
            assert pins.get(name, version) == version, f"{path.name}: {name} pinned twice"
            pins[name] = version
    return pins


def test_the_locks_pin_every_dependency_of_pyproject() -> None:
    """Fails after a dependency is added to pyproject.toml without `make lock`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    app_lock, dev_lock = locked(ROOT / "requirements.txt"), locked(ROOT / "requirements-dev.txt")
    wanted: list[tuple[Requirement, list[dict[str, str]]]] = [
        (Requirement(r), [app_lock, dev_lock]) for r in project["dependencies"]
    ]
    wanted += [(Requirement(r), [dev_lock]) for r in project["optional-dependencies"]["dev"]]
    for requirement, locks in wanted:
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        for lock in locks:
            lock_name = "requirements.txt" if lock is app_lock else "requirements-dev.txt"
            assert name in lock, f"{name} is not in {lock_name}: run `make lock`"
            assert requirement.specifier.contains(lock[name], prereleases=True), (
                f"{lock_name} pins {name}=={lock[name]}, pyproject.toml wants "
                f"{requirement.specifier}: run `make lock`"
            )
    differ = {n: (v, dev_lock.get(n)) for n, v in app_lock.items() if dev_lock.get(n) != v}
    assert not differ, f"the dev lock must pin the app's packages at the same versions: {differ}"
