"""Local paths and Hub ids, told apart before any Hub call: a missing folder is said to be a missing path, a
malformed id is said to be one, and an unreachable Hub fails in seconds with the offline fix instead of minutes of
retries per file."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

OFFLINE_FIX = (
    "To use what is already in the Hugging Face cache, set HF_HUB_OFFLINE=1; or pass local folders instead of Hub ids."
)


def looks_like_path(value: str) -> bool:
    """Written as a path (`./x`, `../x`, `/x`, `~/x`, `x/y/z`, `x\\y`), which a Hub id ("org/name") never is."""
    return (
        value in (".", "..")
        or value.startswith(("./", "../", "/", "~", ".\\", "..\\"))
        or "\\" in value
        or value.count("/") > 1
        or os.path.isabs(value)
    )


def _close_folders(value: str) -> str:
    """' Did you mean ...?' naming existing folders beside the one that was meant, or ''."""
    path = Path(value).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return ""
    names = [p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    close = difflib.get_close_matches(path.name, names, n=3)
    return f" Did you mean {', '.join(repr(str(parent / name)) for name in close)}?" if close else ""


def check_path_or_hub_id(value: str, what: str) -> str:
    """`value` itself when it is an existing path or a well-formed Hub repo id; else a ValueError naming the fix.

    `what` names the argument in the message, e.g. "dataset" or "model".
    """
    if Path(value).expanduser().exists():
        return value
    if looks_like_path(value):
        raise ValueError(f"The {what} folder '{value}' does not exist; check the path.{_close_folders(value)}")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as error:
        raise ValueError(
            f"The {what} '{value}' is neither an existing folder nor a valid Hub repo id ({error}). Give a local "
            "folder or a Hub id such as 'org/name'."
        ) from None
    return value


class HubUnreachable(ValueError):
    """The Hub did not answer: the fix (HF_HUB_OFFLINE, local folders) is for whoever runs the program."""


def require_hub(repo_ids: list[str]) -> None:
    """Before the first Hub call for `repo_ids` (nothing when there are none or HF_HUB_OFFLINE is set): one request
    to the Hub with a 5 s timeout and no retry; unreachable -> `HubUnreachable` (a ValueError) with the offline fix."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if not repo_ids or constants.HF_HUB_OFFLINE:
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=5)  # any HTTP answer, even an error status, means reachable
    except Exception as error:  # the HTTP client's transport errors: no route, DNS, refused, timeout
        raise HubUnreachable(
            f"Cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(error).__name__}: {error}) to fetch "
            f"{', '.join(repr(r) for r in repo_ids[:3])}{' ...' if len(repo_ids) > 3 else ''}. {OFFLINE_FIX}"
        ) from None


__all__ = ["HubUnreachable", "OFFLINE_FIX", "check_path_or_hub_id", "looks_like_path", "require_hub"]
