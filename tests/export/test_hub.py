"""push_to_hub (mllm/export/hub.py), without the network.

The hub client is replaced at its boundary (HfApi methods and the shared HTTP session) by recorders,
so the tests check exactly what would be sent. The failure paths (offline mode, no token, no folder,
an unreachable or silent endpoint, the hub refusing) must raise HubPushError quickly and leave the
export folder byte-for-byte as it was; the unreachable ones run the real client against local ports.
"""

import socket
import time
from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError

from mllm.export.hub import REACHABLE_TIMEOUT_S, HubPushError, push_to_hub

COMMIT_URL = "https://huggingface.co/me/tiny-vlm/commit/0123abc"
PR_URL = "https://huggingface.co/me/tiny-vlm/discussions/1"


@pytest.fixture
def export(tmp_path):
    folder = tmp_path / "tiny-vlm"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llava"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n")
    return folder


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def no_ambient_credentials(monkeypatch, tmp_path):
    """Whatever the machine has configured (token file, HF_TOKEN, offline mode) must not leak in."""
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(monkeypatch):
    """Record every call the push makes to the hub client, in order."""
    calls = []

    def recorder(name, result=None):
        def record(*args, **kwargs):
            calls.append((name, args[1:] if args and isinstance(args[0], huggingface_hub.HfApi) else args, kwargs))
            return result
        return record

    commit = SimpleNamespace(commit_url=COMMIT_URL, pr_url=None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", recorder("create_repo"))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", recorder("create_branch"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", recorder("upload_folder", commit))
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: SimpleNamespace(head=recorder("head")))
    return SimpleNamespace(calls=calls, commit=commit)


def test_push_creates_repo_and_branch_then_uploads(hub, export, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    hub.commit.pr_url = PR_URL
    url = push_to_hub(export, "me/tiny-vlm", private=True, revision="v1", create_pr=True, commit_message="first")
    assert url == PR_URL
    assert [name for name, _, _ in hub.calls] == ["head", "create_repo", "create_branch", "upload_folder"]
    (_, head_args, head_kwargs), create, branch, upload = hub.calls
    assert head_args == (constants.ENDPOINT,) and head_kwargs == {"timeout": REACHABLE_TIMEOUT_S}
    assert create[1] == ("me/tiny-vlm",)
    assert create[2] == {"private": True, "exist_ok": True, "token": "hf_from_env"}
    assert branch[1] == ("me/tiny-vlm",)
    assert branch[2] == {"branch": "v1", "exist_ok": True, "token": "hf_from_env"}
    assert upload[2] == {"repo_id": "me/tiny-vlm", "folder_path": export, "revision": "v1", "create_pr": True,
                         "commit_message": "first", "token": "hf_from_env"}


def test_push_defaults_no_branch_account_visibility_explicit_token(hub, export, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert push_to_hub(export, "me/tiny-vlm", token="hf_explicit") == COMMIT_URL
    assert [name for name, _, _ in hub.calls] == ["head", "create_repo", "upload_folder"]
    _, create, upload = hub.calls
    # private=False leaves visibility to the account: an org that defaults to private stays private.
    assert create[2] == {"private": None, "exist_ok": True, "token": "hf_explicit"}
    assert upload[2]["revision"] is None and upload[2]["create_pr"] is False
    assert upload[2]["token"] == "hf_explicit" and "tiny-vlm" in upload[2]["commit_message"]


def test_token_file_is_used_when_env_is_empty(hub, export, monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("hf_from_file\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    push_to_hub(export, "me/tiny-vlm")
    assert {kwargs["token"] for name, _, kwargs in hub.calls if name != "head"} == {"hf_from_file"}


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "constants"])
def test_offline_mode_fails_before_any_call(hub, export, monkeypatch, how):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    if how == "constants":  # set before huggingface_hub was imported: only its constant knows
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setenv(how, "1")
    before = snapshot(export)
    with pytest.raises(HubPushError, match="offline") as error:
        push_to_hub(export, "me/tiny-vlm", revision="v1")
    assert f"intact at {export}" in str(error.value)
    assert f"hf upload me/tiny-vlm {export} . --revision v1" in str(error.value)
    assert hub.calls == [] and snapshot(export) == before


def test_missing_token_says_how_to_log_in(hub, export):
    before = snapshot(export)
    with pytest.raises(HubPushError, match=r"no token found.*hf auth login.*HF_TOKEN"):
        push_to_hub(export, "me/tiny-vlm")
    assert hub.calls == [] and snapshot(export) == before


def test_missing_folder_or_config_is_named(hub, export, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    missing = tmp_path / "nope"
    with pytest.raises(HubPushError, match=f"cannot push {missing}: no such folder"):
        push_to_hub(missing, "me/tiny-vlm")
    (export / "config.json").unlink()
    with pytest.raises(HubPushError, match=f"cannot push {export}: it has no config.json"):
        push_to_hub(export, "me/tiny-vlm")
    assert hub.calls == []


def test_hub_refusing_the_token_keeps_the_export(hub, export, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_read_only")
    response = httpx2.Response(401, request=httpx2.Request("POST", f"{constants.ENDPOINT}/api/repos/create"))

    def refuse(self, *args, **kwargs):
        raise HfHubHTTPError("401 Client Error: Unauthorized", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    before = snapshot(export)
    with pytest.raises(HubPushError, match=r"refused the token.*hf auth login.*intact at"):
        push_to_hub(export, "me/tiny-vlm")
    assert snapshot(export) == before


def test_connection_lost_during_upload_keeps_the_export(hub, export, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")

    def drop(self, *args, **kwargs):
        raise httpx2.ConnectError("connection reset by peer")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", drop)
    before = snapshot(export)
    with pytest.raises(HubPushError, match=r"ConnectError.*intact at .*hf upload me/tiny-vlm"):
        push_to_hub(export, "me/tiny-vlm")
    assert snapshot(export) == before


# ----------------------------------------------------------------------------- real client, local ports


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connections are refused


@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_unreachable_endpoint_fails_fast(export, monkeypatch, server):
    """No mocks: a refused connection fails at once, a server that never answers after the probe timeout."""
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    with socket.socket() as silent:
        if server == "silent":  # accepts connections (kernel backlog) but never answers
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            port = silent.getsockname()[1]
        else:
            port = closed_port()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        before = snapshot(export)
        start = time.monotonic()
        with pytest.raises(HubPushError, match=rf"cannot reach the Hugging Face Hub at http://127.0.0.1:{port}"):
            push_to_hub(export, "me/tiny-vlm")
        elapsed = time.monotonic() - start
    assert elapsed < REACHABLE_TIMEOUT_S + 5, elapsed
    assert snapshot(export) == before
