"""One gate per browser session, and the server's store of them."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def same_labels(a: Sequence[str] | None, b: Sequence[str] | None) -> bool:
    return set(a or []) == set(b or [])


@dataclass
class SessionGate:
    """One browser session's gate: its weights and what it was calibrated on. `weights=None` is the uncalibrated gate,
    which equals the mean of logits; `expired` then says why a gate this session had is gone."""

    weights: dict[str, torch.Tensor] | None = None  # the gate's state_dict
    calibration: dict | None = None  # `model.config.calibration` after calibrating
    report: str = ""  # the calibration report, as shown
    labels: list[str] | None = None  # the label set the gate was calibrated on
    source: str = ""  # where the gate came from, in words ("loaded from gate.zip"); empty when calibrated here
    expired: str = ""  # for an uncalibrated gate: why this session's gate is gone
    cascade: dict | None = None  # a loaded gate's cascade: its `config.cascade` entry (order, stop margins, ...)
    cascade_weights: dict[str, torch.Tensor] | None = None  # and its gates' state_dict
    class_head: dict | None = None  # a class head calibration kept: its `config.class_head` entry (rank, penalty)
    class_head_weights: dict[str, torch.Tensor] | None = None  # and its state_dict, rows in `labels`' order

    @property
    def calibrated(self) -> bool:
        return self.weights is not None

    def describe(self, current_labels: Sequence[str] | None = None) -> str:
        """The status line: always derived from the gate actually held."""
        if not self.calibrated:
            text = "Gate: **not calibrated**: the mean of logits, every backbone weighs the same."
            return f"{self.expired} {text}" if self.expired else text
        info = self.calibration or {}
        if info:
            text = (
                f"Gate: **calibrated** on {info.get('dataset', 'unknown data')} ({info.get('shots', '?')} images per "
                f"label, {info.get('images', '?')} images)"
            )
        else:
            text = "Gate: **calibrated** (its calibration data is not recorded)"
        text += f", {self.source}; " if self.source else "; "
        chosen = info.get("chosen")
        if chosen and chosen != "gate":  # calibration kept a baseline: say which, not that the gate weighs anything
            text += f"calibration kept the {chosen}: the gate did not beat it on held-out calibration images."
        else:
            text += "the gate weighs the backbones per image."
        if self.cascade is not None:
            tolerance = self.cascade.get("tolerance")
            within = f" (top-1 within {tolerance} of all of them on its calibration data)" if tolerance else ""
            text += (
                " With a cascade: backbones run cheapest first, and an image stops once the rest are unlikely to "
                f"change its answer{within}."
            )
        if self.labels and current_labels is not None and not same_labels(self.labels, current_labels):
            text += (
                f" It was calibrated on the labels {', '.join(self.labels)} and now serves your current labels "
                "(the gate weighs backbones, not labels, so it carries over; its calibration figures are for its own "
                "labels)."
            )
            if self.class_head is not None:
                text += " Its class head corrects those labels only, so it is left out for these."
        return text


class GateStore:
    """Calibrated gates on the server, by session id. Only idleness removes one: a gate unused for `idle_s` expires;
    when `max_gates` gates are held, a new one is refused with a message (nobody's gate is dropped to make room), so
    anonymous traffic can never evict a user's gate. A session whose gate expired is told so (`SessionGate.expired`).
    Uncalibrated gates are not stored: they cost nothing to make again.
    """

    def __init__(self, max_gates: int = 1000, idle_s: float = 24 * 3600, clock: Callable[[], float] = time.monotonic):
        self.max_gates, self.idle_s, self._clock = max_gates, idle_s, clock
        self._gates: OrderedDict[str, tuple[SessionGate, float]] = OrderedDict()  # least recently used first
        self._expired: OrderedDict[str, str] = OrderedDict()  # session id -> why its gate is gone
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """The number of distinct gates held."""
        return len({id(gate) for gate, _ in self._gates.values()})

    def peek(self, key: str) -> SessionGate | None:
        """The gate held for `key`, if any, without counting it as used."""
        with self._lock:
            entry = self._gates.get(key)
            return entry[0] if entry else None

    def _expire_idle(self, now: float) -> None:
        while self._gates:
            key, (_, used) = next(iter(self._gates.items()))
            if now - used < self.idle_s:
                break
            del self._gates[key]
            self._expired[key] = (
                f"Your calibrated gate expired after {self.idle_s / 3600:g} h unused and was removed from the server: "
                "reload the page to restore it from this browser, or load your downloaded gate (Save tab)."
            )
        while len(self._expired) > 10 * self.max_gates:  # only expiries add here, and only gates expire
            self._expired.popitem(last=False)

    def get(self, key: str) -> SessionGate:
        with self._lock:
            now = self._clock()
            self._expire_idle(now)
            if key in self._gates:
                gate, _ = self._gates.pop(key)
                self._gates[key] = (gate, now)
                return gate
            return SessionGate(expired=self._expired.get(key, ""))

    def put(self, key: str, gate: SessionGate) -> None:
        with self._lock:
            now = self._clock()
            self._expire_idle(now)
            self._expired.pop(key, None)
            if not gate.calibrated:
                self._gates.pop(key, None)
                return
            # Several sessions may share one gate (a page reloaded, or opened in two tabs): it counts once.
            held = {id(g) for g, _ in self._gates.values()}
            if id(gate) not in held and len(held) >= self.max_gates:
                raise ValueError(
                    f"The server holds {self.max_gates} calibrated gates already, its limit; try again later (gates "
                    "unused for a while are removed), or run the app yourself. Nothing was changed."
                )
            self._gates.pop(key, None)
            self._gates[key] = (gate, now)


__all__ = ["GateStore", "SessionGate", "same_labels"]
