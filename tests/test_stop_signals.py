"""SIGINT and SIGTERM: :func:`clipret.runtime.catch_stop_signals` and the resume command line."""

from __future__ import annotations

import os
import signal

import pytest

from clipret import runtime


def send(signum: int) -> None:
    os.kill(os.getpid(), signum)  # Python runs the handler before os.kill returns to this frame's next line


def test_deferred_notes_the_first_signal_and_a_second_ctrl_c_stops_at_once(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with runtime.catch_stop_signals(defer=True) as request:
        send(signal.SIGTERM)
        assert request.signum == signal.SIGTERM  # noted, nothing raised: the caller stops at a safe point
        with pytest.raises(runtime.Interrupted) as stop:
            send(signal.SIGINT)
    assert stop.value.exit_code == 130 and stop.value.name == "SIGINT"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_deferred_under_torchrun_ignores_the_launchers_repeat(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with runtime.catch_stop_signals(defer=True) as request:
        send(signal.SIGINT)
        send(signal.SIGINT)  # torchrun passes on the Ctrl-C every rank already got
    assert request.signum == signal.SIGINT


def test_immediate_raises_with_the_signals_exit_code():
    with pytest.raises(runtime.Interrupted) as stop, runtime.catch_stop_signals(defer=False):
        send(signal.SIGTERM)
    assert stop.value.exit_code == 143 and isinstance(stop.value, KeyboardInterrupt)


def test_command_line_quotes_and_names_the_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runtime.command_line(["train", "--resume", "runs/my run"]) == "clipret train --resume 'runs/my run'"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert runtime.command_line(["train", "--resume", "r"]) == "torchrun --nproc_per_node 4 -m clipret train --resume r"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes: their rendezvous options are the user's
    assert runtime.command_line(["train", "--resume", "r"]) == "torchrun <the same options> -m clipret train --resume r"
