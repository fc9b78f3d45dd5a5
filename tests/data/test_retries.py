"""with_retries: transient failures are retried, permanent ones fail at once with one clear error."""

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
    with pytest.raises(StorageError, match=r"s3://bucket/key: failed after 3 attempts: TimeoutError"):
        storage.with_retries(operation, "s3://bucket/key", attempts=3)
    assert len(calls) == 3


def test_permission_denied_is_not_retried():
    operation, calls = failing(PermissionError("Access Denied"), times=10)
    with pytest.raises(StorageError, match="s3://bucket/key: permission denied: Access Denied"):
        storage.with_retries(operation, "s3://bucket/key", attempts=5)
    assert len(calls) == 1


def test_a_missing_object_passes_through_for_the_caller_to_handle():
    operation, calls = failing(FileNotFoundError("no such key"), times=10)
    with pytest.raises(FileNotFoundError):
        storage.with_retries(operation, "s3://bucket/key", attempts=5)
    assert len(calls) == 1
