"""`python -m app [serve|check|jobs]`: run the gateway, test the Freelancer credentials, or
manage crawl jobs on a running gateway."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from typing import Any

import uvicorn

from app.config import Settings
from app.errors import (
    ConfigError,
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UserNotFound,
)
from app.jobs import cli as jobs_cli
from app.logs import configure_logging
from app.upstream import FreelancerClient, create_http_client

CHECK_USER_ID = 1


def serve(settings: Settings) -> None:
    """Serve on HOST:PORT with WORKERS processes until SIGINT/SIGTERM."""
    from app.main import create_app

    configure_logging(settings.log_level, force=True, fmt=settings.log_format)
    if settings.workers > 1 and settings.redis_url is None:
        raise ConfigError(
            f"WORKERS={settings.workers} needs REDIS_URL: without it each process fetches "
            "and budgets on its own, so an id can be fetched once per process and the "
            "Freelancer budget is spent WORKERS times over"
        )
    application = create_app(settings)  # checks the settings before any worker starts
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": int(settings.shutdown_grace_s) or None,
        # X-Forwarded-For names the client only from FORWARDED_ALLOW_IPS (uvicorn's own
        # default trusts loopback, which lets any local caller pick its name).
        "proxy_headers": bool(settings.forwarded_allow_ips),
        "forwarded_allow_ips": settings.forwarded_allow_ips or "",
    }
    if settings.workers > 1:
        # Each worker imports `app.main:app`, which builds its app from the same settings.
        uvicorn.run("app.main:app", workers=settings.workers, **common)
        return
    # Everything imported and built so far lives as long as the process: move it out of
    # the cyclic GC's sight, so full collections scan only what requests create.
    gc.collect()
    gc.freeze()
    uvicorn.run(application, **common)


async def check(settings: Settings, user_id: int) -> int:
    """Call Freelancer once and print a one-line verdict; 0 when it answered."""
    token = settings.freelancer_oauth_token is not None
    client_id = settings.freelancer_client_id is not None
    if token:
        print("credentials: FREELANCER_OAUTH_TOKEN is set")
    elif client_id:
        print("credentials: FREELANCER_CLIENT_ID is set (no OAuth token)")
    elif settings.freelancer_api_base is None:
        print(
            "FAIL not configured: set FREELANCER_OAUTH_TOKEN (or FREELANCER_CLIENT_ID) in the "
            "environment or .env; without them the gateway runs in demo mode on its simulator"
        )
        return 2
    else:
        print("credentials: none set; calling FREELANCER_API_BASE without them")
    print(f"calling {settings.upstream_base}/{user_id}/ ...")
    async with create_http_client(settings) as http:
        client = FreelancerClient(http, base_url=settings.upstream_base)
        try:
            user = await client.fetch_user(user_id)
        except UserNotFound:
            print(f"OK Freelancer answered (user {user_id} does not exist)")
            return 0
        except UpstreamAuthError as exc:
            if "401" in exc.message:
                print(f"FAIL 401: the token is invalid or expired ({exc.message})")
            else:
                print(f"FAIL 403: the token lacks permissions or is rate limited ({exc.message})")
            return 1
        except UpstreamRateLimited as exc:
            print(f"FAIL 429: rate limited; retry after {exc.retry_after:.0f} s")
            return 1
        except (UpstreamConnectError, UpstreamTimeout) as exc:
            print(f"FAIL network: {exc.message}; check the network and FREELANCER_API_BASE")
            return 1
        except UpstreamError as exc:
            print(f"FAIL upstream: {exc.message}")
            return 1
    print(f"OK Freelancer answered: user {user.user_id} is {user.username!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it."""
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the gateway (the default)")
    check_cmd = commands.add_parser("check", help="test the Freelancer credentials")
    check_cmd.add_argument("--user-id", type=int, default=CHECK_USER_ID)
    jobs_cli.add_parser(commands)
    args = parser.parse_args(argv)
    settings = Settings()
    if args.command == "check":
        return asyncio.run(check(settings, args.user_id))
    if args.command == "jobs":
        return jobs_cli.run(args, settings)
    try:
        serve(settings)
    except ConfigError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
