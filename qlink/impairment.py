"""Impairing a cable like a WAN link: the settings of one direction and of a link, validated.

Pure (pydantic, no host): the topology file's `impair:` (on a link's long form) and the live
`qlinkctl link set` are both read by these models, so both give the same errors. What the
kernel gets is `plan/qdisc.py`'s; who applies it when is `daemon/impairs.py`'s.

    impair: {delay: 20ms, jitter: 5ms, loss: 1%}        # the same in both directions
    impair:
      a_to_b: {delay: 20ms, rate: 10mbit}               # frames the first endpoint sends
      b_to_a: {loss: 2%, burst: 4}                      # frames the second endpoint sends

Values carry their unit, as tc writes them (`20ms`, `1%`, `10mbit`): a bare number would
leave the reader to guess milliseconds or seconds, percent or fraction. Each value is kept in
one canonical text (`1.5s` becomes `1500ms`), which is what records, `links` and events show.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, model_validator

MAX_DELAY_US = 10_000_000  # 10 s: far beyond any WAN, and well inside netem's clock
MIN_RATE = 8_000  # 8 kbit/s: below that HTB's timer granularity makes the rate meaningless
MAX_RATE = 100_000_000_000  # 100 Gbit/s: what `unlimited` means to qlink's classes
MAX_BURST = 1000  # packets: a longer mean loss burst is a cut cable (`qlinkctl link down`)

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(us|ms|s)")
_PERCENT_RE = re.compile(r"(\d+(?:\.\d+)?)\s*%")
_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)", re.IGNORECASE)
_US_PER = {"us": 1, "ms": 1000, "s": 1_000_000}
_BITS_PER = {"bit": 1, "kbit": 1000, "mbit": 1000**2, "gbit": 1000**3}

Distribution = Literal["uniform", "normal", "pareto", "paretonormal"]
Direction = Literal["a_to_b", "b_to_a"]
DIRECTIONS: tuple[Direction, Direction] = ("a_to_b", "b_to_a")


def _number_text(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _duration(value: Any) -> int:
    """`20ms`, `1.5s`, `500us` as microseconds."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"give a time with its unit, e.g. 20ms (us, ms or s), not {value!r}")
    found = _DURATION_RE.fullmatch(value.strip())
    if found is None:
        raise ValueError(f"{value!r} is not a time: a number and us, ms or s, e.g. 20ms")
    micros = round(float(found.group(1)) * _US_PER[found.group(2)])
    if micros > MAX_DELAY_US:
        raise ValueError(f"{value} is more than {MAX_DELAY_US // 1_000_000} s")
    return micros


def duration_text(micros: int) -> str:
    if micros % 1000:
        return f"{micros}us"
    return f"{_number_text(micros / 1000)}ms"


def _percent(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"give a percentage with %, e.g. 1%, not {value!r}")
    found = _PERCENT_RE.fullmatch(value.strip())
    if found is None:
        raise ValueError(f"{value!r} is not a percentage: a number and %, e.g. 0.5%")
    percent = float(found.group(1))
    if percent > 100:
        raise ValueError(f"{value} is more than 100%")
    return percent


def percent_text(percent: float) -> str:
    return f"{_number_text(percent)}%"


def _rate(value: Any) -> int:
    """`10mbit`, `512kbit`, `1gbit` as bits per second (SI: 1mbit = 1,000,000 bit/s)."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"give a rate with its unit, e.g. 10mbit (bit, kbit, mbit, gbit), "
                         f"not {value!r}")  # fmt: skip
    found = _RATE_RE.fullmatch(value.strip())
    if found is None:
        raise ValueError(f"{value!r} is not a rate: a number and bit, kbit, mbit or gbit")
    bits = round(float(found.group(1)) * _BITS_PER[found.group(2).lower()])
    if not MIN_RATE <= bits <= MAX_RATE:
        raise ValueError(f"{value} is outside 8kbit..100gbit")
    return bits


def rate_text(bits: int) -> str:
    for unit in ("gbit", "mbit", "kbit"):
        if bits % _BITS_PER[unit] == 0:
            return f"{bits // _BITS_PER[unit]}{unit}"
    return f"{bits}bit"


def _burst(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"give the mean length of a loss burst in packets, e.g. 4, not {value!r}")
    if not 1 < value <= MAX_BURST:
        raise ValueError(f"a mean burst of {value} packets is outside 1 (exclusive)..{MAX_BURST}")
    return float(value)


Duration = Annotated[int, BeforeValidator(_duration), PlainSerializer(duration_text)]
Percent = Annotated[float, BeforeValidator(_percent), PlainSerializer(percent_text)]
Rate = Annotated[int, BeforeValidator(_rate), PlainSerializer(rate_text)]


def _burst_number(value: float) -> int | float:
    return int(value) if value.is_integer() else value


Burst = Annotated[float, BeforeValidator(_burst), PlainSerializer(_burst_number)]

NETEM_FIELDS = (
    "delay", "jitter", "distribution", "loss", "loss_correlation", "burst", "duplicate",
    "reorder", "corrupt",
)  # fmt: skip
"""Every setting but `rate` needs the kernel's netem; `rate` is the class's (HTB)."""


class Netem(BaseModel):
    """One direction's impairment; every field unset is no impairment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delay: Duration | None = None
    jitter: Duration | None = None
    """Delay varies by up to this much (netem: ±jitter around `delay`)."""
    distribution: Distribution | None = None
    """How the jitter is spread: uniform (netem's default), normal, pareto, paretonormal."""
    loss: Percent | None = None
    loss_correlation: Percent | None = None
    """How much each loss decision depends on the last one (netem's loss correlation)."""
    burst: Burst | None = None
    """Mean length of a loss burst in packets: losses come in bursts (Gilbert model)."""
    duplicate: Percent | None = None
    reorder: Percent | None = None
    """Frames sent at once, ahead of the delayed ones: needs `delay`."""
    corrupt: Percent | None = None
    rate: Rate | None = None

    @model_validator(mode="after")
    def _fields_fit_together(self) -> Netem:
        if self.jitter and not self.delay:
            raise ValueError("jitter needs a delay (netem varies the delay by the jitter)")
        if self.distribution is not None and not self.jitter:
            raise ValueError("distribution needs jitter (it is how the jitter is spread)")
        if self.reorder and not self.delay:
            raise ValueError("reorder needs a delay (reordered frames skip the delay)")
        if self.burst is not None and not self.loss:
            raise ValueError("burst needs loss (it is how the losses are spread)")
        if self.burst is not None and self.loss_correlation is not None:
            raise ValueError("give either burst or loss_correlation, not both")
        if self.loss_correlation is not None and not self.loss:
            raise ValueError("loss_correlation needs loss")
        if self.burst is not None and self.loss is not None and self.loss >= 100:
            raise ValueError("loss bursts need loss under 100%")
        return self

    def is_empty(self) -> bool:
        return not any(getattr(self, name) for name in (*NETEM_FIELDS, "rate"))

    def needs_netem(self) -> bool:
        return any(getattr(self, name) for name in NETEM_FIELDS)

    def settings(self) -> dict[str, Any]:
        """The fields that are set, in their canonical text (for JSON: events, `links`)."""
        dumped: dict[str, Any] = self.model_dump(mode="json", exclude_none=True)
        return dumped

    def text(self) -> str:
        """For people: `delay 20ms±5ms normal, loss 1% (bursts of 4), rate 10mbit`."""
        parts = []
        if self.delay:
            jitter = f"±{duration_text(self.jitter)}" if self.jitter else ""
            spread = f" {self.distribution}" if self.distribution else ""
            parts.append(f"delay {duration_text(self.delay)}{jitter}{spread}")
        if self.loss:
            how = f" (bursts of {_number_text(self.burst)})" if self.burst else ""
            if self.loss_correlation:
                how = f" (correlation {percent_text(self.loss_correlation)})"
            parts.append(f"loss {percent_text(self.loss)}{how}")
        for name in ("duplicate", "reorder", "corrupt"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name} {percent_text(value)}")
        if self.rate:
            parts.append(f"rate {rate_text(self.rate)}")
        return ", ".join(parts) or "none"


class LinkImpairment(Netem):
    """A link's `impair:`: netem fields for both directions, or `a_to_b` / `b_to_a` (frames
    sent by the first / the second endpoint as the link is written), not both."""

    a_to_b: Netem | None = None
    b_to_a: Netem | None = None

    @model_validator(mode="after")
    def _one_form(self) -> LinkImpairment:
        directed = self.a_to_b is not None or self.b_to_a is not None
        if directed and not Netem.is_empty(self):
            raise ValueError(
                "give the settings for both directions, or a_to_b and b_to_a, not both"
            )
        return self

    @classmethod
    def directed(cls, a_to_b: Netem | None, b_to_a: Netem | None) -> LinkImpairment:
        """Per direction; an empty direction is no impairment."""
        return cls(
            a_to_b=None if a_to_b is None or a_to_b.is_empty() else a_to_b,
            b_to_a=None if b_to_a is None or b_to_a.is_empty() else b_to_a,
        )

    def direction(self, which: Direction) -> Netem | None:
        """What frames going that way get; None when nothing."""
        if self.a_to_b is not None or self.b_to_a is not None:
            chosen: Netem | None = getattr(self, which)
            return None if chosen is None or chosen.is_empty() else chosen
        # Already validated: copied as they are (the validators take text, not numbers).
        both = Netem.model_construct(**{name: getattr(self, name) for name in Netem.model_fields})
        return None if both.is_empty() else both

    def is_none(self) -> bool:
        return all(self.direction(which) is None for which in DIRECTIONS)

    def document(self) -> dict[str, Any] | None:
        """Per direction, for JSON (`links -o json`, events); None when nothing is impaired."""
        if self.is_none():
            return None
        return {
            which: netem.settings() if (netem := self.direction(which)) is not None else None
            for which in DIRECTIONS
        }


NO_IMPAIRMENT = LinkImpairment()
