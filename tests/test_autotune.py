"""The launch-parameter autotuner: defaults where it must not time, the fastest candidate where it may,
choices kept on disk for a resumed job, candidates that cannot launch never chosen."""

from __future__ import annotations

import json

import pytest
import torch
from triton.runtime.errors import OutOfResources

from defocus_scale.kernels import autotune

CANDIDATES = [{"warps": 1, "split": 1}, {"warps": 2, "split": 4}, {"warps": 4, "split": 2}]
SPEED = {1: 3.0, 2: 1.0, 4: 2.0}  # warps -> fake ms: the second candidate is fastest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFOCUS_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.delenv("DEFOCUS_AUTOTUNE", raising=False)
    autotune.clear()
    yield
    autotune.clear()


def _build(built: list):
    def build(params):
        built.append(params)
        return lambda: params["warps"]

    return build


def _timer(run):
    return SPEED[run()]


def test_cpu_and_interpreter_take_the_default_untimed():
    built: list = []
    chosen = autotune.choose(
        "k", ("shape",), CANDIDATES[0], lambda: CANDIDATES, _build(built), torch.device("cpu")
    )
    assert chosen == CANDIDATES[0] and built == []


def test_fastest_candidate_is_chosen_once_and_kept_on_disk(tmp_path):
    built: list = []
    key = (2, 197, 1536, "bf16")
    chosen = autotune.choose(
        "k", key, CANDIDATES[0], lambda: CANDIDATES, _build(built), torch.device("cpu"), timer=_timer
    )
    assert chosen == {"warps": 2, "split": 4} and len(built) == 3
    again = autotune.choose(
        "k", key, CANDIDATES[0], lambda: CANDIDATES, _build(built), torch.device("cpu"), timer=_timer
    )
    assert again == chosen and len(built) == 3  # remembered, not timed again
    stored = json.loads((tmp_path / "autotune.json").read_text())
    assert list(stored.values()) == [chosen]
    autotune.clear()  # a new process: the file decides, nothing is timed
    resumed = autotune.choose(
        "k", key, CANDIDATES[0], lambda: CANDIDATES, _build(built), torch.device("cpu"), timer=_timer
    )
    assert resumed == chosen and len(built) == 3
    cpu, other_key = torch.device("cpu"), (128, 197, 1536, "bf16")
    other = autotune.choose(
        "k", other_key, CANDIDATES[0], lambda: CANDIDATES, _build(built), cpu, timer=_timer
    )
    assert other == chosen and len(built) == 6  # another key is timed on its own


def test_a_stale_choice_outside_the_candidates_is_timed_again(tmp_path):
    built: list = []
    key = ("shape",)
    autotune.choose(
        "k", key, CANDIDATES[0], lambda: CANDIDATES, _build(built), torch.device("cpu"), timer=_timer
    )
    autotune.clear()  # a new process, whose launcher no longer offers the stored choice
    narrower = [CANDIDATES[0], CANDIDATES[2]]
    assert (
        autotune.choose(
            "k", key, narrower[0], lambda: narrower, _build(built), torch.device("cpu"), timer=_timer
        )
        == narrower[1]
    )


def test_unlaunchable_candidates_are_never_chosen_but_a_failing_default_is_an_error():
    def build(params):
        if params["warps"] == 2:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return lambda: params["warps"]

    chosen = autotune.choose(
        "k", ("s",), CANDIDATES[0], lambda: CANDIDATES, build, torch.device("cpu"), timer=_timer
    )
    assert chosen == {"warps": 4, "split": 2}

    def failing_default(params):
        raise OutOfResources(300_000, 232_448, "shared memory")

    with pytest.raises(RuntimeError, match="default launch parameters"):
        autotune.choose(
            "k2",
            ("s",),
            CANDIDATES[0],
            lambda: CANDIDATES,
            failing_default,
            torch.device("cpu"),
            timer=_timer,
        )


def test_disabled_or_a_corrupt_cache_file(tmp_path, monkeypatch):
    (tmp_path / "autotune.json").write_text("{not json")
    built: list = []
    chosen = autotune.choose(
        "k", ("s",), CANDIDATES[0], lambda: CANDIDATES, _build(built), torch.device("cpu"), timer=_timer
    )
    assert chosen == {"warps": 2, "split": 4}  # the corrupt file is ignored and rewritten
    assert json.loads((tmp_path / "autotune.json").read_text())
    monkeypatch.setenv("DEFOCUS_AUTOTUNE", "0")
    assert not autotune.enabled()
    assert (
        autotune.choose("k3", ("s",), CANDIDATES[0], lambda: CANDIDATES, _build(built), torch.device("meta"))
        == CANDIDATES[0]
    )


def test_candidates_are_listed_once_per_key_and_never_untuned():
    """An op calls ``choose`` on every launch: past a key's first call it is a dict lookup, and where
    nothing is tuned the candidates are not even listed."""
    listed: list = []

    def candidates():
        listed.append(1)
        return CANDIDATES

    built: list = []
    assert (
        autotune.choose("k", ("s",), CANDIDATES[0], candidates, _build(built), torch.device("cpu"))
        == CANDIDATES[0]
    )
    assert listed == []
    for _ in range(3):
        chosen = autotune.choose("k", ("s",), CANDIDATES[0], candidates, _build(built), torch.device("cpu"),
                                 timer=_timer)  # fmt: skip
    assert chosen == {"warps": 2, "split": 4} and listed == [1] and len(built) == 3
    with pytest.raises(ValueError, match="start with the default"):
        autotune.choose(
            "k4", ("s",), CANDIDATES[1], candidates, _build(built), torch.device("cpu"), timer=_timer
        )
