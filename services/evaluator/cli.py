"""`flywheel eval ...`: request evaluations from a running evaluator and read their verdicts.

`app` holds the evaluator's part of the `flywheel` command, by group (`eval`); services/cli/main.py
mounts it, finding this module by name.

These talk to the evaluator's door (`/evaluator/v1/evaluations`) with an API key (`--api-key` or
FLYWHEEL_API_KEY); the evaluation itself runs in the evaluator process, where the models are.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from services.runtime.errors import FlywheelError

app = typer.Typer()
eval_app = typer.Typer(
    help="Evaluations: candidate vs baseline on a golden set, and the promotion gate's verdict.", no_args_is_help=True
)
app.add_typer(eval_app, name="eval")
bench_app = typer.Typer()
app.add_typer(bench_app, name="bench")

# The demo's Acme Nimbus data (services/demo/data), read as files: the evaluator imports nothing of the demo.
DEMO_DATA = Path(__file__).resolve().parents[1] / "demo" / "data"

UrlOption = Annotated[
    str | None, typer.Option("--url", help="Evaluator base URL; default http://FLYWHEEL_HTTP_HOST:FLYWHEEL_HTTP_PORT.")
]
KeyOption = Annotated[str | None, typer.Option("--api-key", help="API key; default FLYWHEEL_API_KEY.")]


class EvalCommandError(FlywheelError):
    """A command's own input is wrong (a NAME:VERSION it cannot read)."""


def _call(
    method: str,
    path: str,
    url: str | None,
    api_key: str | None,
    *,
    body: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
) -> Any:
    from services.runtime.doors import call_door

    return call_door(method, path, body, service="evaluator", base_url=url, api_key=api_key, params=params)


def _target(model: str, adapter: int | None, prompt: str | None = None, *, prompt_hint: str = "--prompt") -> dict:
    target: dict[str, Any] = {"model_name": model, "adapter_version": adapter}
    if prompt is not None:
        name, version = _name_version(prompt, prompt_hint, "acme-support:2")
        target |= {"prompt_name": name, "prompt_version": version}
    return target


def _name_version(text: str, hint: str, example: str) -> tuple[str, int]:
    name, _, version = text.rpartition(":")
    if not name or not version.isdigit() or int(version) < 1:
        raise EvalCommandError(f"{hint} {text!r}: write it as NAME:VERSION, e.g. {example}")
    return name, int(version)


def _golden(text: str) -> dict:
    name, version = _name_version(text, "--golden", "acme-golden:1")
    return {"name": name, "version": version}


def _summary(item: dict) -> str:
    result = item.get("result") or {}
    verdict = "" if not result else (" PASSED" if result.get("passed") else " FAILED")
    return f"{item['evaluation_id']}  {item['status']}{verdict}"


@eval_app.command("request")
def request(
    model: Annotated[str, typer.Option("--model", help="Base model name.")],
    golden: Annotated[str, typer.Option("--golden", help="Golden dataset as NAME:VERSION.")],
    adapter: Annotated[
        int | None, typer.Option("--adapter", help="Candidate adapter version; none: the base model.")
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", help="Candidate prompt version as NAME:VERSION, rendered into every golden prompt."),
    ] = None,
    baseline_adapter: Annotated[
        int | None,
        typer.Option("--baseline-adapter", help="Baseline adapter version; default: the production version."),
    ] = None,
    baseline_base: Annotated[
        bool, typer.Option("--baseline-base", help="Compare with the base model instead of production.")
    ] = False,
    baseline_prompt: Annotated[
        str | None, typer.Option("--baseline-prompt", help="Baseline prompt version as NAME:VERSION.")
    ] = None,
    suite: Annotated[str, typer.Option("--suite", help="Metric suite: default, fast or judge.")] = "default",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the verdict and print it.")] = False,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Request an evaluation of a candidate (adapter and/or prompt version) against a baseline on a golden set.

    Without a baseline option: an adapter is compared with the production version, a prompt version
    with the prompt's production-labelled version on the same weights."""
    body: dict[str, Any] = {
        "candidate": _target(model, adapter, prompt),
        "golden": _golden(golden),
        "metric_suite": suite,
    }
    if baseline_adapter is not None or baseline_base:
        body["baseline"] = _target(model, baseline_adapter, baseline_prompt, prompt_hint="--baseline-prompt")
    elif baseline_prompt is not None:  # one prompt against another, on the candidate's weights
        body["baseline"] = _target(model, adapter, baseline_prompt, prompt_hint="--baseline-prompt")
    queued = _call("POST", "/evaluator/v1/evaluations", url, api_key, body=body)
    typer.echo(_summary(queued))
    if wait:
        while queued["status"] not in ("completed", "failed"):
            time.sleep(2)
            queued = _call("GET", f"/evaluator/v1/evaluations/{queued['evaluation_id']}", url, api_key)
        _print_result(queued)


def _print_result(item: dict) -> None:
    typer.echo(_summary(item))
    result = item.get("result")
    if not result:
        return
    for reason in result["reasons"]:
        typer.echo(f"  {reason}")
    if result.get("report_uri"):
        typer.echo(f"  report: {result['report_uri']}")


@eval_app.command("show")
def show(
    evaluation_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full record as JSON.")] = False,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Show one evaluation: status, verdict, reasons and the report."""
    item = _call("GET", f"/evaluator/v1/evaluations/{evaluation_id}", url, api_key)
    if as_json:
        typer.echo(json.dumps(item, indent=2, sort_keys=True))
    else:
        _print_result(item)


@eval_app.command("list")
def list_(
    model: Annotated[str | None, typer.Option("--model", help="Only this model's candidates.")] = None,
    limit: int = 20,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """List evaluations, newest first."""
    params = {"limit": limit} | ({"model_name": model} if model else {})
    for item in _call("GET", "/evaluator/v1/evaluations", url, api_key, params=params)["data"]:
        typer.echo(_summary(item))


@bench_app.command("preference")
def bench_preference(
    facts: int = typer.Option(
        12, min=2, max=36, help="Demo facts trained and asked about: 8 corrections and 2 golden questions each."
    ),
    quick: bool = typer.Option(False, "--quick", help="4 facts and one epoch: minutes, for a look, not a verdict."),
    epochs: float = typer.Option(1.5, help="Passes over the corrections (SFT) or the pairs (DPO)."),
    learning_rate: float = typer.Option(1e-3, "--learning-rate", help="Peak learning rate of every adapter."),
    dpo_learning_rate: float | None = typer.Option(
        None, "--dpo-learning-rate", help="Peak learning rate of the DPO adapters; default: --learning-rate."
    ),
    dpo_beta: float = typer.Option(
        0.1, "--dpo-beta", help="DPO's pull towards its reference: the base model, or the SFT adapter for SFT then DPO."
    ),
    work_dir: Path | None = typer.Option(
        None, help="Datasets and adapters; a rerun reuses finished ones. Default: FLYWHEEL_HOME/bench/preference."
    ),
) -> None:
    """DPO on the demo's corrections as preference pairs, alone and after SFT, against SFT on the same corrections: the gate's paired reports on held-out golden questions."""
    from contracts.events import Hyperparameters
    from services.evaluator.preference_bench import gate_report, run_preference_bench
    from services.runtime.base_model import smollm2_weights
    from services.runtime.bench import machine, machine_line
    from services.runtime.cpu import use_free_cpus
    from services.runtime.settings import FlywheelSettings, load_settings

    settings = load_settings(FlywheelSettings)
    if quick:
        facts, epochs = 4, 1.0
    # `flywheel train`'s defaults for both methods: tuned for neither.
    hp = Hyperparameters(
        rank=16,
        alpha=32,
        learning_rate=learning_rate,
        epochs=epochs,
        batch_size=8,
        max_seq_length=256,
        seed=0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        dpo_beta=dpo_beta,
    )
    use_free_cpus()
    typer.echo(machine_line(machine()))
    typer.echo(
        f"every adapter: LoRA rank {hp.rank}, alpha {hp.alpha}, dropout {hp.dropout}, learning rate {hp.learning_rate}, "
        f"{hp.epochs} epochs, batch {hp.batch_size}, seed {hp.seed}, max_seq_length {hp.max_seq_length}, "
        f"modules {','.join(hp.target_modules)}; DPO beta {hp.dpo_beta}"
        + ("" if dpo_learning_rate is None else f"; the DPO adapters' learning rate {dpo_learning_rate}")
    )
    started = time.monotonic()
    bench = run_preference_bench(
        smollm2_weights(settings.cache),
        DEMO_DATA,
        work_dir or settings.home / "bench" / "preference",
        facts=facts,
        hyperparameters=hp,
        echo=typer.echo,
        dpo_learning_rate=dpo_learning_rate,
    )
    for gate in bench.gates:
        typer.echo("")
        for line in gate_report(gate, bench.policy, bench.why):
            typer.echo(line)
    typer.echo("")
    typer.echo("answers to the first golden questions:")
    for index, example in enumerate(bench.examples[:4]):
        typer.echo(f"  {example.question!r} (reference {example.reference!r})")
        for label, answers in bench.answers.items():
            typer.echo(f"    {label}: {answers[index]!r}")
    typer.echo("")
    for phase, seconds in bench.seconds.items():
        typer.echo(f"{phase}: {seconds:.0f} s")
    typer.echo(f"wall time: {time.monotonic() - started:.0f} s")
