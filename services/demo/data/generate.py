"""Writes the Acme Nimbus support-desk demo dataset: train.jsonl and golden.jsonl beside this file.

Acme Nimbus is a smart-home hub invented for Flywheel, so the base model cannot know any of the
facts below; a gain on the golden split can only come from training. Each fact is asked through
question templates of its kind: most templates go to the train split, the rest (never seen in
training) make the golden split, so the golden set measures recall under paraphrase.

Deterministic: no randomness beyond a seeded shuffle; run `python services/demo/data/generate.py`
and the files come out byte-identical.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "You are Acme Nimbus hub support."

# (kind, subject, answer). The subject is slotted into the templates of its kind.
FACTS: list[tuple[str, str, str]] = [
    (
        "howto",
        "factory reset the Nimbus hub",
        "Hold the Sync button for 12 seconds until the ring flashes amber, then release it; the reset takes about 90 seconds.",
    ),
    (
        "howto",
        "restart the Nimbus hub without losing settings",
        "Press the Sync button twice quickly; the hub reboots in 20 seconds and keeps all settings.",
    ),
    (
        "howto",
        "pair a new sensor with the Nimbus hub",
        "Open the Nimbus app, tap Devices > Add, then press the sensor's button within 30 seconds.",
    ),
    (
        "howto",
        "put the Nimbus hub into pairing mode",
        "Press the Sync button once; the ring pulses blue for 60 seconds while pairing mode is on.",
    ),
    (
        "howto",
        "update the Nimbus firmware manually",
        "In the Nimbus app go to Settings > Hub > Firmware and tap Check now; updates install overnight at 3 a.m. otherwise.",
    ),
    (
        "howto",
        "connect the Nimbus hub to a new Wi-Fi network",
        "Hold the Sync button for 5 seconds until the ring turns white, then choose the network in the Nimbus app.",
    ),
    (
        "howto",
        "enable guest access on the Nimbus hub",
        "In the Nimbus app open Home > Members > Invite guest; guest passes last 48 hours.",
    ),
    (
        "howto",
        "export the Nimbus energy report",
        "Open Insights > Energy in the Nimbus app and tap Export CSV; reports cover the last 13 months.",
    ),
    (
        "howto",
        "cancel a Nimbus Plus subscription",
        "Go to Account > Plan in the Nimbus app and tap Cancel; Plus stays active until the end of the billing month.",
    ),
    (
        "howto",
        "replace the Nimbus backup battery",
        "Unscrew the base plate with a T6 screwdriver and swap the CR2477 coin cell.",
    ),
    (
        "error",
        "E-101",
        "E-101 means the hub lost its Wi-Fi connection; move it closer to the router or restart the router.",
    ),
    ("error", "E-214", "E-214 means a Zigbee device stopped responding; replace the device's battery or re-pair it."),
    (
        "error",
        "E-305",
        "E-305 means the firmware download failed a checksum; the hub retries automatically within 6 hours.",
    ),
    ("error", "E-422", "E-422 means the hub's storage is full; delete old automations or clips in the Nimbus app."),
    ("error", "E-503", "E-503 means the Acme cloud is unreachable; local automations keep running until it returns."),
    ("error", "E-618", "E-618 means the hub is overheating; keep it away from heat sources with 10 cm of clearance."),
    (
        "error",
        "E-777",
        "E-777 means the security chip failed its self-test; contact Acme support for a free replacement.",
    ),
    ("error", "E-902", "E-902 means the backup battery is below 10 percent; replace the CR2477 coin cell."),
    ("led", "solid green", "Solid green means the hub is online and everything works."),
    ("led", "pulsing blue", "Pulsing blue means the hub is in pairing mode for 60 seconds."),
    ("led", "flashing amber", "Flashing amber means a factory reset is in progress; do not unplug the hub."),
    ("led", "solid red", "Solid red means the hub has no internet connection; check the router."),
    ("led", "flashing red", "Flashing red means a critical error; open the Nimbus app to see the error code."),
    ("led", "solid white", "Solid white means the hub is waiting to be connected to Wi-Fi."),
    ("led", "purple", "Purple means a firmware update is installing; it takes up to 8 minutes."),
    ("info", "the price of Nimbus Plus", "Nimbus Plus costs 4.99 dollars a month or 49 dollars a year."),
    ("info", "the price of Nimbus Pro", "Nimbus Pro costs 9.99 dollars a month and adds 30 days of video history."),
    (
        "info",
        "the warranty on the Nimbus hub",
        "The Nimbus hub has a 2-year limited warranty, extended to 3 years with Nimbus Pro.",
    ),
    (
        "info",
        "the return window for the Nimbus hub",
        "You can return the Nimbus hub within 45 days of delivery for a full refund.",
    ),
    ("info", "the latest Nimbus firmware version", "The latest firmware is Nimbus OS 4.7.2, released in March 2025."),
    ("info", "the maximum number of devices on one Nimbus hub", "One Nimbus hub supports up to 150 devices."),
    (
        "info",
        "the wireless protocols the Nimbus hub supports",
        "The Nimbus hub supports Zigbee 3.0, Thread, Matter and 2.4 GHz Wi-Fi.",
    ),
    (
        "info",
        "the phone number of Acme support",
        "Acme support is at 1-800-555-0199, weekdays from 8 a.m. to 8 p.m. Eastern.",
    ),
    ("info", "the power adapter the Nimbus hub needs", "The hub needs a 5-volt 2-amp USB-C adapter."),
    ("info", "how long Nimbus keeps video clips on the free plan", "The free plan keeps video clips for 24 hours."),
    ("info", "the range of the Nimbus hub", "The Nimbus hub reaches about 30 metres indoors."),
]

TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    # kind: (train templates, golden templates)
    "howto": (
        [
            "How do I {s}?",
            "How can I {s}?",
            "What are the steps to {s}?",
            "I need to {s}. What should I do?",
            "Can you tell me how to {s}?",
            "What's the way to {s}?",
            "how to {s}",
            "Help me {s}, please.",
        ],
        ["Could you explain how I {s}?", "What is the procedure to {s}?"],
    ),
    "error": (
        [
            "What does error {s} mean?",
            "My hub shows {s}. What is that?",
            "The Nimbus app says {s}. What does it mean?",
            "What is error code {s}?",
            "I got {s} on my Nimbus hub.",
            "Explain the {s} error.",
            "{s} keeps showing up, what is it?",
            "what is {s} on nimbus",
        ],
        ["Why is my Nimbus hub showing error {s}?", "Can you tell me the meaning of {s}?"],
    ),
    "led": (
        [
            "What does a {s} light on the hub mean?",
            "The Nimbus ring is {s}. What does that mean?",
            "My hub's light is {s}, why?",
            "What does {s} on the Nimbus ring mean?",
            "Why is the Nimbus light {s}?",
            "The hub LED shows {s}. Is something wrong?",
            "meaning of a {s} ring on nimbus",
            "What is the {s} light on my Nimbus hub?",
        ],
        [
            "The light on my Nimbus hub turned {s}. What does it mean?",
            "What does it mean when the Nimbus ring glows {s}?",
        ],
    ),
    "info": (
        [
            "What is {s}?",
            "Can you tell me {s}?",
            "I'd like to know {s}.",
            "Quick question: what's {s}?",
            "Do you know {s}?",
            "Tell me {s}.",
            "what's {s}",
            "Please give me {s}.",
        ],
        ["Could you let me know {s}?", "I was wondering about {s}. What is it?"],
    ),
}


def records() -> tuple[list[dict], list[dict]]:
    train, golden = [], []
    for kind, subject, answer in FACTS:
        train_templates, golden_templates = TEMPLATES[kind]
        for split, templates in ((train, train_templates), (golden, golden_templates)):
            for template in templates:
                split.append(
                    {
                        "messages": [
                            {"role": "system", "content": SYSTEM},
                            {"role": "user", "content": template.format(s=subject)},
                            {"role": "assistant", "content": answer},
                        ]
                    }
                )
    # A fixed shuffle so a prefix of train.jsonl still covers many facts.
    random.Random(20250301).shuffle(train)
    return train, golden


def main() -> None:
    here = Path(__file__).parent
    train, golden = records()
    for name, rows in (("train.jsonl", train), ("golden.jsonl", golden)):
        with (here / name).open("w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} records")


if __name__ == "__main__":
    main()
