"""with_retries (RELIABILITY.md R11, R21): transient failures are retried within a deadline, permanent ones fail at
once; either way one clear error naming the URL."""

import pytest

from tape_pretrain.data import storage
from tape_pretrain.errors import StorageError


def failing(error: BaseException, times: int):
    calls = []

    def operation():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "ok"
    return operation, calls


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY_S", 0.0)


def test_transient_errors_are_retried_until_they_pass():
    operation, calls = failing(ConnectionResetError("reset by peer"), times=2)
    assert storage.with_retries(operation, "s3://bucket/key", attempts=4) == "ok"
    assert len(calls) == 3


def test_the_budget_ends_in_one_error_naming_the_url():
    operation, calls = failing(TimeoutError("timed out"), times=10)
    with pytest.raises(StorageError, match=r"s3://bucket/key: failed after 3 attempts in 0 s: TimeoutError"):
        storage.with_retries(operation, "s3://bucket/key", attempts=3)
    assert len(calls) == 3


def test_permission_denied_is_not_retried():
    operation, calls = failing(PermissionError("Access Denied"), times=10)
    with pytest.raises(StorageError, match=r"s3://bucket/key: permission denied \(not retried\): .*Access Denied"):
        storage.with_retries(operation, "s3://bucket/key", attempts=5)
    assert len(calls) == 1


def test_a_missing_object_passes_through_for_the_caller_to_handle():
    operation, calls = failing(FileNotFoundError("no such key"), times=10)
    with pytest.raises(FileNotFoundError):
        storage.with_retries(operation, "s3://bucket/key", attempts=5)
    assert len(calls) == 1


@pytest.mark.parametrize("error, reason", [
    (OSError(28, "No space left on device"), "no space left on device"),
    (OSError(30, "Read-only file system"), "read-only file system"),
    (OSError(22, "Invalid bucket name"), "invalid argument"),
])
def test_permanent_errors_fail_at_once(error, reason):
    operation, calls = failing(error, times=10)
    with pytest.raises(StorageError, match=f"{reason} \\(not retried\\)"):
        storage.with_retries(operation, "s3://bucket/key", attempts=5)
    assert len(calls) == 1


def test_client_errors_are_classified_by_status():
    from botocore.exceptions import ClientError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    operation, calls = failing(client_error("NoSuchBucket", 404), times=10)
    with pytest.raises(StorageError, match="NoSuchBucket"):
        storage.with_retries(operation, "s3://bucket/key", attempts=5)
    assert len(calls) == 1
    for transient in (client_error("SlowDown", 503), client_error("InternalError", 500),
                      client_error("Throttling", 400)):
        operation, calls = failing(transient, times=2)
        assert storage.with_retries(operation, "s3://bucket/key", attempts=5) == "ok" and len(calls) == 3


def test_the_deadline_bounds_the_retries(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY_S", 0.2)
    operation, calls = failing(ConnectionResetError("reset"), times=100)
    with pytest.raises(StorageError, match=r"failed after \d attempts in [01] s"):
        storage.with_retries(operation, "s3://bucket/key", attempts=100, deadline_s=1.0)
    assert 2 <= len(calls) <= 5


@pytest.fixture
def silent_endpoint():
    """A TCP server on loopback that accepts connections and never answers (bounded: closed after the test)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    server.close()


def test_a_silent_s3_endpoint_fails_within_the_deadline(silent_endpoint, cli_env):
    import subprocess
    import sys
    import time

    env = dict(cli_env, AWS_ENDPOINT_URL=silent_endpoint, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y",
               AWS_DEFAULT_REGION="us-east-1", TAPE_PRETRAIN_STORAGE_DEADLINE_S="6",
               TAPE_PRETRAIN_STORAGE_READ_TIMEOUT_S="1", TAPE_PRETRAIN_STORAGE_CONNECT_TIMEOUT_S="1")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "tape_pretrain.cli", "data", "verify", "s3://bucket/ds"], env=env,
                         capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert out.returncode == 2 and elapsed < 30, (elapsed, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: s3://bucket/ds") and "attempts in" in lines[0], lines
