"""Joining a Ray cluster that requires token authentication (Ray 2.60): where this process
would read the token from, and what to tell the user when the cluster refused it. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"
AUTH_TOKEN_VARIABLE = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
"""Where Ray looks for the token when neither variable is set (ray get-auth-token)."""


def token_source(environ: Mapping[str, str], *, home: Path) -> str | None:
    """Where Ray would read this process's cluster token from, or None when nowhere."""
    if environ.get(AUTH_TOKEN_VARIABLE):
        return AUTH_TOKEN_VARIABLE
    if environ.get(AUTH_TOKEN_PATH_VARIABLE):
        return f"{AUTH_TOKEN_PATH_VARIABLE} ({environ[AUTH_TOKEN_PATH_VARIABLE]})"
    default = home / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def auth_refusal_message(address: str, *, auth_mode: str | None, token: str | None) -> str:
    """What to set when the cluster at ``address`` refused this driver for want of its token
    (``auth_mode``: this process's RAY_AUTH_MODE; ``token``: :func:`token_source`)."""
    if (auth_mode or "").lower() != "token":
        why = (f"{AUTH_MODE_VARIABLE} is {auth_mode!r} here" if auth_mode else
               f"{AUTH_MODE_VARIABLE} is not set here") + \
            (", so no token was sent (Ray turns token mode on by itself only for a cluster it "
             "starts, never for a driver given an address" +
             (f"; {token} was not used)" if token else ")"))
    elif token is None:
        why = (f"{AUTH_MODE_VARIABLE}=token, but no token was found ({AUTH_TOKEN_VARIABLE}, "
               f"{AUTH_TOKEN_PATH_VARIABLE} and {DEFAULT_TOKEN_FILE} are all unset or empty)")
    else:
        why = f"the token from {token} is not this cluster's"
    return (f"the Ray cluster at {address} refused this driver: it requires token "
            f"authentication and {why}. Set {AUTH_MODE_VARIABLE}=token and the cluster's token "
            f"in {AUTH_TOKEN_VARIABLE} (or in a file named by {AUTH_TOKEN_PATH_VARIABLE}, by "
            f"default {DEFAULT_TOKEN_FILE}); `ray get-auth-token` on the head node prints it")


def refused_for_auth(error: BaseException) -> bool:
    """Ray raises its AuthenticationError, or a ConnectionError whose causes carry the
    GCS's InvalidAuthToken refusal as text."""
    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


