"""Push an exported checkpoint folder to the Hugging Face Hub.

`push_to_hub(folder, repo_id)` uploads a folder written by `mllm.export.export_model` with
`huggingface_hub.HfApi`: create the repo if missing, create the branch if a revision is given,
upload the folder as one commit (or a pull request). The folder is only ever read: whatever goes
wrong (offline mode, no token, no network, the hub refusing), the export stays intact and the
error says how to push it again later.

huggingface_hub comes with transformers; it is imported inside the functions, so importing
`mllm.export` never pays for it.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

# Seconds to wait for the hub to answer before calling the network unreachable. The hub client's
# own session has no timeout (uploads can be long), so without this probe a machine whose packets
# are dropped would wait for the OS connect timeout (~2 min) times the client's retries.
REACHABLE_TIMEOUT_S = 5.0
LOGIN_HELP = ("log in with `hf auth login` (`huggingface-cli login` in older huggingface_hub versions), "
              "set HF_TOKEN, or pass token=")


class HubPushError(RuntimeError):
    """Pushing an export failed for a reason the user can fix (offline, no token, no network, refused)."""


def retry_command(folder: Path, repo_id: str, *, private: bool, revision: str | None, create_pr: bool) -> str:
    """The `hf upload` command that pushes the same folder later."""
    args = ["hf", "upload", repo_id, str(folder), "."]
    args += ["--revision", revision] if revision else []
    args += ["--private"] * private + ["--create-pr"] * create_pr
    return shlex.join(args)


def is_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now, or as huggingface_hub read them at import."""
    from huggingface_hub import constants

    now = any(os.environ.get(key, "").upper() in ("1", "ON", "YES", "TRUE")
              for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return now or constants.HF_HUB_OFFLINE


def hub_endpoint() -> str:
    """HF_ENDPOINT as set now, else the endpoint huggingface_hub resolved at import."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def network_errors() -> tuple[type[BaseException], ...]:
    """What the hub client raises when a request fails: HTTP errors are OSErrors (HfHubHTTPError),
    transport errors come from its HTTP library (httpx2 for huggingface_hub 2.x, httpx for 1.x)."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def check_reachable(endpoint: str, retry: str, folder: Path) -> None:
    """One HEAD request with a short timeout; any HTTP answer (even an error status) counts as reachable."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=REACHABLE_TIMEOUT_S)
    except network_errors() as e:
        raise HubPushError(
            f"cannot reach the Hugging Face Hub at {endpoint} within {REACHABLE_TIMEOUT_S:g}s "
            f"({type(e).__name__}: {e}). Check the network (or HF_ENDPOINT); nothing was uploaded and the "
            f"export is intact at {folder}. Push it later with: {retry}"
        ) from e


def check_export_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise HubPushError(f"cannot push {folder}: no such folder. Pass the folder written by `mllm export`")
    if not (folder / "config.json").is_file():
        raise HubPushError(f"cannot push {folder}: it has no config.json, so it is not an exported checkpoint. "
                           "Pass the folder written by `mllm export`")
    return folder


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload an exported checkpoint folder to the hub model repo `repo_id`; returns the commit (or PR) URL.

    The repo is created if missing (private if `private`; otherwise the account's default visibility,
    so an organisation that defaults to private never gets a public repo by accident); `revision`
    names a branch, created from main if missing. `token` defaults to huggingface_hub's usual
    places (HF_TOKEN, then the token file written by `hf auth login`). Raises HubPushError, before
    any network call, when offline mode is on, no token is found or the hub does not answer.
    """
    folder = check_export_folder(folder)
    retry = retry_command(folder, repo_id, private=private, revision=revision, create_pr=create_pr)
    if is_offline():
        raise HubPushError(
            f"cannot push to the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE). "
            f"The export is intact at {folder}; push it later, with network access and offline mode off, "
            f"with: {retry}"
        )

    import huggingface_hub

    token = token or huggingface_hub.get_token()
    if not token:
        raise HubPushError(f"cannot push to the Hugging Face Hub: no token found; {LOGIN_HELP}. "
                           f"The export is intact at {folder}; then run: {retry}")
    endpoint = hub_endpoint()
    check_reachable(endpoint, retry, folder)

    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, token=token)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload {folder.name} exported with mllm", token=token,
        )
    except network_errors() as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = f" The hub refused the token: {LOGIN_HELP} (a token with write access)." if status in (401, 403) else ""
        raise HubPushError(f"pushing {folder} to {repo_id} on {endpoint} failed ({type(e).__name__}: {e}).{hint} "
                           f"The export is intact at {folder}; push it later with: {retry}") from e
    return commit.pr_url if create_pr and commit.pr_url else commit.commit_url
