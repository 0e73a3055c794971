"""The demo behind ``python -m spear_nb demo``: the whole flow on real input."""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import TextIO

import pandas as pd

from spear_nb import samples
from spear_nb.session import Session


def word_counts(text: str, top: int = 5) -> list[tuple[str, int]]:
    """Count words in a notebook-defined function (shipped with cloudpickle)."""
    words = (w.strip("'") for w in re.findall(r"[a-z']+", text.lower()))
    counts = Counter(w for w in words if w)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]


def run(out: TextIO) -> None:
    """Run each kind of process function on a chapter of Dickens; print the tables."""
    chapter_path = samples.path("data", "tale_of_two_cities_ch1.txt")
    with open(chapter_path, encoding="utf-8") as f:
        chapter = f.read()
    pd.set_option("display.width", 120)
    pd.set_option("display.max_columns", 12)

    def say(text: str = "") -> None:
        out.write(text + "\n")
        out.flush()

    say(f"spear_nb demo: {chapter.splitlines()[0]}")
    say(f"({len(chapter.split())} words from {chapter_path})\n")
    with Session() as session:
        session.register("word_counts", word_counts)
        session.register(
            "word_frequencies", handler="spear_nb.samples.handlers:word_frequencies"
        )
        session.register("wc", command=["wc", "-w"])
        session.register("shout", script=samples.path("scripts", "shout.py"))

        start = time.perf_counter()
        top = session.invoke("word_counts", chapter)
        cold = (time.perf_counter() - start) * 1e3
        say(f"1. a Python callable: {top}")
        say(
            f"   first call {cold:.1f} ms: it waited for the session's zygote (a warm "
            "template process) to start, then for the instance it forked"
        )
        start = time.perf_counter()
        for _ in range(100):
            session.invoke("word_counts", chapter)
        warm = (time.perf_counter() - start) * 1e3 / 100
        say(f"   ...and 100 warm calls on the same instance, {warm:.2f} ms each")
        say(
            "   (each over the instance's direct lane: this thread talks to it "
            "without a detour through the session's event loop)"
        )
        start = time.perf_counter()
        frequencies = session.invoke("word_frequencies", chapter, top=5)
        cold = (time.perf_counter() - start) * 1e3
        say(f"2. a handler module:function: {frequencies}")
        say(f"   (a new instance, forked from the warm zygote: {cold:.1f} ms)")
        say(f"3. a plain command (wc -w): {session.invoke('wc', chapter)!r}")
        first_line = chapter.splitlines()[0]
        shouted = session.invoke("shout", first_line)
        say(f"4. a script using the agent library: {shouted!r}")

        try:
            session.invoke("word_counts", 42)
        except Exception as exc:  # shown to the user on purpose
            say(f"5. an error raised inside the instance comes back as {exc!r}"[:200])

        columns = ["instance_id", "runtime", "status", "channel", "requests_total"]
        say("\nInstances:")
        say(session.instances()[[*columns, "latency_mean_ms"]].to_string(index=False))
        say("\nChannels:")
        say(
            session.channels()[
                [
                    "channel_id",
                    "instance_id",
                    "type",
                    "state",
                    "messages_sent",
                    "direct_calls",
                    "rtt_mean_ms",
                ]
            ].to_string(index=False)
        )
        say("\nMetrics per function:")
        say(session.metrics().to_string(index=False))
        execution = session.executions().iloc[0]["execution_id"]
        say(
            f"\nThe phases of the first call ({execution}; artifact and task are "
            "the flow's second phase, shown apart):"
        )
        events = session.events()
        phases = events[events["execution_id"] == execution]
        say(
            phases[["phase", "duration_ms", "instance_id", "detail"]].to_string(
                index=False
            )
        )
    say("\nSession closed: every instance stopped, every socket removed.")
