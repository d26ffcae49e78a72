"""A requeued run whose W&B run ID is still held by the killed job's wandb-core retries wandb.init
(pikv/logging.py `_init_retrying_in_use`) instead of failing the training."""

import pytest

from pikv.logging import _init_retrying_in_use


class ServerResponseError(Exception):  # the shape of wandb's internal error
    pass


def flaky_init(fail_times: int, message: str = "run ID be198c8e2cc3 is in use"):
    calls = []

    def init():
        calls.append(1)
        if len(calls) <= fail_times:
            raise ServerResponseError(message)
        return "run"
    return init, calls


def test_retries_while_the_run_id_is_in_use():
    init, calls = flaky_init(2)
    assert _init_retrying_in_use(init, wait_s=5, pause_s=0.01) == "run"
    assert len(calls) == 3


def test_gives_up_without_wandb_after_the_wait():
    init, calls = flaky_init(10 ** 6)
    assert _init_retrying_in_use(init, wait_s=0.05, pause_s=0.01) is None
    assert len(calls) >= 2


def test_other_errors_are_not_swallowed():
    init, calls = flaky_init(1, "permission denied: /runs/x/wandb")
    with pytest.raises(ServerResponseError, match="permission denied"):
        _init_retrying_in_use(init, wait_s=5, pause_s=0.01)
    assert len(calls) == 1
