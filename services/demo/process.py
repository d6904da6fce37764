"""The process the demo runs every service in, as `flywheel up` does, configured for the demo: a free
port, an admin key kept in the home, the demo's alert rule and each service's settings with the demo's
values over the environment's; the driver acts on it through its doors until the loop ends."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from rich.progress import Progress

from services.demo.driver import Driver
from services.demo.recipe import CORRECTION_REPEATS, GATE_POLICY, MIN_CORRECTIONS, MODEL, RULES
from services.demo.report import LoopReport
from services.runtime.settings import FlywheelSettings, load_settings

if TYPE_CHECKING:
    from services.runtime.service import ServiceFactory


def configure(settings: FlywheelSettings) -> tuple[FlywheelSettings, str, list[ServiceFactory]]:
    """Settings for the demo's process: a free port, an admin key kept in the home, the demo's rules;
    and each service's factory with its settings, the demo's values over the environment's."""
    from functools import partial

    from pydantic import SecretStr

    from infra.processes import free_port
    from services.cli.run_cmd import available_services, factory
    from services.runtime.auth import generate_key
    from services.runtime.service import settings_class

    state = settings.home / "demo"
    state.mkdir(parents=True, exist_ok=True)
    key_file = state / "admin.key"
    if not key_file.exists():
        key_file.write_text(generate_key()[0])
        key_file.chmod(0o600)
    admin_key = key_file.read_text().strip()
    rules = state / "rules.yaml"
    rules.write_text(RULES)
    port = free_port()
    settings = settings.model_copy(update={"http_port": port, "bootstrap_admin_key": SecretStr(admin_key)})
    demo_values: dict[str, dict[str, Any]] = {
        "monitor": {
            "rules_path": rules,
            "tick_s": 5,
            "api_key": admin_key,
            "retrain_min_corrections": MIN_CORRECTIONS,
            # v2 learns v1's data (its lineage) plus the corrections; twice each, so two paraphrases of a new fact weigh enough.
            "retrain_correction_repeats": CORRECTION_REPEATS,
        },
        # A demo stopped mid-training resumes its job from the last checkpoint on the next run.
        "trainer": {"checkpoint_every": 2, "progress_every": 1},
        "evaluator": {"gate_policies": {MODEL: GATE_POLICY}, "max_tokens": 40},
        "serving": {"rate_limit_rps": 50, "rate_limit_burst": 100},
    }
    factories: list[ServiceFactory] = []
    for name in available_services():
        create_app = factory(name)
        # The rest of each service's settings (and PrivacySettings) come from the environment, as for `flywheel up`.
        factories.append(
            partial(create_app, settings=load_settings(settings_class(create_app), **demo_values.get(name, {})))
        )
    return settings, admin_key, factories


async def run_loop_in_process(
    settings: FlywheelSettings,
    report: LoopReport,
    progress: Progress,
    *,
    traffic: int,
    step_timeout: float,
    review: bool = False,
) -> None:
    from infra.processes import port_is_free
    from services.cli.run_cmd import available_services
    from services.cli.service_commands import service_cli
    from services.runtime.service import HttpServer, build_process

    settings, admin_key, factories = configure(settings)
    report.http = f"http://{settings.http_host}:{settings.http_port}"

    task = progress.add_task("registry: importing the SmolLM2 base model (GGUF -> safetensors, once)", total=None)
    # The registry's own command (the outbox relays its model.registered when the process starts).
    registry_cli = service_cli("registry")
    if registry_cli is None:
        raise RuntimeError("the demo needs the registry service, which is not part of this installation")
    await asyncio.to_thread(registry_cli.import_base_into, settings)
    progress.update(task, description="registry: base model imported", completed=1, total=1)

    task = progress.add_task(f"process: starting {', '.join(available_services())} (Triton, SmolLM2, chDB)", total=None)
    app, _ = build_process(settings, factories, title="flywheel-demo")
    # The demo's event loop handles SIGINT/SIGTERM itself (command.py), so the driver stops with the server.
    server = HttpServer(app, settings, handle_signals=False)
    serving = asyncio.create_task(server.serve(), name="uvicorn")
    try:
        while not server.started:
            if serving.done():
                raise RuntimeError(f"the demo's process did not start: {serving.exception() or 'see the log'}")
            await asyncio.sleep(0.2)
        progress.update(task, description=f"process: ready at {report.http}", completed=1, total=1)
        driver = Driver(report.http, admin_key, report, progress, step_timeout=step_timeout)
        await driver.run(traffic=traffic, review=review)
    finally:
        task = progress.add_task("process: stopping every service", total=None)
        server.should_exit = True
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(serving), timeout=120)
            except asyncio.CancelledError:
                continue  # a first signal while the services were already stopping: the stop goes on
            except TimeoutError:
                report.cleanup.append("services did not stop within 120 s")
            except Exception as error:  # noqa: BLE001 - a failed stop is reported; the broker and the report still follow
                report.cleanup.append(f"services stopped with an error: {type(error).__name__}: {error}")
            break
        free = port_is_free(settings.http_port)
        report.cleanup.append(f"services stopped; http port {settings.http_port} {'free' if free else 'STILL IN USE'}")
        progress.update(task, description="process: stopped", completed=1, total=1)
